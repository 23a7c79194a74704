"""The compression methods and their registry. A new method is a subclass of `Method` (usually of
`ScoredMethod`: a scoring function and a budget policy) added to METHODS; the engine needs no change."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, PooledWindowMethod, ScoredMethod
from kvbench.methods.cake import CAKE
from kvbench.methods.dynamickv import DynamicKV
from kvbench.methods.expected_attention import ExpectedAttention
from kvbench.methods.fullkv import FullKV
from kvbench.methods.h2o import H2O
from kvbench.methods.knorm import KNorm
from kvbench.methods.kvzip import KVzip
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.random import Random
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.methods.tova import TOVA

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullKV, StreamingLLM, H2O, SnapKV, PyramidKV, DynamicKV,
                              KNorm, TOVA, CAKE, ExpectedAttention, KVzip, Random)
}


def build_method(name: str, **params: Any) -> Method:
    """Create a method by name from config values; unknown names or settings are clear errors."""
    if name not in METHODS:
        raise KvbenchError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise KvbenchError(f"method {name} has no setting(s) {unknown}; its settings are: {sorted(fields)}")
    return cls(**params)


def method_from_config(cfg: Mapping[str, Any], budget: Any = None) -> Method:
    """Build from a `method` config group (keys other than `name` are settings) and the top-level budget."""
    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "budget_agnostic", "budget")}
    if not cfg.get("budget_agnostic", False):
        params["budget"] = cfg.get("budget", budget)
    return build_method(cfg["name"], **params)


__all__ = ["METHODS", "Method", "ScoredMethod", "PooledWindowMethod", "build_method", "method_from_config",
           "FullKV", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "DynamicKV",
           "KNorm", "TOVA", "CAKE", "ExpectedAttention", "KVzip", "Random"]
