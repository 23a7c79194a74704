"""The engine and the mechanism on real (tiny, random-weight) models: exactness against `generate`, positions,
cache sizes and bytes, and untouched prefill outputs."""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompt
from kvbench.attention import compression
from kvbench.cache import CompressedCache
from kvbench.cache import cache_kwargs
from kvbench.engine import generate
from kvbench.errors import KvbenchError
from kvbench.methods import METHODS, build_method

PROMPT = 300
NEW = 12


def reference_tokens(model, ids, new=NEW):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_fullkv_reproduces_generate(tiny):
    model, tok = tiny
    ids = random_prompt(PROMPT, len(tok))
    assert generate(model, ids, None, max_new_tokens=NEW).token_ids == reference_tokens(model, ids)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "fullkv"])
def test_budget_not_below_prompt_reproduces_generate(tiny, name):
    model, tok = tiny
    ids = random_prompt(PROMPT, len(tok), seed=1)
    out = generate(model, ids, build_method(name, budget=PROMPT, window_size=8), max_new_tokens=NEW)
    assert out.token_ids == reference_tokens(model, ids)
    assert out.layer_kept == [PROMPT] * model.config.num_hidden_layers


def test_stop_tokens_and_min_new_tokens(tiny_llama):
    model, tok = tiny_llama
    ids = random_prompt(PROMPT, len(tok), seed=2)
    free = generate(model, ids, None, max_new_tokens=NEW).token_ids
    stopped = generate(model, ids, None, max_new_tokens=NEW, stop_token_ids=[free[3]])
    assert stopped.token_ids == free[: free.index(free[3]) + 1] and stopped.stopped == "stop_token"
    forced = generate(model, ids, None, max_new_tokens=NEW, stop_token_ids=[free[0]], min_new_tokens=1)
    assert forced.token_ids[0] != free[0]


def test_first_decoded_token_uses_original_position(tiny_llama):
    model, tok = tiny_llama
    ids = random_prompt(PROMPT, len(tok), seed=3)
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        kwargs["position_ids"].flatten().tolist()), with_kwargs=True)
    try:
        out = generate(model, ids, build_method("snapkv", budget=64, window_size=8), max_new_tokens=3)
    finally:
        hook.remove()
    assert out.layer_kept == [64] * model.config.num_hidden_layers
    assert seen[0] == list(range(PROMPT))
    assert seen[1] == [PROMPT] and seen[2] == [PROMPT + 1]


def expected_kept(name: str, budget: int, window: int, layers: int, n: int) -> list[int]:
    if name == "fullkv":
        return [n] * layers
    if name == "pyramidkv":
        base = budget - window
        low = base // 20
        high = 2 * base - low
        steps = (high - low) // (layers - 1)
        return [high - i * steps + window for i in range(layers)]
    return [budget] * layers


@pytest.mark.parametrize("cache_heads", ["per_query_head", "per_kv_head"])
@pytest.mark.parametrize("budget", [24, 64])
@pytest.mark.parametrize("name", list(METHODS))
def test_cache_sizes_and_bytes_follow_the_formula(tiny_llama, name, budget, cache_heads):
    model, tok = tiny_llama
    cfg = model.config
    ids = random_prompt(PROMPT, len(tok), seed=4)
    params = {} if name == "fullkv" else {"budget": budget, "window_size": 8, "cache_heads": cache_heads}
    method = build_method(name, **params)
    method.bind(model, tok)  # Expected Attention and KVzip need the model (the pipeline binds every method)
    out = generate(model, ids, method, max_new_tokens=1)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    heads = cfg.num_attention_heads if cache_heads == "per_query_head" and name != "fullkv" else cfg.num_key_value_heads
    if name == "dynamickv":  # per-layer sizes vary; the total is the budget (4 layers: one final update)
        assert sum(out.layer_kept) == budget * cfg.num_hidden_layers
    elif name == "chunkkv":  # whole chunks: the prefix counts the method recorded, plus the window
        assert out.layer_kept == [count + 8 for count in method.layer_counts]
    elif name == "layer_defensivekv":  # one ranking over all layers and heads: the total is the budget
        assert sum(out.layer_kept) == pytest.approx(budget * cfg.num_hidden_layers)
    elif name in ("cake", "kvzip"):  # per-layer sizes vary; rounding can leave the total a little below the budget
        assert budget * cfg.num_hidden_layers - 4 <= sum(out.layer_kept) <= budget * cfg.num_hidden_layers
        assert min(out.layer_kept) >= 8
    else:
        assert out.layer_kept == expected_kept(name, budget, 8, cfg.num_hidden_layers, PROMPT)
    assert out.kv_bytes == sum(out.layer_kept) * heads * head_dim * 2 * 4  # keys + values, float32


@pytest.mark.parametrize("name", [m for m in METHODS if m != "fullkv"])
def test_methods_never_change_prefill_logits(tiny_llama, name):
    model, tok = tiny_llama
    ids = random_prompt(PROMPT, len(tok), seed=5)
    with torch.inference_mode():
        plain = model(ids).logits
        method = build_method(name, budget=48, window_size=8)
        method.bind(model, tok)
        cache = CompressedCache(model.config.num_hidden_layers)
        method.begin(PROMPT, len(cache.layers))
        with compression(method, cache) as session:
            compressed = model(ids, use_cache=True, **cache_kwargs(model, cache)).logits
            session.observe()  # as the engine does (KVzip compresses in its passes here)
            method.after_prefill(model, ids, cache)
    assert cache.tokens_per_head()[0] < PROMPT  # it did compress
    assert torch.equal(plain, compressed)


def test_methods_keep_no_state_across_samples(tiny_llama):
    model, tok = tiny_llama
    method = build_method("dynamickv", budget=64, window_size=8)
    for seed, n in enumerate([300, 200, 400]):
        out = generate(model, random_prompt(n, len(tok), seed), method, max_new_tokens=2)
        assert sum(out.layer_kept) == 64 * model.config.num_hidden_layers
        assert len(method.allocations) == 1


def test_fraction_budget_resolves_per_prompt(tiny_llama):
    model, tok = tiny_llama
    out = generate(model, random_prompt(PROMPT, len(tok), 6), build_method("snapkv", budget=0.2, window_size=8),
                   max_new_tokens=1)
    assert out.layer_kept == [round(0.2 * PROMPT)] * model.config.num_hidden_layers


@pytest.mark.slow  # loads the 135M GGUF (~1 min on 2 cores): make test-slow; tiny models cover every arch fast
def test_smollm2_fullkv_reproduces_generate(smollm2):
    model, tok = smollm2
    story = "The quick brown fox jumps over the lazy dog while the farmer sleeps. " * 30
    messages = [{"role": "user", "content": story + "What does the fox do? Answer in one sentence."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    stop = [tok.eos_token_id]
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          eos_token_id=stop, pad_token_id=stop[0])[0, ids.shape[1]:].tolist()
    got = generate(model, ids, None, max_new_tokens=24, stop_token_ids=stop).token_ids
    assert len(want) > 5 and got == want


def test_a_model_that_bypasses_the_attention_interface_is_an_error_not_a_silent_fullkv(tiny_llama):
    model, tok = tiny_llama
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # stock attention: our hook never runs
    try:
        with pytest.raises(KvbenchError, match="did not compress any layer"):
            generate(model, random_prompt(PROMPT, len(tok)), build_method("snapkv", budget=64), max_new_tokens=1)
    finally:
        model.set_attn_implementation(previous)
    assert model.config._attn_implementation == previous


def test_generate_requests_answers_each_request_as_generate_does(tiny_llama):
    """The pipeline's one entry to the engine: every request answered, in order at batch 1, tokens as `generate`."""
    from kvbench.scheduler import generate_requests
    from kvbench.methods import build_method
    from kvbench.requests import Request
    model, _ = tiny_llama
    method = build_method("snapkv", budget=24, window_size=8, kernel_size=5)
    prompts = [random_prompt(n, model.config.vocab_size, seed=n) for n in (40, 57)]
    requests = [Request(p[0].tolist(), max_new_tokens=6, key=i) for i, p in enumerate(prompts)]
    requests.append(Request(prompts[0][0, :30].tolist(), 6, question_ids=prompts[0][0, 30:].tolist(), key=2))
    got = list(generate_requests(model, requests, method))
    assert [r.key for r, _ in got] == [0, 1, 2]
    for (request, out), prompt in zip(got[:2], prompts):
        assert out.token_ids == generate(model, prompt, method, max_new_tokens=6).token_ids
    agnostic = generate(model, prompts[0][:, :30], method, max_new_tokens=6, question_ids=prompts[0][:, 30:])
    assert got[2][1].token_ids == agnostic.token_ids
