"""Real-model checks on the embedded SmolLM2 (slow: `make test-slow`)."""
from __future__ import annotations

import pytest

from conftest import SHARED_LONGBENCH
from kvbench.config import compose, output_dir
from kvbench.pipeline import evaluate
from kvbench.results import read_predictions

pytestmark = pytest.mark.slow


def test_smollm2_finds_the_needle_with_its_chat_template(tmp_path):
    """Protocol reference section 13: FullKV scores 1.0 at 1000 and 2000 tokens through the chat template."""
    cfg = compose(["benchmark=needle", "method=fullkv", f"results_root={tmp_path}", "progress=false",
                   "benchmark.grid.start=1000", "benchmark.grid.end=2000", "benchmark.grid.step=1000",
                   "benchmark.grid.depths=3"])
    scores = evaluate(cfg)
    lines = read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")
    assert [r["score"] for r in lines] == [1.0] * 6, [r["response"] for r in lines]
    assert scores["mean_score"] == 1.0


def test_smollm2_raw_needle_prompt_gives_empty_answers(tmp_path):
    """The papers' raw prompt makes SmolLM2 stop at once (why its config uses the chat prompt)."""
    cfg = compose(["benchmark=needle", "benchmark.prompt=raw", "method=fullkv", f"results_root={tmp_path}",
                   "progress=false", "benchmark.grid.start=1000", "benchmark.grid.end=1000",
                   "benchmark.grid.step=1000", "benchmark.grid.depths=2"])
    evaluate(cfg)
    assert [r["response"] for r in read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")] == ["", ""]


def test_smollm2_passage_retrieval_with_and_without_compression(tmp_path):
    """A compressed run keeps the budget in every layer and produces a real answer on real data."""
    base = [f"benchmark.data_dir={SHARED_LONGBENCH}", "benchmark.tasks=[passage_retrieval_zh]", "benchmark.limit=1",
            "model.max_input_len=2048", f"results_root={tmp_path}", "progress=false"]
    full = evaluate(compose(base + ["method=fullkv"]))
    cfg = compose(base + ["method=dynamickv", "budget=128"])
    evaluate(cfg)
    [line] = read_predictions(output_dir(cfg) / "predictions" / "passage_retrieval_zh.jsonl")
    kept = line["layer_kept"]
    # Official mode on 30 layers: the last update is at layer 27, so layers 28-29 keep the temporary maximum
    # (10 x 120 + window 8); the first 28 share the whole-model prefix budget 120 x 30 (less where the official
    # slice runs past what a layer holds).
    assert kept[28:] == [1208, 1208] and sum(kept[:28]) <= 120 * 30 + 8 * 28
    assert line["kv_bytes"] == sum(kept) * 9 * 64 * 2 * 4  # 9 query heads (official layout), head_dim 64, fp32
    assert line["new_tokens"] > 0 and full["n"]["passage_retrieval_zh"] == 1
