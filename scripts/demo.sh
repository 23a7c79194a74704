#!/usr/bin/env bash
# The first thing a new user runs (`make demo`, about 10 minutes on 2 cores): SmolLM2-135M on CPU, FullKV and the five
# compressing methods of 2024 on
#   - RULER (generated offline) at 1024 and 2048 tokens, a few tasks, RULER_SAMPLES samples each,
#   - the needle grid (1000/2000 tokens x 4 depths), query-aware and, with QUERY=both, query-agnostic,
#   - LongBench multi_news (LIMIT samples; the other shared files are Chinese, where a 135M English model scores 0),
#     under LongBench's official pred.py template (chat; under the papers' raw prompt SmolLM2 answers with an empty
#     string) with summaries capped at 128 new tokens (benchmark.max_new_tokens, recorded; official: 512),
# then the tables (with 95% CIs) and the stacked needle heatmaps. Reruns skip finished work.
# Budgets, from measurements on this model: at 128 tokens the needle separates the methods (FullKV 0.91, SnapKV
# 0.55, PyramidKV 0.51, DynamicKV 0.39, StreamingLLM 0.35, H2O 0.24 on the 1k-4k grid); RULER needs more (DynamicKV
# at 1024 tokens: 0.6 at budget 128, 35 at 512, FullKV 58-78), so RULER runs at RULER_BUDGET=512.
#   METHODS=fullkv,snapkv LIMIT=2 BUDGET=64 QUERY=both scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LONGBENCH_DIR=${LONGBENCH_DIR:-../shared/data/longbench}
LIMIT=${LIMIT:-1}
BUDGET=${BUDGET:-128}
RULER_BUDGET=${RULER_BUDGET:-512}
RULER_SAMPLES=${RULER_SAMPLES:-1}
RULER_TASKS=${RULER_TASKS:-[niah_single_1,niah_multikey_1,vt]}
QUERY=${QUERY:-aware}          # aware | both (adds the query-agnostic needle and RULER runs)
OUT=${OUT:-results/demo}
METHODS=${METHODS:-fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv}
modes=aware; [ "$QUERY" = both ] && modes=aware,agnostic
start=$(date +%s)

echo "== RULER ${RULER_TASKS} at 1024/2048 tokens: ${METHODS} at budget ${RULER_BUDGET}, query ${modes}"
$PY run.py -m model=smollm2_135m benchmark=ruler method=$METHODS budget=$RULER_BUDGET benchmark.query=$modes \
    'benchmark.lengths=[1024,2048]' benchmark.samples=$RULER_SAMPLES "benchmark.tasks=${RULER_TASKS}" \
    results_root="$OUT"
echo "== Needle-in-a-Haystack: ${METHODS} at budget ${BUDGET}, query ${modes}"
$PY run.py -m experiment=demo_needle method=$METHODS budget=$BUDGET benchmark.query=$modes results_root="$OUT"
echo "== LongBench multi_news: ${METHODS} at budget ${BUDGET}, ${LIMIT} sample(s) from ${LONGBENCH_DIR}"
$PY run.py -m experiment=demo_longbench method=$METHODS budget=$BUDGET benchmark.limit=$LIMIT \
    benchmark.data_dir="$LONGBENCH_DIR" results_root="$OUT"

echo "== Report"
$PY -m kvbench.report "$OUT" --out "$OUT/report"
for mode in ${modes//,/ }; do
  suffix=""; [ "$mode" = agnostic ] && suffix="_agnostic"
  needle_runs=()
  for m in ${METHODS//,/ }; do
    if [ "$m" = fullkv ]; then run="fullkv${suffix}"; else run="${m}_${BUDGET}${suffix}"; fi
    needle_runs+=("$OUT/smollm2_135m/needle/$run")
  done
  $PY -m kvbench.needle.plot "${needle_runs[@]}" --stacked "$OUT/report/needle_stacked_${mode}.png"
done

echo
echo "Demo finished in $(( $(date +%s) - start )) s."
echo "  predictions, scores.json, run.json: $OUT/smollm2_135m/{ruler,needle,longbench}/<method>_<budget>[_agnostic]/"
echo "  tables and figures:                 $OUT/report/ (needle_stacked_<mode>.png: the heatmaps)"
