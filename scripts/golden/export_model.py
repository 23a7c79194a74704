#!/usr/bin/env python
"""Write a kvbench model (a tiny seeded model or the embedded SmolLM2) as a transformers folder (safetensors,
config, tokenizer), so that kvpress's own environment loads the very same weights:

    PYTHONPATH=src .venv/bin/python scripts/golden/export_model.py tiny_llama /tmp/golden-models/tiny_llama

(the embedded SmolLM2's converted copy under ~/.cache/kvbench/converted/ is already such a folder)."""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from kvbench.config import compose
from kvbench.models import ModelSpec, load_model


def main(name: str, folder: str) -> None:
    cfg = compose([f"model={name}"])
    model, tokenizer = load_model(ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True)), "cpu")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(folder)


if __name__ == "__main__":
    main(*sys.argv[1:3])
