#!/usr/bin/env python
"""Golden cases of CAKE's decoding-time eviction (antgroup/cakekv @c4675ce), the official code run unmodified on the
shared synthetic inputs (../shared/golden/synth.py), prefill and then one token per forward, as `model.generate`
drives it in `experiments/LongBench/pred_cake.py`.

Environment: the transformers cakekv pins (4.43.3, its `pyproject.toml`), torch 2.13.0 CPU from kvbench's venv:

    python -m venv /tmp/cake-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/cake-venv/lib/python3.11/site-packages/zz_torch.pth
    /tmp/cake-venv/bin/pip install --no-deps transformers==4.43.3 tokenizers==0.19.1 huggingface_hub==0.24.5
    git --git-dir=<cakekv mirror> archive c4675ce | tar -x -C /tmp/cakekv
    /tmp/cake-venv/bin/python scripts/golden/cakekv_c4675ce_decoding.py --cakekv /tmp/cakekv \\
        [--synth ../shared/golden/synth.py] [--out tests/golden/decoding/cake]

What runs is cakekv's own attention forward, `cake.model.modify_llama.llama_attn_forward_cake`, layer by layer with
one shared `CakeCache`, its config set as `pred_cake.py`'s `load_model_and_tokenizer` sets it (`key_size`,
`window_size`, `prefill`, `decoding_evict`, `tau1/tau2/gamma`, one shared `CakeprefillKVCache`); the prefill branch
allocates and cuts (cascading or not), and from the first decoding forward each layer holds its own
`CakeDecodingKVCache_LayerWise(hh_size=layer_budget[l])`, which the forward calls at every step. Stand-ins, none of
them part of the algorithm:
- the attention module: `q_proj`/`k_proj`/`v_proj` read the synthetic post-RoPE queries, keys and values from the
  hidden states (laid out `[q | k | v]` per token), `o_proj` is the identity, and the position embeddings are
  cos = 1, sin = 0, so `apply_rotary_pos_emb` leaves them as they are (exact in float32);
- `_flash_attention_forward` (flash-attn has no CPU build): plain causal softmax attention. Its output is the
  layer's output, which no kept token depends on here (every layer gets its own synthetic inputs).
Kept positions: each cached key row is matched to its position by exact equality with the synthetic keys.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

COMMIT = "c4675ce"
REPO = Path(__file__).resolve().parents[2]
# experiments/LongBench/config/model2tau.json, llama3.1-8b-128k (the README's model); no entry: pred_cake's 1.0/1.0
TAUS = {128: (1.6, 0.6), 1024: (1.6, 0.4)}

# name: seed, layers, heads, kv_heads, prompt length, budget (cache_size), window, cascading, decoding steps
CASES = [
    (0, 8, 8, 2, 512, 128, 32, True, 24),
    (1, 8, 8, 2, 512, 64, 32, True, 24),
    (0, 8, 8, 2, 512, 128, 32, False, 24),
    (0, 8, 8, 8, 512, 128, 32, True, 16),
    (0, 12, 8, 2, 512, 64, 32, True, 16),
    (0, 8, 8, 2, 300, 128, 32, True, 24),   # a share above n - w, redistributed
    (0, 8, 8, 2, 150, 128, 32, True, 16),   # cache_size < n <= cache_size + w: no prefill cut, the first step cuts
    (0, 8, 8, 2, 100, 128, 32, True, 40),   # shorter than the budget: grows, then one eviction per step
    (2, 8, 8, 2, 512, 96, 8, True, 24),     # a small window: the pooled prefix holds older window tokens sooner
]


class Columns(nn.Module):
    """hidden [..., W] -> hidden[..., start:stop]; `weight` only gives the forward its dtype (float32)."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop
        self.weight = nn.Parameter(torch.empty(0))

    def forward(self, x):
        return x[..., self.start:self.stop].contiguous()


def plain_attention(query, key, value, attention_mask, query_length, dropout=0.0, is_causal=True, **_):
    """What `_flash_attention_forward` computes, [b, q, H, d] in and out (keys already repeated to H)."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal and query_length > 1:
        n, m = k.shape[2], q.shape[2]
        logits = logits.masked_fill(torch.ones(m, n, dtype=torch.bool).triu(n - m + 1), float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v).transpose(1, 2)


def stand_in(forward, layer_idx: int, config, heads: int, kv_heads: int, dim: int) -> nn.Module:
    attn = nn.Module()
    attn.layer_idx, attn.config = layer_idx, config
    attn.num_heads, attn.num_key_value_heads, attn.head_dim = heads, kv_heads, dim
    attn.num_key_value_groups = heads // kv_heads
    attn.q_proj = Columns(0, heads * dim)
    attn.k_proj = Columns(heads * dim, (heads + kv_heads) * dim)
    attn.v_proj = Columns((heads + kv_heads) * dim, (heads + 2 * kv_heads) * dim)
    attn.o_proj = nn.Identity()
    attn.attention_dropout, attn.is_causal, attn._flash_attn_uses_top_left_mask = 0.0, True, False
    attn.forward = forward.__get__(attn)
    return attn


def run(spec, synth, modules) -> dict:
    seed, layers, heads, kv_heads, n, budget, window, cascading, steps = spec
    modify_llama, CakeCache, CakeprefillKVCache = modules
    dim, total = 64, n + steps
    tau1, tau2 = TAUS.get(budget, (1.0, 1.0))
    config = SimpleNamespace(
        key_size=[budget - window] * layers, window_size=[window] * layers, prefill=[True] * layers,
        decoding_evict=[None] * layers, tau1=tau1, tau2=tau2, gamma=200.0,
        prefill_cake_evict=[CakeprefillKVCache(cache_size=budget, window_size=window, k_seq_dim=2, v_seq_dim=2,
                                               num_heads=heads, num_layers=layers, use_cascading=cascading)] * layers)
    attns = [stand_in(modify_llama.llama_attn_forward_cake, l, config, heads, kv_heads, dim) for l in range(layers)]
    inputs = [synth.layer_inputs(seed, l, heads, kv_heads, total, dim) for l in range(layers)]
    hidden = [torch.cat([t.transpose(1, 2).reshape(1, total, -1) for t in qkv], dim=-1) for qkv in inputs]
    where = [[{k.numpy().tobytes(): p for p, k in enumerate(keys[0, h])} for h in range(kv_heads)]
             for _, keys, _ in inputs]
    cache = CakeCache()

    def forward(start: int, stop: int) -> list:
        cos = torch.ones(1, stop - start, dim)
        for l, attn in enumerate(attns):
            attn(hidden[l][:, start:stop], past_key_value=cache, position_embeddings=(cos, torch.zeros_like(cos)))
        return [[[where[l][h][row.numpy().tobytes()] for row in cache.key_cache[l][0, h]] for h in range(kv_heads)]
                for l in range(layers)]

    prefill = forward(0, n)
    record = []
    for t in range(n, total):
        kept = forward(t, t + 1)
        record.append({"position": t, "kept_positions": kept})
    name = f"cake_s{seed}_L{layers}_H{heads}x{kv_heads}_n{n}_b{budget}_w{window}_{'casc' if cascading else 'nocasc'}"
    return name, {
        "method": "cake",
        "reference": f"antgroup/cakekv@{COMMIT} cake/model/modify_llama.py llama_attn_forward_cake + "
                     f"cake/cake_cache.py CakeCache, CakeprefillKVCache, CakeDecodingKVCache_LayerWise",
        "transformers": modules[0].transformers.__version__, "torch": torch.__version__,
        "budget": budget, "params": {"window_size": window, "cascading": cascading, "tau1": tau1, "tau2": tau2,
                                     "gamma": 200.0},
        "seed": seed, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads, "seq_len": n,
        "head_dim": dim, "decode_steps": steps, "cache_heads": "per_kv_head",
        "sha256": [{"query": synth.digest(q), "key": synth.digest(k), "value": synth.digest(v)} for q, k, v in inputs],
        "layer_budget": [int(b) for b in cache.layer_budget],
        "hh_size": [int(e.hh_size) for e in config.decoding_evict if e is not None],
        "prefill_kept_positions": prefill,
        "steps": record,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cakekv", required=True, help="a checkout (git archive) of antgroup/cakekv at c4675ce")
    parser.add_argument("--synth", default=str(REPO.parent / "shared" / "golden" / "synth.py"))
    parser.add_argument("--out", default=str(REPO / "tests" / "golden" / "decoding" / "cake"))
    args = parser.parse_args()
    sys.path.insert(0, args.cakekv)
    spec = importlib.util.spec_from_file_location("synth", args.synth)
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    from cake.cake_cache import CakeCache, CakeprefillKVCache
    from cake.model import modify_llama

    modify_llama._flash_attention_forward = plain_attention  # flash-attn: no CPU kernel (see the docstring)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    for case in CASES:
        name, data = run(case, synth, (modify_llama, CakeCache, CakeprefillKVCache))
        (out / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
        print(out / f"{name}.json", "hh_size", data["hh_size"], flush=True)


if __name__ == "__main__":
    main()
