#!/usr/bin/env bash
# Extract the seven shipped traits on SmolLM2-135M-Instruct with the default judge, then write the
# combined vector file and the cross-trait report. Resumable: rerun to continue after a kill.
# Usage: benchmarks/extract_traits.sh [RUNS_DIR]   (about 5-10 min per trait on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PK=${PK:-.venv/bin/personakern}
RUNS=${1:-personakern-runs}
TRAITS=${TRAITS:-"evil sycophantic hallucinating optimistic impolite apathetic humorous"}
for t in $TRAITS; do
  $PK extract --trait "$t" --out "$RUNS/$t" --n 1 --max-new-tokens 64 --batch-size 32 \
    --sweep-layers 6 9 12 15 18 --sweep-alphas 2 4 6 --sweep-questions 10 --quiet
done
files=()
for t in $TRAITS; do files+=("$RUNS/$t/vectors.safetensors"); done
$PK report "${files[@]}" --json "$RUNS/traits-report.json"
