"""The hot path's explicit channels: the engine declares each forward's phase, the wrapper dispatches on it (a shape
that contradicts it is an error, not another path), and ragged layers are found through the session's cache."""
from __future__ import annotations

import copy

import pytest
import torch

import kvbench.ragged
from conftest import random_prompt
from kvbench.attention import Phase, compression, decoding
from kvbench.cache import cache_kwargs
from kvbench.engine import decode_step, new_cache, prefill
from kvbench.methods import build_method
from kvbench.ragged import RaggedLayer


def test_a_multi_token_forward_declared_as_decoding_is_refused(tiny_llama):
    """Several tokens in a DECODE session used to be taken silently for a question forward."""
    model, tok = tiny_llama
    state = prefill(model, random_prompt(100, len(tok), seed=1), build_method("snapkv", budget=32, window_size=8))
    with pytest.raises(AssertionError, match="decode: 3 new tokens"), decoding(state.cache):
        model(input_ids=random_prompt(3, len(tok), seed=2), position_ids=torch.arange(100, 103)[None],
              use_cache=True, **cache_kwargs(model, state.cache))


def test_a_prefill_over_a_filled_cache_is_refused(tiny_llama):
    """A forward over a filled cache in a prefill session used to be shown to the method as an observation pass."""
    model, tok = tiny_llama
    method = build_method("snapkv", budget=32, window_size=8)
    state = prefill(model, random_prompt(100, len(tok), seed=1), method)
    with (pytest.raises(AssertionError, match=r"prefill: layer 0 returned \d+ keys for 5 queries"),
          compression(method, state.cache)):
        model(input_ids=random_prompt(5, len(tok), seed=2), position_ids=torch.arange(100, 105)[None],
              use_cache=True, **cache_kwargs(model, state.cache))


def test_observation_passes_are_declared_after_the_prefill_only(tiny_llama):
    model, _ = tiny_llama
    method = build_method("snapkv", budget=32, window_size=8)
    cache = new_cache(model, method)
    with compression(method, cache) as session:
        assert session.phase is Phase.PREFILL
        session.observe()
        assert session.phase is Phase.OBSERVE
        with pytest.raises(RuntimeError, match="follow a prefill"):
            session.observe()
    with decoding(cache) as session, pytest.raises(RuntimeError, match="follow a prefill"):
        session.observe()
    with pytest.raises(ValueError, match="DECODE or QUESTION"):
        decoding(cache, phase=Phase.PREFILL)


def test_ragged_layers_are_found_through_the_cache_not_a_global_table(tiny_llama):
    """A shallow copy of a ragged layer shares its prefix tensors; put into the cache, it is the layer that attends
    (the old `id(key)` table found the original, with a stale tail, unless the copy was registered)."""
    model, tok = tiny_llama
    assert not hasattr(kvbench.ragged, "_LIVE") and not hasattr(kvbench.ragged, "layer_of")
    ids = random_prompt(300, len(tok), seed=12)
    runs = []
    for copied in (False, True):
        state = prefill(model, ids, build_method("adakv", budget=64, window_size=8))
        originals = list(state.cache.layers)
        assert all(isinstance(layer, RaggedLayer) for layer in originals)
        if copied:
            for i, layer in enumerate(originals):
                state.cache.layers[i] = copy.copy(layer)
        token = state.logits.argmax(-1, keepdim=True)
        logits = []
        for step in range(3):
            logits.append(decode_step(model, token, 300 + step, state.cache))
            token = logits[-1].argmax(-1, keepdim=True)
        runs.append(torch.stack(logits))
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
