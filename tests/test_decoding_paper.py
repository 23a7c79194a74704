"""The papers' own decoding-time algorithms as kvbench settings (decode_interval=1), checked on synthetic inputs
against the official algorithms written out from their code (../shared/reference/decoding-and-sessions.md; the
official repositories patch transformers 4.x attention classes, which do not run on this transformers):
- TOVA, `TOVACache.reduce` (schwartz-lab-NLP/TOVA @9c7d09b): once a layer holds more than `cache_size` tokens, the
  last query row, averaged over all query heads (one score per token, its own column included), keeps the top
  `cache_size`; one token leaves per decoding step. kvbench: `method=tova window_size=0 decode_interval=1`.
- StreamingLLM, `StartRecentKVCache` as `eval_long_ppl.py` calls it after every token (mit-han-lab/streaming-llm
  @2e50426): the first `start_size` plus the last `recent_size` tokens. kvbench: `method=streamingllm
  budget=start+recent window_size=recent decode_interval=1` (keys keep their true positions; the official code
  re-rotates them to their cache slots: a documented deviation, the kept tokens are the same).
"""
from __future__ import annotations

import math

import torch

from kvbench.cache import CompressedCache
from kvbench.decoding import DecodeSchedule, positions_held
from kvbench.methods import registry

H, H_KV, D, LAYERS = 8, 2, 16, 2


def synthetic(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, n, D, generator=g), torch.randn(1, H_KV, n, D, generator=g),
            torch.randn(1, H_KV, n, D, generator=g))


def run_kvbench(method, prompt: int, steps: int, seed: int = 0):
    """Prefill `prompt` synthetic tokens through the method, then one token per step through the schedule.
    Returns per step, per layer, the set of positions held (the same in every head for these methods)."""
    q, k, v = synthetic(seed, prompt + steps)
    cache = CompressedCache(LAYERS)
    method.begin(prompt, LAYERS)
    for layer in range(LAYERS):
        cache.update(k[:, :, :prompt], v[:, :, :prompt], layer)
        method.compress_layer(layer, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], cache)
    schedule = DecodeSchedule(method, 1)
    held = []
    for t in range(prompt, prompt + steps):
        schedule.begin_forward(t, 1)
        for layer in range(LAYERS):
            cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], layer)
            schedule.after_attention(cache, layer, q[:, :, t:t + 1], {})
        schedule.end_forward(cache)
        per_layer = []
        for layer in cache.layers:
            heads = {tuple(sorted(h)) for h in positions_held(layer, t)}
            assert len(heads) == 1
            per_layer.append(sorted(heads.pop()))
        held.append(per_layer)
    return held, (q, k)


def tova_reference(q: torch.Tensor, k: torch.Tensor, prompt: int, steps: int, cache_size: int):
    """TOVACache.reduce after every forward: prefill (last prompt row) then each decoding step."""
    group = H // H_KV
    kept = list(range(prompt))
    held = []
    for t in range(prompt - 1, prompt + steps):
        if t >= prompt:
            kept.append(t)
        if len(kept) > cache_size:
            keys = k[0][:, kept].repeat_interleave(group, dim=0)  # [H, len, D]
            logits = (q[0, :, t:t + 1] @ keys.transpose(-1, -2)) / math.sqrt(D)  # [H, 1, len]
            scores = torch.softmax(logits.float(), dim=-1)[:, 0].mean(dim=0)
            top = scores.topk(cache_size).indices.sort().values
            kept = [kept[i] for i in top.tolist()]
        if t >= prompt:
            held.append(sorted(kept))
    return held


def test_tova_paper_drops_the_lowest_scored_token_each_step():
    prompt, steps, size = 60, 25, 40
    method = registry.build("tova", budget=size, window_size=0, decode_interval=1)
    ours, (q, k) = run_kvbench(method, prompt, steps)
    # Each layer gets the same synthetic inputs here, so both follow the same reference.
    want = tova_reference(q, k, prompt, steps, size)
    for step, (layers, expected) in enumerate(zip(ours, want)):
        assert all(held == expected for held in layers), f"step {step}"
        assert all(len(held) == size for held in layers)
    # The current token is not protected in the paper's rule: some step evicts it at once.
    assert any(prompt + s not in want[s] for s in range(steps))


def test_streamingllm_keeps_sinks_and_a_rolling_window_every_step():
    prompt, steps, start, recent = 50, 30, 4, 28
    method = registry.build("streamingllm", budget=start + recent, window_size=recent, decode_interval=1)
    ours, _ = run_kvbench(method, prompt, steps)
    for s, layers in enumerate(ours):
        last = prompt + s
        expected = list(range(start)) + list(range(last - recent + 1, last + 1))
        assert all(held == expected for held in layers), f"step {s}"


def h2o_reference(q: torch.Tensor, k: torch.Tensor, prompt: int, steps: int, hh: int, recent: int):
    """H2OKVCache_LayerWise (FMInference/H2O real drop), MHA: scores = attention summed over every query row of
    every forward (causal at the prefill), per head; when the cache holds more than hh + recent tokens, keep the
    last `recent` plus the top `hh` older ones by score, per head; evicted scores are dropped."""
    heads = q.shape[1]
    kept = [list(range(prompt)) for _ in range(heads)]
    score = [dict() for _ in range(heads)]
    held = []
    for t in range(prompt + steps):
        new_rows = range(prompt) if t == prompt - 1 else ([t] if t >= prompt else [])
        if t < prompt - 1:
            continue
        for h in range(heads):
            if t >= prompt:
                kept[h].append(t)
            for row in new_rows:
                visible = [p for p in kept[h] if p <= row] if t == prompt - 1 else kept[h]
                logits = torch.stack([q[0, h, row] @ k[0, h, p] for p in visible]) / math.sqrt(D)
                probs = torch.softmax(logits.float(), dim=-1)
                for p, w in zip(visible, probs.tolist()):
                    score[h][p] = score[h].get(p, 0.0) + w
            if len(kept[h]) > hh + recent:
                older, last = kept[h][:-recent], kept[h][-recent:]
                top = sorted(sorted(older, key=lambda p: -score[h][p])[:hh])
                kept[h] = top + last
                score[h] = {p: score[h][p] for p in kept[h]}
        if t >= prompt:
            held.append([sorted(x) for x in kept])
    return held


def test_h2o_paper_accumulates_every_query_and_evicts_one_token_per_step():
    global H_KV
    prompt, steps, hh, recent = 40, 20, 12, 8
    saved, H_KV = H_KV, H  # the official code is MHA
    try:
        method = registry.build("h2o", budget=hh + recent, window_size=recent, mode="causal", decode_interval=1)
        q, k, v = synthetic(1, prompt + steps)
        cache = CompressedCache(1)
        method.begin(prompt, 1)
        cache.update(k[:, :, :prompt], v[:, :, :prompt], 0)
        method.compress_layer(0, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], cache)
        schedule = DecodeSchedule(method, 1)
        want = h2o_reference(q, k, prompt, steps, hh, recent)
        for s, t in enumerate(range(prompt, prompt + steps)):
            schedule.begin_forward(t, 1)
            cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0)
            schedule.after_attention(cache, 0, q[:, :, t:t + 1], {})
            schedule.end_forward(cache)
            got = [sorted(head) for head in positions_held(cache.layers[0], t)]
            assert got == want[s], f"step {s}"
            assert all(len(head) == hh + recent for head in got)
    finally:
        H_KV = saved
