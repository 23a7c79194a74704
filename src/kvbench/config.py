"""Config helpers: resolvers used by configs/, composing configs without the command line, and run naming."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from kvbench.benchmark import of_config
from kvbench.errors import KvbenchError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PROTOCOL = "dynamickv"


def _subtract(a: Any, b: Any) -> Any:
    return a - b


def _per_model(table: str, setting: str, default: Any, *, _root_: DictConfig) -> Any:
    """`${kvb_per_model:<table>,<setting>,<default>}`: the value that the config node `table` (hub id -> settings)
    gives `setting` for this run's model (`model.hub_id`), else `default`. Lets a protocol or benchmark config hold
    the settings its papers used for specific models, so that a model config needs only `name` and `hub_id`."""
    per_model = OmegaConf.select(_root_, table, default=None) or {}
    hub_id = OmegaConf.select(_root_, "model.hub_id", default=None)
    entry = per_model.get(hub_id) if hub_id is not None else None
    return default if entry is None else entry.get(setting, default)


if not OmegaConf.has_resolver("kvb_sub"):
    OmegaConf.register_new_resolver("kvb_sub", _subtract)
if not OmegaConf.has_resolver("kvb_per_model"):
    OmegaConf.register_new_resolver("kvb_per_model", _per_model)


def compose(overrides: list[str] | None = None, config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """The config `python run.py <overrides>` would see (Hydra's compose API), for tests and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def sweepable_method_settings(overrides: list[str], multirun: bool = True) -> list[str]:
    """A multirun over `method=a,b` composes its base config with the default method (FullKV), which lacks most
    `method.<key>` settings, so Hydra refuses them ("Could not override"): they go in as `++method.<key>` (set,
    or add), and each job's method then checks them like any setting (run.py's multirun and kvbench.sweep)."""
    if not multirun or not any(a.startswith("method=") for a in overrides):
        return list(overrides)
    return [f"++{a}" if a.startswith("method.") and "=" in a else a for a in overrides]


def compression_ratio(cfg: DictConfig) -> float | None:
    """`method.compression_ratio` when the run asks for one (it then replaces the top-level budget), else None."""
    return cfg.method.get("compression_ratio")


def budget_text(cfg: DictConfig) -> str:
    """What the run asked for: `128`, `0.25` (a fraction) or `ratio0.9` (`method.compression_ratio`)."""
    ratio = compression_ratio(cfg)
    if ratio is not None:
        return f"ratio{ratio:g}"
    return f"{cfg.budget:g}" if isinstance(cfg.budget, float) else f"{cfg.budget}"


def run_name(cfg: DictConfig) -> str:
    """`<method>_<budget>[_<protocol>][_agnostic][_multineedle][_session[model]][_decode<N>][_<tag>]`: the budget
    is left out when the method ignores it (FullKV), `ratio<r>` when `method.compression_ratio` replaces it, the protocol when it is
    the default preset or the benchmark does not use it (needle)."""
    name = cfg.method.name
    if not cfg.method.get("budget_agnostic", False):
        name += f"_{budget_text(cfg)}"
    benchmark = of_config(cfg.benchmark)
    if benchmark.uses_protocol and cfg.protocol.name != DEFAULT_PROTOCOL:  # other presets never share a folder
        name += f"_{cfg.protocol.name}"
    for part in benchmark.name_parts(cfg.benchmark):  # query-agnostic, multi-needle, sessions: own folders
        name += f"_{part}"
    if cfg.method.get("decode_interval"):  # decoding-time compression never shares a folder with prefill-only
        name += f"_decode{cfg.method.decode_interval}"
    return f"{name}_{cfg.tag}" if cfg.get("tag") else name


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(cfg.results_root) / cfg.model.name / cfg.benchmark.name / run_name(cfg)


# ------------------------------------------------------------------------------------------------ config schema
# One place that checks the types of every value a user can set, before anything else runs (and so before any
# model loads): a wrong type is a one-line KvbenchError naming the key, never a traceback later on.

class _Kind:
    """A value type: `check(value)` returns the value (normalised) or raises ValueError with what was expected."""

    def __init__(self, expected: str, test, normalise=lambda v: v) -> None:
        self.expected, self.test, self.normalise = expected, test, normalise

    def check(self, value: Any) -> Any:
        if not self.test(value):
            raise ValueError(self.expected)
        return self.normalise(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _optional(kind: _Kind) -> _Kind:
    return _Kind(f"{kind.expected} or null", lambda v: v is None or kind.test(v),
                 lambda v: None if v is None else kind.normalise(v))


INT = _Kind("an integer", _is_int)
POS_INT = _Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NONNEG_INT = _Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
NUMBER = _Kind("a finite number", lambda v: _is_number(v) and math.isfinite(v))  # nan compares false to any bound
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
STR = _Kind("a string", lambda v: isinstance(v, str))
NAME = _Kind("a name (text)", lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), str)
STR_LIST = _Kind("a list of names, e.g. [a,b]",
                 lambda v: isinstance(v, (list, tuple, ListConfig)) and all(isinstance(x, str) for x in v))
DEVICE = _Kind("auto, cpu, cuda, cuda:<index> or mps",
               lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None)


def _budget_ok(v: Any) -> bool:
    if not _is_number(v):
        return False
    return (0 < v < 1) or (v >= 1 and float(v).is_integer())


BUDGET = _Kind("a whole number of tokens (e.g. 128) or a fraction of each prompt in (0, 1) (e.g. 0.2)", _budget_ok,
               lambda v: int(v) if v >= 1 else float(v))

BATCH_SIZE = _Kind("a positive integer (samples decoded together) or auto (picked from free memory and the longest "
                   "prompt)", lambda v: v == "auto" or (_is_int(v) and v > 0))

PACK_TOKENS = _Kind("an integer >= 0 (prompt tokens prefilled together; 0: each prompt alone) or auto",
                    lambda v: v == "auto" or (_is_int(v) and v >= 0))

TOP_LEVEL = {"budget": BUDGET, "seed": INT, "device": DEVICE, "results_root": STR, "output_dir": _optional(STR),
             "tag": _optional(NAME), "progress": BOOL, "batch_size": BATCH_SIZE, "prefill_pack_tokens": PACK_TOKENS}
optional = _optional
# Benchmark keys of every benchmark; each benchmark class adds its own (`Benchmark.schema`).
BENCHMARK = {"name": STR, "package": _optional(STR)}
PROTOCOL = {"name": STR, "chat_template": STR, "min_new_tokens_tasks": STR, "eos": STR,
            "samsum_newline_stop": BOOL, "truncation": STR, "add_special_tokens": BOOL}
PROTOCOL_METHODS = {"kernel_size": POS_INT, "pooling": STR, "radio_max": NUMBER}


def _kind_of_annotation(annotation: Any) -> _Kind | None:
    """The schema kind of a dataclass field's type (int, float, str, bool, optionally `| None`); None: unchecked."""
    args = set(typing.get_args(annotation))
    optional = type(None) in args
    base = (args - {type(None)}) if args else {annotation}
    if len(base) != 1:
        return None
    kind = {int: INT, float: NUMBER, str: STR, bool: BOOL}.get(base.pop())
    return _optional(kind) if (kind and optional) else kind


def _dataclass_schema(cls: type) -> dict[str, _Kind]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: leave that class's checks to it
        return {}
    schema = {}
    for f in dataclasses.fields(cls):
        kind = _kind_of_annotation(hints.get(f.name))
        if kind is not None:
            schema[f.name] = kind
    return schema


def _check_section(cfg: DictConfig, schema: dict[str, _Kind | dict], prefix: str) -> None:
    for key, kind in schema.items():
        if key not in cfg:
            continue
        if isinstance(kind, dict):  # a nested section (e.g. the needle's benchmark.grid)
            if isinstance(cfg[key], DictConfig):
                _check_section(cfg[key], kind, f"{prefix}{key}.")
            continue
        value = cfg[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            normalised = kind.check(value)
        except ValueError as err:
            raise KvbenchError(f"{prefix}{key}={_show(value)}: expected {err}") from None
        if type(normalised) is not type(value):
            cfg[key] = normalised


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def validate(cfg: DictConfig) -> DictConfig:
    """Check the types of the whole config (top-level keys and every group) and the budget rule; raises a one-line
    KvbenchError naming the key and the fix. Returns `cfg`, with whole-number budgets made integers."""
    from omegaconf.errors import OmegaConfBaseException

    from kvbench.methods import registry
    from kvbench.models import ModelSpec
    from kvbench.results import MOVED_MODEL_KEYS

    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise KvbenchError(f"the config does not resolve: {str(err).splitlines()[0]}") from None
    with open_dict(cfg):
        _check_section(cfg, TOP_LEVEL, "")
        for key in ("output_dir", "results_root"):
            if cfg.get(key) and Path(cfg[key]).exists() and not Path(cfg[key]).is_dir():
                raise KvbenchError(f"{key}={cfg[key]} is a file, not a folder; give a folder for the results")
        method = cfg.method
        _check_section(method, {"name": STR, "budget_agnostic": BOOL}, "method.")
        if registry.is_registered(method.name):  # an unknown name: the registry's error lists the valid names
            _check_section(method, _dataclass_schema(registry.get(method.name).cls), "method.")
        _check_section(cfg.model, {**_dataclass_schema(ModelSpec), "max_input_len": _optional(POS_INT),
                                   "trained_len": _optional(POS_INT)}, "model.")
        for key, place in MOVED_MODEL_KEYS.items():
            if key in cfg.model:
                raise KvbenchError(f"model.{key} is no longer a model setting; set {place} instead")
        _check_section(cfg.benchmark, {**BENCHMARK, **of_config(cfg.benchmark).schema}, "benchmark.")
        _check_section(cfg.protocol, PROTOCOL, "protocol.")
        if isinstance(cfg.protocol.get("methods"), DictConfig):
            _check_section(cfg.protocol.methods, PROTOCOL_METHODS, "protocol.methods.")
    _check_ratio(cfg)
    return cfg


def _budget_on_command_line() -> bool:
    """True when this (Hydra) run was given `budget=` explicitly; False outside Hydra (the compose API)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    except (ImportError, ValueError):
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == "budget" for o in overrides)


def _check_ratio(cfg: DictConfig) -> None:
    """`method.compression_ratio` replaces the budget: both given is refused, as is a ratio that keeps no token of
    the longest prompt (`budget=0` is refused likewise); shorter prompts are checked by the method."""
    ratio = compression_ratio(cfg)
    if ratio is None:
        return
    if not _is_number(ratio) or not 0 <= ratio < 1:
        raise KvbenchError(f"method.compression_ratio={_show(ratio)}: expected a number in [0, 1) (the share of the "
                           f"prompt removed, e.g. 0.875 keeps 1 token in 8)")
    if _budget_on_command_line():
        raise KvbenchError(f"budget={cfg.budget} and method.compression_ratio={ratio:g} both set the KV size; give "
                           f"one of them (the run is named after the ratio)")
    longest = cfg.model.get("max_input_len")
    if longest and int(longest * (1 - ratio)) < 1:
        raise KvbenchError(f"method.compression_ratio={ratio:g} keeps 0 of the {longest} tokens of the longest prompt "
                           f"(model.max_input_len); use a ratio below {1 - 1 / longest:.6g}")
