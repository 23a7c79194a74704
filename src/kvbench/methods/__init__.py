"""The compression methods and their registry (`kvbench.methods.registry`).

A new method is one file here with a subclass of `Method` (usually of `ScoredMethod`: a scoring function; budgets
and selection are shared) listed in METHODS below, plus `configs/method/<name>.yaml`; the engine, the bench, the
reports and the generic tests read the registry and need no change. Configurations of an existing class (e.g.
`adakv` = SnapKV's scorer with head-adaptive allocation) are registered in `adakv.py`."""
from __future__ import annotations

from typing import Any, Mapping

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
    """Build from a `method` config group (keys other than `name` are settings) and the top-level budget."""
    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "budget_agnostic", "budget")}
    if not cfg.get("budget_agnostic", False) and cfg.get("compression_ratio") is None:  # a ratio replaces the budget
        params["budget"] = cfg.get("budget", budget)
    return build_method(cfg["name"], **params)


__all__ = ["METHODS", "Method", "ScoredMethod", "PooledWindowMethod", "build_method", "method_from_config",
           "registry", "FullKV", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "DynamicKV",
           "KNorm", "TOVA", "CAKE", "ExpectedAttention", "KVzip", "KeyDiff", "LagKV", "Random", "ChunkKV", "CriticalKV", "DefensiveKV",
           "LayerDefensiveKV"]
