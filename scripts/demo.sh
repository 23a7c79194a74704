#!/usr/bin/env bash
# The first thing a new user runs (`make demo`): SmolLM2-135M on CPU, all six methods at budget 64, on a few
# samples of the three LongBench tasks beside the repository and a small needle grid; then the LongBench
# table and the stacked needle heatmap. Reruns skip finished work.
#   LONGBENCH_DIR=/path/to/longbench/data LIMIT=5 BUDGET=128 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LONGBENCH_DIR=${LONGBENCH_DIR:-../shared/data/longbench}
LIMIT=${LIMIT:-2}
BUDGET=${BUDGET:-64}
OUT=${OUT:-results/demo}
METHODS=fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv
start=$(date +%s)

echo "== LongBench: ${METHODS} at budget ${BUDGET}, ${LIMIT} samples per task from ${LONGBENCH_DIR}"
$PY run.py -m experiment=demo_longbench method=$METHODS budget=$BUDGET benchmark.limit=$LIMIT \
    benchmark.data_dir="$LONGBENCH_DIR" results_root="$OUT"
echo "== Needle-in-a-Haystack: ${METHODS} at budget ${BUDGET}"
$PY run.py -m experiment=demo_needle method=$METHODS budget=$BUDGET results_root="$OUT"

echo "== Report"
$PY -m kvbench.report "$OUT" --out "$OUT/report"
needle_runs=()
for m in ${METHODS//,/ }; do
  if [ "$m" = fullkv ]; then needle_runs+=("$OUT/smollm2_135m/needle/fullkv"); else needle_runs+=("$OUT/smollm2_135m/needle/${m}_${BUDGET}"); fi
done
$PY -m kvbench.needle.plot "${needle_runs[@]}" --stacked "$OUT/report/needle_stacked.png"

echo
echo "Demo finished in $(( $(date +%s) - start )) s."
echo "  predictions, scores.json, run.json: $OUT/smollm2_135m/{longbench,needle}/<method>_<budget>/"
echo "  tables and figures:                 $OUT/report/ (needle_stacked.png: the six heatmaps)"
