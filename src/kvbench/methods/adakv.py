"""AdaKV (Feng et al., 2024): head-adaptive budgets. Not a new scorer but an allocation policy
(`ScoredMethod.allocation=adaptive`, `base.head_adaptive_counts`) applied to an existing one, registered here as
configurations:

| name | scorer | layer budget | heads that select |
|---|---|---|---|
| `adakv` (Ada-SnapKV) | SnapKV | uniform | every query head (the official layout) |
| `adakv_gqa` | SnapKV | uniform | KV heads, scores averaged over the group before pooling (GQA support) |
| `adakv_pyramid` (Ada-PyramidKV) | SnapKV | PyramidKV schedule | every query head |
| `adakv_pyramid_gqa` | SnapKV | PyramidKV schedule | KV heads |

Any other scorer takes the same settings (`method=h2o method.allocation=adaptive`). `floor_alpha` is the share of
the layer budget each head keeps at least; `adaptive_mode=official` reproduces FFY0/AdaKV@efe4e2e's arithmetic
(each head's count rounded on its own: a layer keeps a few tokens more or fewer than heads x budget), `exact`
keeps exactly the budget, with a floor of
`int((budget - window) * floor_alpha)` prefix tokens per head, and `kvpress` is kvpress 0.5.5's `AdaKVPress`
safeguard: exactly the budget, each head's top `int(budget * floor_alpha)` positions counted with the window
(`base.kvpress_safeguard`; kvpress's `AdaKVPress(SnapKVPress())` is `adakv_gqa` with window_size=64, kernel_size=5,
pooling=avgpool, adaptive_mode=kvpress).
"""
from __future__ import annotations

from kvbench.errors import KvbenchError
from kvbench.methods import registry
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.snapkv import SnapKV

# FFY0/AdaKV's defaults (`monkeypatch.config_compress`, `experiments/LongBench/pred.py`).
PAPER = {"window_size": 32, "kernel_size": 7, "pooling": "maxpool", "floor_alpha": 0.2}


def official_params(params: dict) -> dict:
    """The official `AdaptiveSnapKVCluster` (or kvpress `AdaKVPress`) arguments of a golden case -> our settings (settings the official
    scripts never change must have their default value; anything else is a clear error)."""
    params = dict(params)
    if "alpha_safeguard" in params:  # kvpress 0.5.5 AdaKVPress(SnapKVPress): the case's budget is n_kept
        return {"window_size": params["window_size"], "kernel_size": params["kernel_size"], "pooling": "avgpool",
                "floor_alpha": params["alpha_safeguard"], "adaptive_mode": "kvpress"}
    fixed = {"skip": 0, "normalize": None, "gqa_func": "mean"}
    for key, value in fixed.items():
        if params.pop(key, value) != value:
            raise KvbenchError(f"AdaKV {key}={params.get(key)!r} is not supported (only {value!r}, as every "
                               f"official script runs)")
    params.pop("gqa_support", None)  # the configuration's name says it (cache_heads)
    beta = params.pop("pyram_beta", 20)
    if params.pop("pyram_mode", False):
        params["beta"] = beta
    return params


CONFIGURATIONS = {
    "adakv": (SnapKV, "Ada-SnapKV", 60, {"allocation": "adaptive"}, PAPER),
    "adakv_gqa": (SnapKV, "Ada-SnapKV (GQA)", 61, {"allocation": "adaptive", "cache_heads": "per_kv_head"}, PAPER),
    "adakv_pyramid": (PyramidKV, "Ada-PyramidKV", 62, {"allocation": "adaptive"}, {**PAPER, "beta": 20}),
    "adakv_pyramid_gqa": (PyramidKV, "Ada-PyramidKV (GQA)", 63,
                          {"allocation": "adaptive", "cache_heads": "per_kv_head"}, {**PAPER, "beta": 20}),
}

for _name, (_cls, _display, _order, _preset, _paper) in CONFIGURATIONS.items():
    registry.register(_cls, _name, display_name=_display, order=_order, preset=_preset, paper_defaults=_paper,
                      official_params=official_params)
