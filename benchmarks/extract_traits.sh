#!/usr/bin/env bash
# Extract the seven shipped traits on SmolLM2-135M-Instruct with the default judge, then write the
# cross-trait report. Resumable: rerun to continue after a kill.
# Usage: benchmarks/extract_traits.sh [RUNS_DIR]
#   TRAITS="evil ..."      which traits (default: all seven)
#   SMALL_TRAITS="..."     traits run with fewer questions and tokens (--questions 12, 48 tokens)
set -euo pipefail
cd "$(dirname "$0")/.."
PK=${PK:-.venv/bin/personakern}
RUNS=${1:-personakern-runs}
TRAITS=${TRAITS:-"evil sycophantic hallucinating optimistic impolite apathetic humorous"}
SMALL_TRAITS=${SMALL_TRAITS:-}
for t in $TRAITS; do
  size="--max-new-tokens 64"
  case " $SMALL_TRAITS " in *" $t "*) size="--questions 12 --max-new-tokens 48";; esac
  $PK extract --trait "$t" --out "$RUNS/$t" --n 1 $size --batch-size 32 \
    --sweep-layers 6 10 14 --sweep-alphas 3 6 --sweep-questions 10 --quiet
done
files=()
for t in $TRAITS; do files+=("$RUNS/$t/vectors.safetensors"); done
$PK report "${files[@]}" --json "$RUNS/traits-report.json"
