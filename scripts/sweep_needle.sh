#!/usr/bin/env bash
# Needle-in-a-Haystack sweep on Hydra multirun; finished runs are skipped, partial ones resume.
#
#   bash scripts/sweep_needle.sh                                   # the default grid below
#   DRY_RUN=1 bash scripts/sweep_needle.sh                         # job table + cost estimate, runs nothing
#   bash scripts/sweep_needle.sh model=mistral_7b_instruct_v02 benchmark/grid=mistral method=snapkv,dynamickv
#
# MODELS, METHODS, BUDGETS, GRID set the sweep (GRID: a configs/benchmark/grid/ file: cpu, demo, llama3,
# mistral); an override of the same key on the command line wins. Other arguments go to `python run.py -m`.
set -euo pipefail

MODELS=${MODELS:-llama3_8b_instruct}
METHODS=${METHODS:-fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv}
BUDGETS=${BUDGETS:-128}
GRID=${GRID:-llama3}
PYTHON=${PYTHON:-python}

mode=run
[[ ${DRY_RUN:-0} == 1 ]] && mode="plan --dry-run"
# shellcheck disable=SC2086  # $mode is two words on purpose
exec "$PYTHON" -m kvbench.sweep $mode \
    --default benchmark=needle --default "benchmark/grid=$GRID" --default "model=$MODELS" \
    --default "method=$METHODS" --default "budget=$BUDGETS" "$@"
