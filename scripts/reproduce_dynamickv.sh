#!/usr/bin/env bash
# The DynamicKV paper's LongBench grid: 4 models x 6 methods x budgets 64..2048, protocol dynamickv
# (FullKV runs once per model: it ignores the budget). Finished runs are skipped, partial ones resume.
#
#   DRY_RUN=1 bash scripts/reproduce_dynamickv.sh                  # 144 jobs, cost estimate, runs nothing
#   bash scripts/reproduce_dynamickv.sh benchmark.data_dir=/data/longbench                  # one GPU, in turn
#   bash scripts/reproduce_dynamickv.sh +launcher=slurm benchmark.data_dir=/shared/longbench  # SLURM array
#
# Arguments are passed to `python run.py -m`; an override of a grid key (model=..., budget=...) narrows it.
set -euo pipefail

PYTHON=${PYTHON:-python}
MODELS=llama3_8b_instruct,mistral_7b_instruct_v02,qwen2_7b_instruct,internlm25_7b_chat_1m
METHODS=fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv
BUDGETS=64,96,128,256,512,1024,2048

mode=run
[[ ${DRY_RUN:-0} == 1 ]] && mode="plan --dry-run"
# shellcheck disable=SC2086  # $mode is two words on purpose
exec "$PYTHON" -m kvbench.sweep $mode \
    --default benchmark=longbench --default protocol=dynamickv --default "model=$MODELS" \
    --default "method=$METHODS" --default "budget=$BUDGETS" "$@"
