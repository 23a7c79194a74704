#!/usr/bin/env python
"""Golden cases of kvpress 0.5.5, run unmodified in its own environment (/work/kvpress-venv: torch 2.13.0 CPU,
transformers 5.2.0). Nothing of kvbench is imported: the cases are what kvpress itself keeps.

KVzip on a real model (`KVzipPress` as its pipeline drives it: `with press(model): model.model(input_ids=...,
past_key_values=cache)`; the kept positions are the complement of the `masked_key_indices` it leaves on every
attention module), fixed token ids: the chat template's preamble (which kvpress's pipeline always puts first and
does not reconstruct) followed by text:

    /work/kvpress-venv/bin/python scripts/golden/kvpress_055.py kvzip --model DIR --name tiny_llama \\
        --ids-from TEXT_FILE --lengths 300 --ratios 0.8 --chunk-sizes 128 --plus both --out tests/golden/kvpress-0.5.5

DIR is a transformers folder: the embedded SmolLM2's converted copy (~/.cache/kvbench/converted/...), or a tiny
model written by `scripts/golden/export_model.py`. The case records a digest of the weights.

Scorer presses on the synthetic inputs of tests/golden (FORMAT-2026.md; `synth.layer_inputs`), driven as
`BasePress.forward_hook` calls them, with the stand-in attention module of FORMAT-2026's TOVA:

    /work/kvpress-venv/bin/python scripts/golden/kvpress_055.py synth --out tests/golden/cases-2026
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from kvpress import AdaKVPress, KeyDiffPress, KVzipPress, LagKVPress, SnapKVPress

VERSION = version("kvpress")
SYNTH = Path(__file__).resolve().parents[3] / "shared" / "golden"  # synth.py, next to the repository


# The same digest as kvbench.golden.weights_digest, written out: this runs in kvpress's own environment,
# where kvbench is not installed.
def weights_digest(model) -> str:
    """sha256 over the parameters (name order, float32 bytes): kvbench's test checks it has the same model."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def write(path: Path, case: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(case, separators=(",", ":")) + "\n")
    print(path, flush=True)


# ---- KVzip on a model ---------------------------------------------------------------------------------------------
def kvzip_kept(model, ids: torch.Tensor, press: KVzipPress) -> list[list[list[int]]]:
    from transformers import DynamicCache

    n = ids.shape[1]
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    kept = []
    for layer in model.model.layers:
        _, heads, positions = layer.self_attn.masked_key_indices
        mask = torch.ones(model.config.num_key_value_heads, n, dtype=torch.bool)
        mask[heads, positions] = False
        kept.append([row.nonzero()[:, 0].tolist() for row in mask])
        del layer.self_attn.masked_key_indices
    return kept


def kvzip_cases(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    digest = weights_digest(model)
    # kvpress computes its prefix_length inside __call__; the same split gives the preamble the ids start with
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tok.apply_chat_template([{"role": "user", "content": dummy + separator}], add_generation_prompt=True,
                                   tokenize=False, enable_thinking=False) if tok.chat_template else ""
    preamble = text.split(separator)[0].split(dummy)[0] if text else ""
    pre_ids = tok.encode(preamble, add_special_tokens=False)
    body = tok.encode(Path(args.ids_from).read_text(), add_special_tokens=False)
    for n in args.lengths:
        ids = pre_ids + body[args.offset: args.offset + n - len(pre_ids)]
        assert len(ids) == n, f"{args.ids_from} is too short for {n} tokens"
        for ratio in args.ratios:
            for chunk_size in args.chunk_sizes:
                for plus in {"both": (False, True), "true": (True,), "false": (False,)}[args.plus]:
                    for layerwise in {"both": (False, True), "true": (True,), "false": (False,)}[args.layerwise]:
                        press = KVzipPress(compression_ratio=ratio, layerwise=layerwise, n_sink=4,
                                           kvzip_plus_normalization=plus, chunk_size=chunk_size)
                        kept = kvzip_kept(model, torch.tensor([ids]), press)
                        tag = f"{'_plus' if plus else ''}{'_layerwise' if layerwise else ''}"
                        case = {
                            "method": "kvzip", "kvpress_version": VERSION,
                            "reference": f"kvpress {VERSION} kvpress/presses/kvzip_press.py KVzipPress, unmodified",
                            "model": args.name, "weights_sha256": digest,
                            "params": {"compression_ratio": ratio, "layerwise": layerwise, "n_sink": 4,
                                       "kvzip_plus_normalization": plus, "chunk_size": chunk_size},
                            "preamble_length": len(pre_ids), "seq_len": n,
                            "num_layers": model.config.num_hidden_layers,
                            "num_kv_heads": model.config.num_key_value_heads,
                            "input_ids": ids, "kept_positions": kept,
                        }
                        write(Path(args.out) / f"kvzip_{args.name}_n{n}_r{ratio:g}_c{chunk_size}{tag}.json", case)


# ---- scorer presses on the synthetic inputs -----------------------------------------------------------------------
def stand_in(num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
    """The attention module the presses see (FORMAT-2026, TOVA): q_proj = identity over the post-RoPE queries."""
    module = nn.Module()
    module.config = SimpleNamespace(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                                    _attn_implementation="sdpa")
    module.head_dim, module.layer_idx = head_dim, 0
    module.q_proj = nn.Identity()
    return module


def synth_kept(press, seed: int, layers: int, heads: int, kv_heads: int, n: int, d: int):
    """Per layer: (kept positions per KV head, scores [H_kv, n] the press ranked, input digests)."""
    sys.path.insert(0, str(SYNTH))
    from synth import digest, layer_inputs  # tests/golden/synth.py (the shared generator)

    out = []
    for layer in range(layers):
        q, k, v = layer_inputs(seed, layer, heads, kv_heads, n, d)
        module = stand_in(heads, kv_heads, d)
        hidden = q.transpose(1, 2).reshape(1, n, heads * d)
        kwargs = {"position_embeddings": (torch.ones(1, n, d), torch.zeros(1, n, d))}
        scorer = press.press if isinstance(press, AdaKVPress) else press
        scores = scorer.score(module, hidden, k, v, None, kwargs)[0]
        if isinstance(press, AdaKVPress):
            press.compress(module, hidden, k, v, None, kwargs)
            _, head_idx, seq_idx = module.masked_key_indices
            mask = torch.ones(kv_heads, n, dtype=torch.bool)
            mask[head_idx, seq_idx] = False
            kept = [row.nonzero()[:, 0].tolist() for row in mask]
        else:  # ScorerPress.compress gathers the kept keys: find their positions
            keys, _ = press.compress(module, hidden, k, v, None, kwargs)
            kept = [sorted(int((k[0, h] == row).all(-1).nonzero()[0, 0]) for row in keys[0, h])
                    for h in range(kv_heads)]
        out.append((kept, scores, {f"sha256_{name}": digest(t) for name, t in (("query", q), ("key", k),
                                                                                ("value", v))}))
    return out


def tied(scores: torch.Tensor, kept: list[int], rel: float = 1e-6) -> list[int]:
    """Positions whose score is within `rel` (relative) of the head's boundary, on either side (FORMAT.md)."""
    if not kept or len(kept) == scores.numel():
        return []
    inside = scores[kept].min()
    outside = scores[[p for p in range(scores.numel()) if p not in set(kept)]].max()
    if (inside - outside).abs() > rel * max(inside.abs(), outside.abs()):
        return []
    lo, hi = min(inside, outside), max(inside, outside)
    band = (scores >= lo - rel * lo.abs()) & (scores <= hi + rel * hi.abs())
    return band.nonzero()[:, 0].tolist()


def synth_case(method: str, press, params: dict, budget: int, seed: int, layers: int, heads: int, kv_heads: int,
               n: int, d: int = 64, reference: str = "") -> dict:
    rows = synth_kept(press, seed, layers, heads, kv_heads, n, d)
    return {"method": method, "reference": f"kvpress {VERSION} {reference}, unmodified", "budget": budget,
            "params": params, "seed": seed, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads,
            "seq_len": n, "head_dim": d, "cache_heads": "per_kv_head",
            "layers": [{"kept_positions": kept,
                        "tied_positions": [tied(scores[h], kept[h]) for h in range(kv_heads)], **digests}
                       for kept, scores, digests in rows]}


def ratio_for(n: int, budget: int) -> float:
    """compression_ratio keeping `budget` of n (FORMAT-2026: lowered by 1e-12 where int() would keep one less)."""
    ratio = 1 - budget / n
    return ratio if int(n * (1 - ratio)) == budget else ratio - 1e-12


def synth_cases(args) -> None:
    out = Path(args.out)
    shapes = [(0, 8, 8, 2, 512), (1, 8, 8, 2, 512), (0, 8, 8, 8, 512), (0, 8, 8, 2, 1100)]
    for seed, layers, heads, kv_heads, n in shapes:
        for budget in (64, 128):
            r = ratio_for(n, budget)
            name = f"s{seed}_L{layers}_H{heads}x{kv_heads}_n{n}_b{budget}"
            write(out / f"keydiff_{name}.json",
                  synth_case("keydiff", KeyDiffPress(compression_ratio=r), {"compression_ratio": r}, budget, seed,
                             layers, heads, kv_heads, n, reference="kvpress/presses/keydiff_press.py KeyDiffPress"))
            for lag in (128, 64):
                params = {"compression_ratio": r, "n_sink": 4, "lag_size": lag, "cross_scoring": False}
                write(out / f"lagkv_{name}_lag{lag}.json",
                      synth_case("lagkv", LagKVPress(**params), params, budget, seed, layers, heads, kv_heads, n,
                                 reference="kvpress/presses/lagkv_press.py LagKVPress"))
        if kv_heads < heads:  # kvpress SnapKV averages its scores over the group: kvbench's adakv_gqa
            for budget in (128, 256):
                r = ratio_for(n, budget)
                name = f"s{seed}_L{layers}_H{heads}x{kv_heads}_n{n}_b{budget}"
                for alpha in (0.2, 0.95):  # 0.95: the floors bind (balanced synthetic heads)
                    params = {"compression_ratio": r, "window_size": 64, "kernel_size": 5, "alpha_safeguard": alpha}
                    press = AdaKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5), alpha)
                    write(out / f"adakv_gqa_kvpress_{name}_w64_a{alpha:g}.json",
                          synth_case("adakv_gqa", press, params, budget, seed, layers, heads, kv_heads, n,
                                     reference="kvpress/presses/adakv_press.py AdaKVPress(SnapKVPress)"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    kv = sub.add_parser("kvzip")
    kv.add_argument("--model", required=True)
    kv.add_argument("--name", required=True)
    kv.add_argument("--ids-from", required=True)
    kv.add_argument("--offset", type=int, default=0)
    kv.add_argument("--lengths", type=int, nargs="+", required=True)
    kv.add_argument("--ratios", type=float, nargs="+", required=True)
    kv.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048])
    kv.add_argument("--plus", choices=("both", "true", "false"), default="false")
    kv.add_argument("--layerwise", choices=("both", "true", "false"), default="false")
    kv.add_argument("--out", required=True)
    syn = sub.add_parser("synth")
    syn.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(f"kvpress {VERSION}, torch {torch.__version__}", file=sys.stderr)
    (kvzip_cases if args.what == "kvzip" else synth_cases)(args)


if __name__ == "__main__":
    main()
