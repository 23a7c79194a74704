"""The one registry of methods: what reports, plots, the bench, the golden harness and the generic tests read.

A registered name is a method class plus a `preset` of settings that this configuration fixes: `snapkv` is the
SnapKV class as is; `adakv` is the same class with `allocation=adaptive` (Ada-SnapKV). A spec carries the display
name, the order in reports, the papers' default settings and, for golden cases of an official implementation,
the translation of the official arguments into our settings. The expected KV size is the method's own
`expected_kv_tokens`.

Registering a new scoring method: define the class in one file under `kvbench/methods/` (its `name`,
`display_name`, `order`, `paper_defaults` class attributes) and list it in `kvbench.methods.METHODS`, or call
`register(cls)`; add `configs/method/<name>.yaml`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from kvbench.errors import KvbenchError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    display_name: str
    order: float
    preset: dict = field(default_factory=dict)
    paper_defaults: dict = field(default_factory=dict)
    official_params: Callable[[dict], dict] | None = None  # golden case params -> our settings
    builtin: bool = True  # False for test-only registrations (no configs/method/<name>.yaml)

    def settings(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.cls)}


_SPECS: dict[str, MethodSpec] = {}


def register(cls: type, name: str | None = None, *, display_name: str | None = None, order: float | None = None,
             preset: dict | None = None, paper_defaults: dict | None = None,
             official_params: Callable[[dict], dict] | None = None, builtin: bool = True) -> MethodSpec:
    """Register `cls` under `name` (default `cls.name`), with class attributes as defaults."""
    name = name or cls.name
    spec = MethodSpec(name=name, cls=cls, display_name=display_name or getattr(cls, "display_name", None) or name,
                      order=getattr(cls, "order", 100) if order is None else order, preset=dict(preset or {}),
                      paper_defaults=dict(getattr(cls, "paper_defaults", {}) if paper_defaults is None
                                          else paper_defaults),
                      official_params=official_params or cls.official_params, builtin=builtin)
    unknown = sorted(set(spec.preset) - spec.settings())
    if unknown:
        raise KvbenchError(f"method {name}: preset settings {unknown} are not settings of {cls.__name__}")
    _SPECS[name] = spec
    return spec


def unregister(name: str) -> None:
    _SPECS.pop(name, None)


def get(name: str) -> MethodSpec:
    if name not in _SPECS:
        raise KvbenchError(f"unknown method {name!r}; choose one of: {', '.join(names())}")
    return _SPECS[name]


def is_registered(name: str) -> bool:
    return name in _SPECS


def names(builtin_only: bool = False) -> list[str]:
    """Registered names in report order."""
    specs = [s for s in _SPECS.values() if s.builtin or not builtin_only]
    return [s.name for s in sorted(specs, key=lambda s: (s.order, s.name))]


def display_name(name: str) -> str:
    """The papers' spelling (`adakv` -> `Ada-SnapKV`); unknown names are returned as given."""
    spec = _SPECS.get(str(name)) or _SPECS.get(str(name).lower())
    return spec.display_name if spec else str(name)


def display_names() -> dict[str, str]:
    """{name: display name} for every registered method, in report order."""
    return {name: _SPECS[name].display_name for name in names()}


def build(name: str, **params: Any):
    """Create a method by registered name; unknown names or settings, or settings that contradict the
    configuration's preset, are clear errors."""
    spec = get(name)
    fields = spec.settings()
    unknown = sorted(set(params) - fields)
    if unknown:
        raise KvbenchError(f"method {name} has no setting(s) {unknown}; its settings are: {sorted(fields)}")
    clash = {k: v for k, v in params.items() if k in spec.preset and v != spec.preset[k]}
    if clash:
        raise KvbenchError(f"method {name} fixes {spec.preset}; {clash} contradicts it: use method="
                           f"{spec.cls.name} with those settings instead")
    method = spec.cls(**{**spec.preset, **params})
    method.name = name  # the configuration's name, in records and result paths
    return method


def paper_method(name: str, budget: Any = None, **overrides: Any):
    """The method with its papers' default settings (what the bench runs)."""
    spec = get(name)
    params = {**spec.paper_defaults, **overrides}
    if "budget" in spec.settings():
        params["budget"] = budget
    if "budget" not in spec.settings() or getattr(spec.cls, "name", None) == "fullkv":
        params.pop("budget", None)
    return build(name, **params)
