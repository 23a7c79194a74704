"""benchmarks/bench_batching.py's GPU mode, run on CPU with a tiny shape (`--gpu-smoke`): the same code as `--gpu`
(random prompts, batch 1 against batch N, the goal check, the varlen check's report) writes its record."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_mode_smoke_run_writes_the_batching_record(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_batching
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert bench_batching.main(["--gpu-smoke", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "latest_batching_gpu_smoke.json").read_text())
    rows = record["workloads"]["random"]["methods"]["snapkv_128"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert all(r["same_tokens_as_batch_1"] == r["samples"] == 4 for r in rows)
    assert rows[1]["packed_prefills"] >= 1 and rows[0]["packed_prefills"] == 0
    assert record["varlen"] == {"ran": False, "why": "no GPU"}
    assert record["settings"]["prompt_tokens"] == 300 and "goal" not in record  # the goal is batch 16's
