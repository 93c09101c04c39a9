#!/usr/bin/env bash
# A user's install, not the checkout's: build a wheel from the checkout with .venv's torch
# (the CPU extension compiled ahead of time into it), install it non-editable into a fresh venv,
# and from outside the checkout check that the cpu backend is usable from the wheel's own
# library and that a steered + monitored forward on it equals native. Then the same for an sdist
# built under build isolation (no torch at build time): the backend is built just in time from
# the sources the sdist carried. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/personakern-wheel-check.XXXXXX")
# removing a venv with torch takes a minute on a busy machine: let it go on after we are done
trap '(rm -rf "$work" >/dev/null 2>&1 &)' EXIT
quiet() { grep -v -i -E "^warning|^ *warning: location" || true; }
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

# from a copy of the checkout's files: setuptools' build/ of an earlier run could smuggle
# deleted modules into the sdist or wheel, and the checkout stays as it was
mkdir "$work/src" "$work/dist"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$work/src"
if [ -n "${PERSONAKERN_WHEEL_OUT:-}" ] && ls "$PERSONAKERN_WHEEL_OUT"/personakern-*.whl >/dev/null 2>&1; then
  # the wheel tests/test_packaging.py built from a copy of this checkout in the test run (one
  # compile of the extension instead of two)
  step "wheel built by the test run (pip wheel --no-build-isolation, .venv's torch)"
  cp "$PERSONAKERN_WHEEL_OUT"/personakern-*.whl "$work/dist/"
else
  step "wheel from the checkout (pip wheel --no-build-isolation, .venv's torch)"
  .venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src" 2>&1 | quiet
fi
wheel=$(ls "$work"/dist/personakern-*.whl)
echo "$(basename "$wheel")"
.venv/bin/python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["personakern/csrc/cpu/kernels.cpp", "personakern/csrc/cuda/persona_kernels.cu",
        "personakern/backends/personakern_cpu_ops.build.json"]
missing = [n for n in need if n not in names]
if not any(n.startswith("personakern/backends/personakern_cpu_ops.") and n.endswith(".so") for n in names):
    missing.append("personakern/backends/personakern_cpu_ops.*.so")
assert not missing, f"the wheel lacks {missing}"
PY

step "sdist from the checkout"
(cd "$work/src" && "$repo/.venv/bin/python" -c \
    "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))" "$work/sdist" 2>&1 | tail -1)
sdist=$(ls "$work"/sdist/personakern-*.tar.gz)

step "fresh venv: torch==2.13.0, then the wheel with -c requirements-ci.txt"
# --no-compile: byte-compiling all of torch and transformers is most of an install's time, and
# this venv imports a small part of them once
.venv/bin/python -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-compile "torch==${PERSONAKERN_TORCH:-2.13.0}" 2>&1 | quiet
"$work/venv/bin/pip" install -q --no-compile -c requirements-ci.txt "$wheel" 2>&1 | quiet

# outside the checkout, with a build cache of its own: nothing of the repo can be imported or reused
cd "$work"
export PATH="$work/venv/bin:$PATH" PERSONAKERN_CACHE="$work/cache" HF_HUB_OFFLINE=1
unset PYTHONPATH PERSONAKERN_BACKEND
step "wheel: the cpu backend from the wheel's library, no compiling allowed"
PERSONAKERN_NO_BUILD=1 "$work/venv/bin/python" "$repo/.ci/wheel_check.py" aot

step "sdist (build isolation, so no torch at build time): the cpu backend built just in time"
"$work/venv/bin/pip" install -q --no-compile --force-reinstall --no-deps "$sdist" 2>&1 | quiet
"$work/venv/bin/python" "$repo/.ci/wheel_check.py" jit

step "wheel and sdist checks passed"
