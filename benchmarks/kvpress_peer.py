#!/usr/bin/env python
"""The peer side of the bench's kvpress column (`benchmarks/peer.py`): kvpress run unmodified, in its own
environment (its own torch and transformers), on the model folder and token ids kvbench sends. Nothing of kvbench
is imported.

    KVPRESS_PYTHON benchmarks/kvpress_peer.py      # then one JSON request per line on stdin

Requests (one JSON object a line; one reply a line on stdout, `{"error": ...}` when a request fails):
- `{"op": "load", "model_dir": DIR, "dtype": "float32", "threads": 1}`: loads the model as kvpress's users do
  (`AutoModelForCausalLM.from_pretrained`, sdpa), sets torch's thread count; replies with the versions and a
  sha256 of the weights (parameters in name order, float32 bytes), so the bench checks it is the same model.
- `{"op": "prefill", "ids": [...], "press": SPEC, "kept": false}`: a fresh press, then, timed, what kvpress's
  pipeline does with the context: `with press(model): model.model(input_ids=ids, past_key_values=DynamicCache())`
  under `torch.no_grad()` (for KVzip the reconstruction passes run as the context manager exits; its tokenizer is
  loaded inside `press(model)`, as kvpress does). Replies `{"seconds": s, "tokenizer_s": t}` (t: the part of s
  spent in `AutoTokenizer.from_pretrained`, observed by wrapping it), and with `kept` the positions each
  layer's KV heads keep: the complement of `masked_key_indices` for presses that mask (AdaKVPress, KVzipPress),
  else the kept key rows matched to a press-less prefill's keys.
  SPEC: `{"press": "KnormPress", "params": {...}}`, a wrapper adds `"inner": SPEC` (passed as `press=`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time


# The same digest as kvbench.golden.weights_digest, written out: this runs in kvpress's own environment,
# where kvbench is not installed.
def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_press(spec: dict):
    import kvpress

    params = dict(spec.get("params", {}))
    if "inner" in spec:
        params["press"] = build_press(spec["inner"])
    return getattr(kvpress, spec["press"])(**params)


def load(state: dict, req: dict) -> dict:
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import kvpress  # noqa: F401  (patches the attention functions, as for every kvpress user)

    torch.set_num_threads(int(req["threads"]))
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=getattr(torch, req["dtype"]),
                                                 attn_implementation="sdpa").eval()
    state.update(model=model, full_keys={})
    return {"kvpress": version("kvpress"), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "threads": torch.get_num_threads(),
            "weights_sha256": weights_digest(model)}


def forward(model, ids, press=None):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ids, past_key_values=cache)
    return cache


def kept_positions(model, cache, full_cache) -> list[list[list[int]]]:
    import torch

    out = []
    for layer_idx, layer in enumerate(model.model.layers):
        full = full_cache.layers[layer_idx].keys[0]  # [H_kv, n, d]
        heads, n = full.shape[0], full.shape[1]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:
            keep = torch.ones(heads, n, dtype=torch.bool)
            keep[masked[1].cpu(), masked[2].cpu()] = False
            out.append([row.nonzero()[:, 0].tolist() for row in keep])
            continue
        keys = cache.layers[layer_idx].keys[0]
        rows = []
        for h in range(heads):
            index = {bytes(r.numpy().tobytes()): i for i, r in enumerate(full[h])}
            rows.append(sorted(index[bytes(r.numpy().tobytes())] for r in keys[h]))
        out.append(rows)
    return out


@contextlib.contextmanager
def tokenizer_loads_timed(spent: list):
    """`AutoTokenizer.from_pretrained` appends its duration to `spent` (kvpress's code itself is unchanged)."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.__dict__["from_pretrained"]
    load = AutoTokenizer.from_pretrained

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    AutoTokenizer.from_pretrained = timed
    try:
        yield
    finally:
        AutoTokenizer.from_pretrained = original


def prefill(state: dict, req: dict) -> dict:
    import torch

    model = state["model"]
    ids = torch.tensor([req["ids"]])
    key = tuple(req["ids"])
    if req.get("kept") and key not in state["full_keys"]:  # before the press: a prefill resets the masks it sets
        state["full_keys"] = {key: forward(model, ids)}  # one length at a time
    press = build_press(req["press"])
    spent: list[float] = []
    with tokenizer_loads_timed(spent):
        start = time.perf_counter()
        cache = forward(model, ids, press)
        seconds = time.perf_counter() - start
    reply = {"seconds": seconds, "tokenizer_s": sum(spent)}
    try:
        if req.get("kept"):
            reply["kept"] = kept_positions(model, cache, state["full_keys"][key])
    finally:
        for layer in model.model.layers:  # a mask left behind would apply to the next run's decoding
            if getattr(layer.self_attn, "masked_key_indices", None) is not None:
                layer.self_attn.masked_key_indices = None
    return reply


def main() -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout (progress bars, prints) goes to stderr
    sys.stdout = sys.stderr
    state: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"load": load, "prefill": prefill}[req["op"]](state, req)
        except Exception as err:  # noqa: BLE001  (the bench records the reason and goes on)
            reply = {"error": f"{type(err).__name__}: {err}"}
        replies.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
