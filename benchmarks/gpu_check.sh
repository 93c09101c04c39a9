#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, the op
# microbenchmarks against copy bandwidth, and eager + CUDA-graph decode of a 1B-class Llama.
# Uses the machine's own torch/transformers/triton (no network); results go to $OUT.
# Each section has its own time limit, so one that hangs or runs long leaves the rest their turn;
# everything printed also goes to $OUT/log.
# Usage: benchmarks/gpu_check.sh [sections...]   (build tests patching ops kernels e2e; default all)
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu-results} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
sections=${*:-build tests patching ops kernels e2e}
want() { [[ " $sections " == *" $1 "* ]]; }
step() {  # step SECONDS NAME CMD...: run with a limit, say how it ended
  local limit=$1 name=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@"; local rc=$?
  echo "== $name: rc $rc, $(( $(date +%s) - t0 )) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
PYTEST="python -m pytest -q -p no:cacheprovider --tb=short -rfE"
want build && step 200 "build CUDA extension" python -c "
import personakern.backends.cuda as c
ok = c.available('cuda'); print('cuda backend available:', ok, c.unavailable_reason() or '')"
want tests && step 150 "GPU kernel tests" $PYTEST --junitxml="$OUT/kernels.xml" \
    tests/test_backend_cuda.py tests/test_backend_triton.py tests/test_gate.py
want patching && step 150 "patched models on the GPU, every family and GPU backend" \
    $PYTEST --junitxml="$OUT/patching.xml" tests/test_patching_gpu.py
want ops && step 120 "op microbenchmarks (bf16, vs copy bandwidth)" python - <<'PY'
import json, os, torch
from personakern import ops
from personakern.benchmark.ops import run_ops
from personakern.benchmark.report import ops_table
b = [x for x in ("cuda", "triton") if ops.backend_usable(x, "cuda")]
# 12288: a real hidden size whose row cache needs the shared-memory opt-in (launch_plan.h)
r = run_ops(["native"] + b, rows=(1, 64, 4096, 16384), dims=(2048, 4096, 12288), dtype=torch.bfloat16,
            device="cuda", min_run_time=0.1, log=lambda m: None)
print(ops_table(r))
json.dump(r, open(os.path.join(os.environ["OUT"], "gpu_ops.json"), "w"), indent=2)
PY
want kernels && step 150 "GPU time per op call (CUDA-graph replay), kernels per call" \
    python benchmarks/gpu_kernel_times.py
want e2e && step 180 "end to end (1B-class Llama, bf16, batch 1)" python benchmarks/gpu_check.py
exit 0
