#!/usr/bin/env python
"""Golden cases of DefensiveKV and Layer-DefensiveKV (FFY0/DefensiveKV @9251b95, a kvpress fork), run on the shared
synthetic inputs.

    git -C <bare DefensiveKV repo> archive 9251b95 kvpress | tar -x -C /tmp/defensivekv
    /work/kvpress-venv/bin/python scripts/golden/defensivekv_9251b95.py --fork /tmp/defensivekv/kvpress
        [--synth ../shared/golden/synth.py] [--out tests/golden/cases-2026]

The fork's package is also called `kvpress`, so its folder is mounted as the `kvpress` package without running its
`__init__` (which imports the whole pipeline): only `presses/efficient_defensivekv_press.py`,
`presses/efficient_layer_defensivekv_press.py` and what they import are loaded, unmodified (`attrs` must be
installed for `ada_cache.py`). Two stand-ins, both for things that need a GPU:
- the Triton kernel `kvpress.ops.vw_norm.vw_l1norm` (imported at module load) is a stub that is never called:
  `press.vwl1norm_triton` is set to the same press's own pure-PyTorch `vwl1norm` (the line the authors keep
  commented out next to the kernel call; the same arithmetic);
- the head-wise flattened cache (`ada_cache.DynamicCacheSplitHeadFlatten`, CUDA kernels) is a namespace holding
  what `compress` reads: `metadata_list` (bsz, num_key_value_heads, head_lens; `_update_metadata_while_compressing`
  a no-op), and for the layer variant `key_cache`, `value_cache`, `layer_scores`. Keys and values are passed
  flattened `[H_kv * n, d]`, the fork's layout.
The attention module stand-in is the one of `kvpress_055_pipeline.py` (identity `q_proj` and RoPE, the synthetic
`o_proj`). Kept positions: the returned key rows mapped back to (head, position). `tied_positions` from the
press's flattened `score` at each head's lowest kept score (1e-6 relative).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvpress_055_pipeline import REPO, StandIn, o_proj_weight, ratio_for, ties  # noqa: E402

COMMIT = "9251b95e7e282a6c18dd98ef6318dd489e639a58"


def load_fork(root: str):
    for name in [m for m in sys.modules if m == "kvpress" or m.startswith("kvpress.")]:
        del sys.modules[name]  # kvpress 0.5.5, loaded by the shared stand-in module
    pkg = types.ModuleType("kvpress")
    pkg.__path__ = [root]
    sys.modules["kvpress"] = pkg
    kernel = types.ModuleType("kvpress.ops.vw_norm")

    def vw_l1norm(*args, **kwargs):
        raise RuntimeError("the Triton kernel is replaced by the press's own vwl1norm")

    kernel.vw_l1norm = vw_l1norm
    sys.modules["kvpress.ops.vw_norm"] = kernel
    from kvpress.presses.efficient_defensivekv_press import EfficientDefensiveKVPress
    from kvpress.presses.efficient_layer_defensivekv_press import EfficientLayerDefensiveKVPress
    return EfficientDefensiveKVPress, EfficientLayerDefensiveKVPress


def metadata(kv_heads: int, n: int):
    return SimpleNamespace(bsz=1, num_key_value_heads=kv_heads, head_lens=[n] * kv_heads,
                           _update_metadata_while_compressing=lambda *args: None)


def positions_of(flat_keys: torch.Tensor, kept_rows: torch.Tensor, kv_heads: int, n: int) -> list[list[int]]:
    index = {tuple(r.tolist()): i for i, r in enumerate(flat_keys)}
    kept = [[] for _ in range(kv_heads)]
    for row in kept_rows:
        i = index[tuple(row.tolist())]
        kept[i // n].append(i % n)
    return [sorted(k) for k in kept]


def run(spec: dict, synth, presses) -> dict:
    seed, layers, heads, kv_heads, n, d = (spec[k] for k in ("seed", "num_layers", "num_heads", "num_kv_heads",
                                                             "seq_len", "head_dim"))
    ratio = spec["params"]["compression_ratio"]
    press = presses[spec["method"]](compression_ratio=ratio, window_size=32, kernel_size=5)
    press.vwl1norm_triton = press.vwl1norm
    cache = SimpleNamespace(metadata_list=[metadata(kv_heads, n) for _ in range(layers)], key_cache=[],
                            value_cache=[], layer_scores=[])
    inputs, scores, kept = [], [], []
    for layer in range(layers):
        q, k, v = synth.layer_inputs(seed, layer, heads, kv_heads, n, d)
        weight = o_proj_weight(seed, layer, heads, d)
        module = StandIn(layer, heads, kv_heads, d, weight)
        module.config.num_hidden_layers = layers
        hidden = q.transpose(1, 2).reshape(1, n, heads * d)
        kwargs = {"position_embeddings": module.rotary_emb(q, torch.arange(n)[None]), "past_key_values": cache}
        flat_k, flat_v = k[0].reshape(kv_heads * n, d), v[0].reshape(kv_heads * n, d)
        cache.key_cache.append(flat_k.clone())
        cache.value_cache.append(flat_v.clone())
        with torch.no_grad():
            score_kwargs = {**kwargs, "metadata": cache.metadata_list[layer]}
            scores.append(press.score(module, hidden, flat_k, flat_v, None, score_kwargs).view(kv_heads, n))
            out_k, _ = press.compress(module, hidden, flat_k.clone(), flat_v.clone(), None, kwargs)
        if spec["method"] == "defensivekv":
            kept.append(positions_of(flat_k, out_k, kv_heads, n))
        inputs.append((q, k, v, weight, flat_k))
    if spec["method"] == "layer_defensivekv":  # the last layer's compress cut every layer in the cache
        kept = [positions_of(flat_k, cache.key_cache[l], kv_heads, n) for l, (*_, flat_k) in enumerate(inputs)]
    out_layers = [{"kept_positions": kept[l], "tied_positions": ties(scores[l], kept[l]),
                   "sha256_query": synth.digest(q), "sha256_key": synth.digest(k), "sha256_value": synth.digest(v),
                   "sha256_o_proj": synth.digest(w)} for l, (q, k, v, w, _) in enumerate(inputs)]
    file = {"defensivekv": "efficient_defensivekv_press.py EfficientDefensiveKVPress",
            "layer_defensivekv": "efficient_layer_defensivekv_press.py EfficientLayerDefensiveKVPress"}
    return {"method": spec["method"],
            "reference": f"FFY0/DefensiveKV@{COMMIT[:7]} kvpress/presses/{file[spec['method']]}(window_size=32, "
                         f"kernel_size=5), pure-PyTorch vwl1norm",
            "budget": spec["budget"], "params": spec["params"], "seed": seed, "num_layers": layers,
            "num_heads": heads, "num_kv_heads": kv_heads, "seq_len": n, "head_dim": d, "cache_heads": "per_kv_head",
            "stand_in": {"rotary": "identity", "o_proj": "o_proj_weight(seed, layer, H, d)"}, "layers": out_layers}


def specs() -> list[dict]:
    base = dict(num_layers=8, num_heads=8, num_kv_heads=2, seq_len=512, head_dim=64)
    shapes = [(dict(base, seed=s), b) for s in (0, 1) for b in (64, 128)]
    shapes += [(dict(base, seed=0, seq_len=1100), 128), (dict(base, seed=1, num_kv_heads=8), 128)]
    out = []
    for method in ("defensivekv", "layer_defensivekv"):
        for shape, budget in shapes:
            name = (f"{method}_s{shape['seed']}_L{shape['num_layers']}_H{shape['num_heads']}x{shape['num_kv_heads']}"
                    f"_n{shape['seq_len']}_b{budget}")
            params = {"compression_ratio": ratio_for(shape["seq_len"], budget), "observation_window": 32,
                      "kernel_size": 5, "threshold": 0.9}
            out.append({"file": name, "method": method, "budget": budget, "params": params, **shape})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fork", required=True, help="the fork's kvpress/ folder (git archive of the commit)")
    parser.add_argument("--synth", default=str(REPO.parent / "shared" / "golden" / "synth.py"))
    parser.add_argument("--out", default=str(REPO / "tests" / "golden" / "cases-2026"))
    args = parser.parse_args()
    spec_ = importlib.util.spec_from_file_location("synth", args.synth)
    synth = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(synth)
    presses = dict(zip(("defensivekv", "layer_defensivekv"), load_fork(args.fork)))
    torch.set_num_threads(1)
    for spec in specs():
        case = run(spec, synth, presses)
        (Path(args.out) / f"{spec['file']}.json").write_text(json.dumps(case) + "\n")
        print(spec["file"], [[len(h) for h in layer["kept_positions"]] for layer in case["layers"][:2]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
