#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, the op
# microbenchmarks against copy bandwidth, and eager + CUDA-graph decode of a 1B-class Llama.
# Uses the machine's own torch/transformers/triton (no network); results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu-results} HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
echo "== build CUDA extension"
t0=$(date +%s)
python -c "import personakern.backends.cuda as c; ok=c.available('cuda'); print('cuda backend available:', ok, c.unavailable_reason() or '')"
echo "build: $(( $(date +%s) - t0 )) s"
echo "== GPU tests"
python -m pytest -q -x tests/test_backend_cuda.py tests/test_backend_triton.py tests/test_gate.py 2>&1 | tail -5
python -m pytest -q tests/test_conditional_steering.py -k "llama" 2>&1 | tail -3
python -m pytest -q tests/test_patching.py tests/test_compile.py -k "not gemma3" 2>&1 | tail -3
echo "== op microbenchmarks (bf16, vs copy bandwidth)"
python - <<'PY'
import json, os, torch
from personakern import ops
from personakern.benchmark.ops import run_ops
from personakern.benchmark.report import ops_table
b = [x for x in ("cuda", "triton") if ops.backend_usable(x, "cuda")]
# 12288: a real hidden size whose row cache needs the shared-memory opt-in (launch_plan.h)
r = run_ops(["native"] + b, rows=(1, 64, 4096, 16384), dims=(2048, 4096, 12288), dtype=torch.bfloat16,
            device="cuda", log=lambda m: None)
print(ops_table(r))
json.dump(r, open(os.path.join(os.environ["OUT"], "gpu_ops.json"), "w"), indent=2)
PY
echo "== end to end (1B-class Llama, bf16, batch 1, 64 new tokens)"
python benchmarks/gpu_check.py
