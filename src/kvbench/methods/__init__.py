"""The compression methods and their registry (`kvbench.methods.registry`).

A new method is one file here with a subclass of `Method` (usually of `ScoredMethod`: a scoring function; budgets
and selection are shared) listed in METHODS below, plus `configs/method/<name>.yaml`; the engine, the bench, the
reports and the generic tests read the registry and need no change. Configurations of an existing class (e.g.
`adakv` = SnapKV's scorer with head-adaptive allocation) are registered in `adakv.py`."""
from __future__ import annotations

from typing import Any, Mapping

from kvbench.errors import KvbenchError
from kvbench.methods import registry
from kvbench.methods.base import Method, PooledWindowMethod, ScoredMethod
from kvbench.methods.cake import CAKE
from kvbench.methods.chunkkv import ChunkKV
from kvbench.methods.criticalkv import CriticalKV
from kvbench.methods.defensivekv import DefensiveKV, LayerDefensiveKV
from kvbench.methods.dynamickv import DynamicKV
from kvbench.methods.expected_attention import ExpectedAttention
from kvbench.methods.fullkv import FullKV
from kvbench.methods.h2o import H2O
from kvbench.methods.keydiff import KeyDiff
from kvbench.methods.knorm import KNorm
from kvbench.methods.kvzip import KVzip
from kvbench.methods.lagkv import LagKV
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.random import Random
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.methods.tova import TOVA

# The method classes (every registered name, configurations included: `registry.names()`).
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullKV, StreamingLLM, H2O, SnapKV, PyramidKV, DynamicKV,
                              KNorm, TOVA, CAKE, ExpectedAttention, KVzip, KeyDiff, LagKV, Random, ChunkKV, CriticalKV,
                              DefensiveKV, LayerDefensiveKV)
}
for _cls in METHODS.values():
    registry.register(_cls)

from kvbench.methods import adakv  # noqa: E402,F401  (registers adakv, adakv_pyramid and their GQA variants)


def build_method(name: str, **params: Any) -> Method:
    """Create a method by name from config values; unknown names or settings are clear errors."""
    return registry.build(name, **params)


def method_from_config(cfg: Mapping[str, Any], budget: Any = None) -> Method:
    """Build from a `method` config group (keys other than `name` are settings) and the top-level budget.

    `compression_ratio` replaces the budget. A method with a ratio rule of its own (kvpress's `int(n * (1 - r))`)
    takes it as a setting; any other method takes it as the fraction budget `1 - r` (`round(n * (1 - r))` tokens
    per head, window included: `Method.resolve_budget`), recorded as `compression_ratio` in its settings."""
    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "budget_agnostic", "budget")}
    ratio = cfg.get("compression_ratio")
    if cfg.get("budget_agnostic", False):  # FullKV: no budget, so no ratio either (as budget=, in a sweep)
        params.pop("compression_ratio", None)
        return build_method(cfg["name"], **params)
    if ratio is None:
        params["budget"] = cfg.get("budget", budget)
    elif "compression_ratio" not in registry.get(cfg["name"]).settings():
        if not 0 < ratio < 1:
            raise KvbenchError(f"method.compression_ratio={ratio}: {cfg['name']} takes a ratio as the fraction "
                               f"budget 1 - ratio, so it must be in (0, 1); ratio 0 is method=fullkv")
        params.pop("compression_ratio")
        method = build_method(cfg["name"], budget=round(1 - ratio, 12), **params)
        method.asked_ratio = ratio
        return method
    return build_method(cfg["name"], **params)


__all__ = ["METHODS", "Method", "ScoredMethod", "PooledWindowMethod", "build_method", "method_from_config",
           "registry", "FullKV", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "DynamicKV",
           "KNorm", "TOVA", "CAKE", "ExpectedAttention", "KVzip", "KeyDiff", "LagKV", "Random", "ChunkKV", "CriticalKV", "DefensiveKV",
           "LayerDefensiveKV"]
