"""Shared fixtures: tiny seeded random models (Llama, Mistral, Qwen2) and the embedded SmolLM2."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kvbench.config import compose
from kvbench.models import ModelSpec, load_model

# Tiny models are ~5x faster on one thread than on a contended pool (and a test run is never alone on 2 cores).
torch.set_num_threads(1)


def _absl_writes_to_the_real_stderr() -> None:
    """absl's log handler (absl is imported by rouge_score) keeps the sys.stderr of its import and closes that
    stream whenever logging shuts its handlers down (any later `logging.config.dictConfig`, e.g. submitit's import),
    unless it is the *current* sys.stderr. Under pytest that stream is the capture's file, and closing it breaks
    every later test of the process ("I/O operation on closed file"; seen with pytest-xdist, where the file order
    differs). The real stderr is never closed by absl."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_writes_to_the_real_stderr()

REPO = Path(__file__).resolve().parents[1]
SHARED_LONGBENCH = next((p for p in (REPO.parent / "shared" / "data" / "longbench",
                                     Path("/work/shared/data/longbench")) if p.is_dir()),
                        REPO.parent / "shared" / "data" / "longbench")
TINY = ("tiny_llama", "tiny_mistral", "tiny_qwen2")


@functools.lru_cache(maxsize=None)
def _protocol_yaml(name: str) -> dict:
    protocol = OmegaConf.to_container(compose([f"protocol={name}"]).protocol, resolve=True)
    protocol.pop("methods"), protocol.pop("per_model", None)
    return protocol


def protocol_preset(name: str, **overrides):
    """A LongBench protocol preset as `run.py protocol=<name>` builds it: from configs/protocol/<name>.yaml."""
    from kvbench.longbench.protocol import Protocol

    return Protocol.from_dict({**_protocol_yaml(name), **overrides})


def model_spec(name: str) -> ModelSpec:
    cfg = compose([f"model={name}"])
    return ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True))


@functools.lru_cache(maxsize=None)
def cached_model(name: str):
    return load_model(model_spec(name), "cpu")


@pytest.fixture(scope="session", params=TINY)
def tiny(request):
    """(model, tokenizer) for each tiny architecture."""
    return cached_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return cached_model("tiny_llama")


@pytest.fixture(scope="session")
def smollm2():
    return cached_model("smollm2_135m")


def random_prompt(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
