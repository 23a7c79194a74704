"""kvbench's decoding-time compression against kvpress 0.5.5's DecodingPress, run unmodified
(scripts/golden/kvpress_055_decoding.py; tests/golden/decoding/FORMAT.md): at every compression step, every layer
and KV head keeps the positions kvpress keeps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from kvbench.attention import register
from kvbench.decoding import schedule_for
from kvbench.engine import decode_step, prefill
from kvbench.methods import registry

GOLDEN = Path(__file__).parent / "golden" / "decoding"
CASES = sorted(GOLDEN.glob("*.json"))


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM.from_pretrained(GOLDEN / "tiny_llama", attn_implementation=register("sdpa")).eval()


def method_of(case: dict):
    settings = dict(case["kvbench"])
    name = settings.pop("method")
    target = case["target_size"]
    if name == "streamingllm":  # n_sink first tokens plus the most recent ones
        settings["window_size"] = target - settings.pop("sinks")
    return registry.build(name, budget=target, decode_interval=case["compression_interval"], **settings)


def kvbench_cuts(model, case: dict) -> list[dict]:
    method = method_of(case)
    prompt = torch.tensor([case["prompt"]])
    state = prefill(model, prompt, method)
    schedule = schedule_for(method, model, record_kept=True)
    n = prompt.shape[1]
    for step, token in enumerate(case["forced_tokens"]):
        decode_step(model, torch.tensor([[token]]), n + step, state.cache, schedule)
    return schedule.history


def as_sets(kept_per_layer) -> list[list[list[int]]]:
    return [[sorted(head) for head in layer] for layer in kept_per_layer]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_kept_positions_match_kvpress(model, path):
    case = json.loads(path.read_text())
    ours = kvbench_cuts(model, case)
    assert len(ours) == len(case["cuts"]) > 2
    streaming = case["kvbench"]["method"] == "streamingllm"
    for k, (mine, theirs) in enumerate(zip(ours, case["cuts"])):
        got = [mine[i] for i in sorted(mine)]
        if streaming and k > 0:
            # kvpress keeps the first n_sink *rows*, no longer the first tokens after its first cut (documented in
            # kvbench.decoding); kvbench keeps StreamingLLM's sinks and the most recent tokens.
            sinks, last = case["kvbench"]["sinks"], theirs["position"]
            rule = list(range(sinks)) + list(range(last - (case["target_size"] - sinks) + 1, last + 1))
            assert all(head == rule for layer in as_sets(got) for head in layer), f"cut {k}: not sinks + recent"
            assert as_sets(theirs["kept_positions"]) != as_sets(got)  # the documented kvpress difference
            continue
        assert as_sets(got) == as_sets(theirs["kept_positions"]), f"cut {k} (step {theirs['step']}) differs"
        if case["kvbench"].get("decode_style") == "kvpress":  # and kvpress's row order, which later cuts read
            assert got == theirs["kept_positions"], f"cut {k}: row order differs"
