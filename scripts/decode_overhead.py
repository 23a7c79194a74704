"""Decode ms/token with and without decoding-time compression, on the same prompt, in one process.

    PYTHONPATH=src python scripts/decode_overhead.py [model=smollm2_135m] [method=snapkv] [budget=128]
        [interval=16] [prompt=1024] [new=64] [reps=3]

The prompt is a RULER-free stand-in: the first `prompt` tokens of the embedded needle haystack (Paul Graham
essays); `new` tokens are generated (min_new_tokens = new, so both settings decode the same number of steps).
Alternates the two settings `reps` times and prints the median decode ms/token of each (and FullKV's)."""
from __future__ import annotations

import statistics
import sys

import torch
from omegaconf import OmegaConf

from kvbench.config import compose
from kvbench.engine import generate
from kvbench.methods import registry
from kvbench.models import ModelSpec, load_model
from kvbench.needle.haystack import haystack_token_ids, load_haystack


def main(args: dict) -> None:
    cfg = compose([f"model={args.get('model', 'smollm2_135m')}"])
    model, tok = load_model(ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True)), "cpu")
    n = int(args.get("prompt", 1024))
    ids = torch.tensor([haystack_token_ids(tok, load_haystack(None), n)[:n]])
    new, reps = int(args.get("new", 64)), int(args.get("reps", 3))
    name, budget, interval = args.get("method", "snapkv"), int(args.get("budget", 128)), int(args.get("interval", 16))
    params = registry.get(name).paper_defaults
    settings = {"FullKV": registry.build("fullkv"),
                f"{name} {budget}": registry.build(name, budget=budget, **params),
                f"{name} {budget} decode {interval}": registry.build(name, budget=budget, decode_interval=interval,
                                                                     **params)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(reps):
        for label, method in settings.items():
            out = generate(model, ids, method, max_new_tokens=new, min_new_tokens=new)
            times[label].append(1000 * out.decode_s / len(out.token_ids))
            peak = out.peak_kv_bytes
    for label, values in times.items():
        print(f"{label:32s} decode ms/token median {statistics.median(values):7.2f}  (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    print(f"prompt {ids.shape[1]} tokens, {new} generated, {torch.get_num_threads()} threads; last peak {peak} B")


if __name__ == "__main__":
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
