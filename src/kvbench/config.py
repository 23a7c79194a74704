"""Config helpers: resolvers used by configs/, composing configs without the command line, and run naming."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PROTOCOL = "dynamickv"


def _subtract(a: Any, b: Any) -> Any:
    return a - b


if not OmegaConf.has_resolver("kvb_sub"):
    OmegaConf.register_new_resolver("kvb_sub", _subtract)


def compose(overrides: list[str] | None = None, config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """The config `python run.py <overrides>` would see (Hydra's compose API), for tests and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def run_name(cfg: DictConfig) -> str:
    """`<method>_<budget>[_<protocol>][_agnostic][_multineedle][_<tag>]`: the budget is left out when the method ignores it (FullKV), the
    protocol when it is the default preset."""
    name = cfg.method.name
    if not cfg.method.get("budget_agnostic", False):
        name += f"_{cfg.budget:g}" if isinstance(cfg.budget, float) else f"_{cfg.budget}"
    if cfg.protocol.name != DEFAULT_PROTOCOL:  # other presets never share a folder with the default
        name += f"_{cfg.protocol.name}"
    if cfg.benchmark.get("query", "aware") != "aware":  # query-agnostic runs never share a folder with aware ones
        name += f"_{cfg.benchmark.query}"
    if cfg.benchmark.get("multi_needle", False):
        name += "_multineedle"
    return f"{name}_{cfg.tag}" if cfg.get("tag") else name


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(cfg.results_root) / cfg.model.name / cfg.benchmark.name / run_name(cfg)
