"""The packed prefill of batched runs (`engine.prefill_packed`): several prompts in one forward, each attending and
compressed as alone. On every tiny architecture (full, sliding-window, chunked, soft-capped and sink layers), with
the sdpa and eager backends, each prompt keeps the positions, per-layer tokens and method record of its batch-1
prefill, and its cache and last logits differ from batch 1's only in the last bits."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from conftest import model_spec, random_prompt
from kvbench.batching import fork_method
from kvbench.engine import prefill, prefill_packed
from kvbench.models import load_model
from test_methods_generic import paper

LENGTHS = (70, 41, 96, 130)  # above the tiny models' 64-token sliding windows and chunks, and the budget
CASES = [("tiny_llama", "snapkv"), ("tiny_llama", "adakv"), ("tiny_llama", "kvzip"), ("tiny_llama", "h2o"),
         ("tiny_llama", "cake"), ("tiny_gemma3", "snapkv"), ("tiny_mistral_sliding", "pyramidkv"),
         ("tiny_qwen2_sliding", "adakv"), ("tiny_llama4", "tova"), ("tiny_qwen3", "expected_attention"),
         ("tiny_phi3", "knorm"), ("tiny_gemma2", "streamingllm"), ("tiny_gpt_oss", "streamingllm")]
NATIVE_EAGER = {"tiny_gemma2", "tiny_gpt_oss"}  # sdpa cannot compute their attention: eager in both rows
ALL_LOCAL = {"tiny_mistral_sliding", "tiny_phi3"}  # every layer slides: the method compresses the local layers


@functools.lru_cache(maxsize=None)
def model_with(name: str, impl: str):
    return load_model(dataclasses.replace(model_spec(name), attn_implementation=impl), "cpu")


RUNS = [(name, method, impl) for name, method in CASES for impl in ("sdpa", "eager")
        if impl == "sdpa" or name not in NATIVE_EAGER]


@pytest.mark.parametrize("name,method_name,impl", RUNS, ids=["-".join(run) for run in RUNS])
def test_packed_prefill_keeps_what_each_prompt_keeps_alone(name, method_name, impl):
    model, tok = model_with(name, impl)
    method = paper(method_name, budget=24, **({"local_layers": "compress"} if name in ALL_LOCAL else {}))
    if method.needs_model:
        method.bind(model, tok)
    prompts = [random_prompt(n, model.config.vocab_size, seed=50 + i) for i, n in enumerate(LENGTHS)]
    alone = []
    for prompt in prompts:
        state = prefill(model, prompt, method)
        alone.append((state, method.record()))
    methods = [fork_method(method) for _ in prompts]
    packed = prefill_packed(model, prompts, methods)
    for (one, record), many, own in zip(alone, packed, methods):
        assert many.prompt_tokens == one.prompt_tokens
        assert many.cache.kept_positions() == one.cache.kept_positions()
        assert many.cache.tokens_per_head() == one.cache.tokens_per_head()
        assert own.record() == record
        assert (many.logits - one.logits).abs().max().item() < 1e-4
        assert int(many.logits.argmax()) == int(one.logits.argmax())
        for a, b in zip(one.cache.layers, many.cache.layers):
            torch.testing.assert_close(b.keys, a.keys, rtol=0, atol=1e-4)
            torch.testing.assert_close(b.values, a.values, rtol=0, atol=1e-4)
    if method_name != "streamingllm":
        assert any(state.cache.any_compressed() for state in packed)


def test_packed_prefill_shares_its_time_by_prompt_length(tiny_llama):
    model, _ = tiny_llama
    prompts = [random_prompt(n, model.config.vocab_size, seed=n) for n in (30, 90)]
    states = prefill_packed(model, prompts, [paper("snapkv", budget=24) for _ in prompts])
    assert states[1].prefill_s == pytest.approx(3 * states[0].prefill_s)
