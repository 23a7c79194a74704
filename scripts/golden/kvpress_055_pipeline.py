#!/usr/bin/env python
"""Golden cases of kvpress 0.5.5's press wrappers, run unmodified on the shared synthetic inputs.

    /work/kvpress-venv/bin/python scripts/golden/kvpress_055_pipeline.py [--synth ../shared/golden/synth.py]
        [--out tests/golden/cases-2026] [--only NAME ...]

Needs kvpress==0.5.5 (checked) with its own torch/transformers. Every case feeds one stand-in attention module per
layer (see tests/golden/FORMAT-kvpress055.md) the synthetic post-RoPE queries (as `hidden_states`, `q_proj` the
identity, rotary embedding the identity) and keys/values, calls the press's own `compress` as kvpress's
`BasePress.forward_hook` does, and records what it kept:
- presses that gather (`ScorerPress`, `ChunkKVPress`, `EntropyGatedChunkKVPress`, `CriticalKVPress`): the returned
  key rows, mapped back to their prompt positions (every synthetic key row is distinct);
- presses that mask (`AdaKVPress`, `CriticalAdaKVPress`): every position not in `module.masked_key_indices`.
`tied_positions` lists, per head, the positions whose score is within 1e-6 (relative) of the head's last kept
score, from the scores the press ranks by (`press.score`), where that is defined; else empty.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import kvpress
import torch
from kvpress import (AdaKVPress, ChunkKVPress, CriticalAdaKVPress, CriticalKVPress, EntropyGatedChunkKVPress,
                     ExpectedAttentionPress, KnormPress, TOVAPress)
from torch import nn

VERSION = "0.5.5"
REPO = Path(__file__).resolve().parents[2]
REFERENCE = f"kvpress=={VERSION} (pip), kvpress/presses/"


def o_proj_weight(seed: int, layer: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """The stand-in output projection [hidden, H*d] (hidden = H*d) of a layer: randn / sqrt(H*d), its own
    generator (seed 7919 * seed + 104729 + layer), so the q/k/v inputs are untouched."""
    width = num_heads * head_dim
    gen = torch.Generator().manual_seed(7919 * seed + 104729 + layer)
    return torch.randn(width, width, generator=gen) / math.sqrt(width)


class IdentityRotary(nn.Module):
    """cos = 1, sin = 0 at every position: RoPE is the identity, so pre- and post-RoPE queries coincide."""

    def forward(self, x, position_ids):
        shape = (position_ids.shape[0], position_ids.shape[1], x.shape[-1])
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)


class StandIn(nn.Module):
    """The attributes of a Llama attention module that the presses read."""

    def __init__(self, layer, num_heads, num_kv_heads, head_dim, o_proj):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                                      head_dim=head_dim, hidden_size=num_heads * head_dim,
                                      _attn_implementation="sdpa")
        self.layer_idx, self.head_dim = layer, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.q_proj = nn.Identity()
        self.rotary_emb = IdentityRotary()
        self.o_proj = nn.Linear(num_heads * head_dim, num_heads * head_dim, bias=False)
        self.o_proj.weight.data.copy_(o_proj)


def scorer(name: str, ratio: float, params: dict):
    if name == "knorm":
        return KnormPress(compression_ratio=ratio)
    if name == "tova":
        return TOVAPress(compression_ratio=ratio)
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=ratio, **params)
    raise ValueError(name)


def kept_by_gather(keys: torch.Tensor, out_keys: torch.Tensor) -> list[list[int]]:
    kept = []
    for h in range(keys.shape[1]):
        rows = {tuple(r.tolist()): i for i, r in enumerate(keys[0, h])}
        kept.append(sorted(rows[tuple(r.tolist())] for r in out_keys[0, h]))
    return kept


def kept_by_mask(module, num_kv_heads: int, n: int) -> list[list[int]]:
    _, heads, seqs = module.masked_key_indices
    pruned = [set() for _ in range(num_kv_heads)]
    for h, s in zip(heads.tolist(), seqs.tolist()):
        pruned[h].add(s)
    return [[p for p in range(n) if p not in pruned[h]] for h in range(num_kv_heads)]


def ties(scores: torch.Tensor | None, kept: list[list[int]]) -> list[list[int]]:
    if scores is None:
        return [[] for _ in kept]
    out = []
    for h, positions in enumerate(kept):
        if not positions:  # a head that keeps nothing (Layer-DefensiveKV)
            out.append([])
            continue
        row = scores[h].double()
        last = row[positions].min()
        close = ((row - last).abs() <= 1e-6 * last.abs().clamp(min=1e-30)).nonzero().flatten().tolist()
        out.append(close if len(close) > 1 else [])
    return out


def run(spec: dict, synth) -> dict:
    seed, layers, heads, kv_heads, n, d = (spec[k] for k in ("seed", "num_layers", "num_heads", "num_kv_heads",
                                                             "seq_len", "head_dim"))
    ratio = spec["params"]["compression_ratio"]
    inner = scorer(spec["scorer"], ratio, spec.get("scorer_params", {}))
    wrapper, extra = spec["wrapper"], dict(spec.get("wrapper_params", {}))
    press = {"ScorerPress": lambda: inner,
             "AdaKVPress": lambda: AdaKVPress(inner, **extra),
             "ChunkKVPress": lambda: ChunkKVPress(inner, **extra),
             "EntropyGatedChunkKVPress": lambda: EntropyGatedChunkKVPress(inner, **extra),
             "CriticalKVPress": lambda: CriticalKVPress(inner, **extra),
             "CriticalAdaKVPress": lambda: CriticalAdaKVPress(inner, **extra)}[wrapper]()
    out_layers = []
    for layer in range(layers):
        q, k, v = synth.layer_inputs(seed, layer, heads, kv_heads, n, d)
        weight = o_proj_weight(seed, layer, heads, d)
        module = StandIn(layer, heads, kv_heads, d, weight)
        hidden = q.transpose(1, 2).reshape(1, n, heads * d)
        cos_sin = module.rotary_emb(q, torch.arange(n)[None])
        kwargs = {"position_embeddings": cos_sin}
        with torch.no_grad():
            rank = press.press if wrapper not in ("ScorerPress", "CriticalKVPress") else press
            scores = None
            if wrapper in ("ScorerPress", "AdaKVPress"):
                scores = rank.score(module, hidden, k, v, None, kwargs)[0]
            out = press.compress(module, hidden, k.clone(), v.clone(), None, kwargs)
        if wrapper in ("AdaKVPress", "CriticalAdaKVPress"):
            kept = kept_by_mask(module, kv_heads, n)
        else:
            kept = kept_by_gather(k, out[0])
        out_layers.append({"kept_positions": kept, "tied_positions": ties(scores, kept),
                           "sha256_query": synth.digest(q), "sha256_key": synth.digest(k),
                           "sha256_value": synth.digest(v), "sha256_o_proj": synth.digest(weight)})
    files = {"ScorerPress": f"{spec['scorer']}_press.py", "AdaKVPress": "adakv_press.py",
             "ChunkKVPress": "chunkkv_press.py", "EntropyGatedChunkKVPress": "entropy_gated_chunkkv_press.py",
             "CriticalKVPress": "criticalkv_press.py", "CriticalAdaKVPress": "criticalkv_press.py"}
    inner_desc = f"{type(inner).__name__}({', '.join(f'{k}={v!r}' for k, v in spec.get('scorer_params', {}).items())})"
    return {"method": spec["method"],
            "reference": f"{REFERENCE}{files[wrapper]} {wrapper}"
                         + (f"({inner_desc}, {extra})" if wrapper != "ScorerPress" else f" {inner_desc}"),
            "budget": spec["budget"], "params": spec["params"], "seed": seed, "num_layers": layers,
            "num_heads": heads, "num_kv_heads": kv_heads, "seq_len": n, "head_dim": d, "cache_heads": "per_kv_head",
            "stand_in": {"rotary": "identity", "o_proj": "o_proj_weight(seed, layer, H, d)"},
            "layers": out_layers}


def ratio_for(n: int, budget: int) -> float:
    """compression_ratio whose int(n * (1 - r)) is exactly `budget` (lowered by 1e-12 where float rounding makes it
    one short, as the 0.5.4 cases)."""
    r = 1 - budget / n
    while int(n * (1 - r)) < budget:
        r -= 1e-12
    return r


def specs() -> list[dict]:
    shapes = [dict(seed=s, num_layers=8, num_heads=8, num_kv_heads=2, seq_len=512, head_dim=64) for s in (0, 1)]
    odd = dict(seed=0, num_layers=8, num_heads=8, num_kv_heads=2, seq_len=1100, head_dim=64)
    mha = dict(seed=1, num_layers=8, num_heads=8, num_kv_heads=8, seq_len=512, head_dim=64)
    ea = {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True, "epsilon": 0.0}
    ea_crit = {**ea, "use_vnorm": False}  # kvpress warns that CriticalKV wants use_vnorm off
    out = []

    def add(method, tag, scorer_name, wrapper, params, shape, budget, scorer_params=None, wrapper_params=None):
        ratio = ratio_for(shape["seq_len"], budget)
        name = (f"{tag}_s{shape['seed']}_L{shape['num_layers']}_H{shape['num_heads']}x{shape['num_kv_heads']}"
                f"_n{shape['seq_len']}_b{budget}")
        out.append({"file": name, "method": method, "scorer": scorer_name, "wrapper": wrapper,
                    "scorer_params": scorer_params or {}, "wrapper_params": wrapper_params or {}, "budget": budget,
                    "params": {"compression_ratio": ratio, **(params or {})}, **shape})

    for shape in shapes + [odd, mha]:
        for budget in (64, 128):
            if shape in (odd, mha) and budget == 64:
                continue
            # Ada-KNorm, Ada-TOVA, Ada-Expected-Attention; plain Expected Attention.
            ada = {"press": "AdaKVPress", "alpha_safeguard": 0.2}
            add("knorm", "adakvpress_knorm", "knorm", "AdaKVPress", ada, shape, budget)
            add("tova", "adakvpress_tova", "tova", "AdaKVPress", ada, shape, budget)
            add("expected_attention", "adakvpress_expected_attention", "expected_attention", "AdaKVPress",
                {**ada, **ea}, shape, budget, ea)
            add("expected_attention", "expected_attention", "expected_attention", "ScorerPress", ea, shape, budget,
                ea)
    # ChunkKV (plain, entropy-gated) and CriticalKV / CriticalAdaKV around KNorm and Expected Attention.
    for shape in shapes + [odd]:
        for budget in (64, 128):
            if shape is odd and budget == 64:
                continue
            for scorer_name, sp in (("knorm", {}), ("expected_attention", ea)):
                sparams = {"scorer": scorer_name, "scorer_params": sp}
                add("chunkkv", f"chunkkv_{scorer_name}", scorer_name, "ChunkKVPress",
                    {**sparams, "chunk_length": 20}, shape, budget, sp, {"chunk_length": 20})
                add("chunkkv", f"chunkkv_entropy_{scorer_name}", scorer_name, "EntropyGatedChunkKVPress",
                    {**sparams, "entropy_gated": True, "chunk_length": 10, "low_entropy_chunk_length": 4}, shape,
                    budget, sp, {"chunk_length": 10, "low_entropy_chunk_length": 4})
                csp = ea_crit if scorer_name == "expected_attention" else sp
                crit = {"scorer": scorer_name, "scorer_params": csp, "epsilon": 1e-4, "first_stage_ratio": 0.5}
                add("criticalkv", f"criticalkv_{scorer_name}", scorer_name, "CriticalKVPress", crit, shape, budget,
                    csp, {"epsilon": 1e-4, "first_stage_ratio": 0.5})
                add("criticalkv", f"criticaladakv_{scorer_name}", scorer_name, "CriticalAdaKVPress",
                    {**crit, "press": "CriticalAdaKVPress", "alpha_safeguard": 0.2}, shape, budget, csp,
                    {"alpha_safeguard": 0.2, "epsilon": 1e-4, "first_stage_ratio": 0.5})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth", default=str(REPO.parent / "shared" / "golden" / "synth.py"))
    parser.add_argument("--out", default=str(REPO / "tests" / "golden" / "cases-2026"))
    parser.add_argument("--only", nargs="*", help="generate only the cases whose file name starts with these")
    args = parser.parse_args()
    from importlib.metadata import version

    if version("kvpress") != VERSION:
        raise SystemExit(f"needs kvpress=={VERSION}, found {version('kvpress')} ({kvpress.__file__})")
    spec_ = importlib.util.spec_from_file_location("synth", args.synth)
    synth = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(synth)
    torch.set_num_threads(1)
    out = Path(args.out)
    for spec in specs():
        if args.only and not spec["file"].startswith(tuple(args.only)):
            continue
        case = run(spec, synth)
        (out / f"{spec['file']}.json").write_text(json.dumps(case) + "\n")
        print(spec["file"], [len(h) for h in case["layers"][0]["kept_positions"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
