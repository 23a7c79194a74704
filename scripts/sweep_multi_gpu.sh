#!/usr/bin/env bash
# Run a sweep on every GPU of one machine: one `python run.py -m` process per GPU (CUDA_VISIBLE_DEVICES=i),
# each with its share of the remaining jobs (balanced by estimated cost). Finished runs are skipped.
#
#   bash scripts/sweep_multi_gpu.sh model=llama3_8b_instruct method=snapkv,dynamickv budget=64,128,256
#   NUM_GPUS=4 DRY_RUN=1 bash scripts/sweep_multi_gpu.sh ...       # the split and its cost, runs nothing
#
# NUM_GPUS defaults to the GPUs nvidia-smi lists. Arguments are Hydra overrides for `python run.py -m`.
set -euo pipefail

PYTHON=${PYTHON:-python}
if [[ -z ${NUM_GPUS:-} ]]; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ ${NUM_GPUS:-0} -lt 1 ]]; then
    echo "error: no GPU found; set NUM_GPUS=N (or use scripts/sweep_longbench.sh on one device)" >&2
    exit 2
fi

args=()
for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then DRY_RUN=1; else args+=("$arg"); fi
done
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec "$PYTHON" -m kvbench.sweep plan --dry-run --shards "$NUM_GPUS" ${args[@]+"${args[@]}"}
fi

# Hydra's multirun folders (<results_root>/.multirun/<time to the microsecond>) are separate per process.
pids=()
for ((gpu = 0; gpu < NUM_GPUS; gpu++)); do
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" -m kvbench.sweep run --shards "$NUM_GPUS" --shard-index "$gpu" \
        ${args[@]+"${args[@]}"} \
        > >(sed "s/^/[gpu$gpu] /") 2>&1 &
    pids+=($!)
done
status=0
for ((gpu = 0; gpu < NUM_GPUS; gpu++)); do
    if ! wait "${pids[$gpu]}"; then
        echo "[gpu$gpu] failed; rerun the same command to resume (finished jobs are skipped)" >&2
        status=1
    fi
done
exit $status
