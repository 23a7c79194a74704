#!/usr/bin/env bash
# LongBench sweep on Hydra multirun; finished runs are skipped, partial ones resume.
#
#   bash scripts/sweep_longbench.sh                                # the default grid below
#   DRY_RUN=1 bash scripts/sweep_longbench.sh                      # job table + cost estimate, runs nothing
#   bash scripts/sweep_longbench.sh --dry-run model=mistral_7b_instruct_v02 budget=128,512
#   bash scripts/sweep_longbench.sh +launcher=slurm benchmark.data_dir=/data/longbench
#
# MODELS, METHODS, BUDGETS set the grid (comma lists); an override of the same key on the command line wins.
# Every other argument is passed to `python run.py -m` (launchers, data_dir, protocol, results_root, ...).
set -euo pipefail

MODELS=${MODELS:-llama3_8b_instruct}
METHODS=${METHODS:-fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv}
BUDGETS=${BUDGETS:-128,256,512,1024}
PYTHON=${PYTHON:-python}

mode=run
[[ ${DRY_RUN:-0} == 1 ]] && mode="plan --dry-run"
# shellcheck disable=SC2086  # $mode is two words on purpose
exec "$PYTHON" -m kvbench.sweep $mode \
    --default benchmark=longbench --default "model=$MODELS" --default "method=$METHODS" \
    --default "budget=$BUDGETS" "$@"
