"""Per-head variable-length cache layers (kvbench.ragged): attention equals a dense masked reference, bytes are
exactly the tokens kept, and a ragged layer with equal lengths decodes like the dense layer."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import CompressedCache
from kvbench.engine import decode_step, generate, prefill
from kvbench.methods import build_method
from kvbench.methods.base import ScoredMethod
from kvbench.ragged import RaggedLayer, ragged_attention


def dense_reference(query, per_head_keys, per_head_values, scaling=None) -> torch.Tensor:
    """The reference: pad every head to the longest, mask the padding, one softmax. query [1,H,m,d];
    per_head_keys: S tensors [len_s, d] whose last m rows are the queries' own tokens. Returns [1, m, H, d]."""
    _, heads, m, d = query.shape
    stored = len(per_head_keys)
    longest = max(k.shape[0] for k in per_head_keys)
    keys = torch.zeros(stored, longest, d, dtype=torch.float64)
    values = torch.zeros(stored, longest, d, dtype=torch.float64)
    allowed = torch.zeros(stored, m, longest, dtype=torch.bool)
    for s, (k, v) in enumerate(zip(per_head_keys, per_head_values)):
        n = k.shape[0]
        keys[s, :n], values[s, :n] = k.double(), v.double()
        for i in range(m):
            allowed[s, i, : n - m + i + 1] = True
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    group = heads // stored
    kv = torch.arange(heads) // group
    logits = torch.einsum("hmd,hnd->hmn", query[0].double(), keys[kv]) * scale
    logits = logits.masked_fill(~allowed[kv], float("-inf"))
    out = torch.einsum("hmn,hnd->hmd", torch.softmax(logits, dim=-1), values[kv])
    return out.transpose(0, 1).unsqueeze(0)


def make_layer(lengths, heads_stored, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, d, generator=gen) for n in lengths]
    values = [torch.randn(n, d, generator=gen) for n in lengths]
    positions = [torch.arange(n) for n in lengths]
    assert len(lengths) == heads_stored
    return RaggedLayer(keys, values, positions), keys, values


@pytest.mark.parametrize("heads, stored, m", [(6, 6, 1), (6, 2, 1), (6, 2, 4), (4, 4, 3), (8, 1, 1)])
def test_ragged_attention_equals_dense_masked_reference(heads, stored, m):
    gen = torch.Generator().manual_seed(heads * 10 + stored + m)
    lengths = torch.randint(0, 40, (stored,), generator=gen).tolist()
    lengths[0] = 0  # a head that kept no prompt token at all
    layer, keys, values = make_layer(lengths, stored, seed=m)
    new_k, new_v = torch.randn(1, stored, m, 16, generator=gen), torch.randn(1, stored, m, 16, generator=gen)
    flat_k, _ = layer.update(new_k, new_v)
    assert flat_k is layer.prefix_keys  # what the wrapper checks for the layer it found in the cache
    query = torch.randn(1, heads, m, 16, generator=gen)
    got = layer.attend(query)
    want = dense_reference(query, [torch.cat([k, new_k[0, s]]) for s, k in enumerate(keys)],
                           [torch.cat([v, new_v[0, s]]) for s, v in enumerate(values)])
    assert got.shape == (1, m, heads, 16)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_is_not_trivially_equal():
    """The reference check fails when one head's tokens are swapped with another's (the test can fail)."""
    layer, keys, values = make_layer([5, 9, 3], 3)
    layer.update(torch.ones(1, 3, 1, 16), torch.ones(1, 3, 1, 16))
    query = torch.randn(1, 3, 1, 16, generator=torch.Generator().manual_seed(1))
    swapped = [keys[1], keys[0], keys[2]]
    swapped_v = [values[1], values[0], values[2]]
    want = dense_reference(query, [torch.cat([k, torch.ones(1, 16)]) for k in swapped],
                           [torch.cat([v, torch.ones(1, 16)]) for v in swapped_v])
    assert not torch.allclose(layer.attend(query).double(), want, atol=1e-3)


def test_bytes_are_exactly_the_tokens_kept():
    layer, _, _ = make_layer([3, 10, 0, 7], 4, d=8)
    assert layer.nbytes() == 2 * 20 * 8 * 4 and layer.tokens() == 20
    layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))  # KV heads expanded to the 4 stored heads
    assert layer.nbytes() == 2 * 24 * 8 * 4 and layer.tokens_per_head() == 6
    assert layer.kept_positions() == [[0, 1, 2], list(range(10)), [], list(range(7))]


class EqualCountsRagged(ScoredMethod):
    """SnapKV-like scores (key norms) but stored through the ragged path even though every head keeps the same
    number of tokens: decoding must match the dense path."""
    name = "equal_counts_ragged"

    def score(self, rank, queries, keys):
        scores = keys[0].norm(dim=-1)[:, : keys.shape[2] - self.window_size]
        return scores.repeat_interleave(queries.shape[1] // keys.shape[1], dim=0)

    def select_and_store(self, cache, rank, scores, counts, keys, values):
        order = scores.topk(counts, dim=-1).indices
        if self.force_ragged:
            self.keep_ragged(cache, rank, list(order), keys, values)
        else:
            self.keep_tokens(cache, rank, order, keys, values)


@pytest.mark.parametrize("cache_heads", ["per_query_head", "per_kv_head"])
def test_ragged_layer_decodes_like_the_dense_layer(tiny_llama, cache_heads):
    model, tok = tiny_llama
    ids = random_prompt(200, len(tok), seed=11)
    outs = []
    for force in (False, True):
        method = EqualCountsRagged(budget=48, window_size=8, cache_heads=cache_heads)
        method.force_ragged = force
        state = prefill(model, ids, method)
        assert isinstance(state.cache.layers[0], RaggedLayer) == force
        logits = [state.logits]
        token = state.logits.argmax(-1, keepdim=True)
        for step in range(4):
            logits.append(decode_step(model, token, 200 + step, state.cache))
            token = logits[-1].argmax(-1, keepdim=True)
        outs.append((torch.stack(logits), state.cache.nbytes(), state.cache.kept_positions()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    assert outs[0][1] == outs[1][1] and outs[0][2] == outs[1][2]


def test_adakv_on_a_model_holds_different_lengths_per_head_and_decodes(tiny_llama):
    model, tok = tiny_llama
    ids = random_prompt(300, len(tok), seed=12)
    method = build_method("adakv", budget=64, window_size=8)
    out = generate(model, ids, method, max_new_tokens=5)
    budgets = out.method_record["head_budgets"]
    assert len(budgets) == model.config.num_hidden_layers
    assert any(len(set(layer)) > 1 for layer in budgets), "adaptive budgets should differ between heads"
    heads = model.config.num_attention_heads
    elem = 4 * model.config.hidden_size // heads
    assert out.kv_bytes == 2 * elem * sum(sum(layer) + heads * 8 for layer in budgets)
    assert len(out.token_ids) == 5
