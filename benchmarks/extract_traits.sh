#!/usr/bin/env bash
# Extract the seven shipped traits on SmolLM2-135M-Instruct with the default judge, then write the
# cross-trait report, the table in docs/extraction.md and the combined vector file. Resumable: rerun to continue
# after a kill (every stage is cached in RUNS_DIR/<trait>).
# Usage: benchmarks/extract_traits.sh [RUNS_DIR]
#   TRAITS="evil ..."   which traits (default: all seven)
#   SIZE="..."          extract options for the size of the run; the default is what produced the
#                       table in docs/extraction.md on 2 CPU cores (12 extraction and 12 evaluation questions,
#                       48 new tokens, held-out answers under all 5 instruction pairs: 60 answers
#                       per side for the vectors, 60 per side held out, ~15 min per trait on one core)
#   LANES=2             traits extracted in parallel (one thread each)
set -euo pipefail
cd "$(dirname "$0")/.."
PK=${PK:-$PWD/.venv/bin/personakern}
PY=${PY:-$PWD/.venv/bin/python}
RUNS=${1:-personakern-runs}
TRAITS=${TRAITS:-"evil sycophantic hallucinating optimistic impolite apathetic humorous"}
SIZE=${SIZE:-"--questions 12 --max-new-tokens 48 --heldout-pairs 5"}
LANES=${LANES:-2}
export HF_HUB_OFFLINE=1
one() {
  OMP_NUM_THREADS=1 $PK extract --trait "$1" --out "$RUNS/$1" --n 1 $SIZE --batch-size 32 \
    --sweep-layers 6 10 14 18 22 --sweep-alphas 3 6 --sweep-questions 10 --quiet > "$RUNS/$1.log" 2>&1 \
    || { echo "extract $1 failed: see $RUNS/$1.log" >&2; return 1; }
  echo "$1 done"
}
export -f one; export PK RUNS SIZE
mkdir -p "$RUNS"
printf '%s\n' $TRAITS | xargs -P "$LANES" -I{} bash -c 'one {}'
files=()
for t in $TRAITS; do files+=("$RUNS/$t/vectors.safetensors"); done
$PK report "${files[@]}" --json "$RUNS/traits-report.json" --png "$RUNS/traits-report.png"
$PY benchmarks/traits_table.py "${files[@]}" --save "$RUNS/smollm2-traits.safetensors"
