"""Golden cases: what the official implementations kept on synthetic attention inputs.

A case (see tests/golden/FORMAT.md) names a method, its parameters and the shapes of deterministic synthetic
post-RoPE queries/keys/values per layer. `run_case` regenerates the inputs, checks their sha256, and drives our
method through the same calls the attention hook makes on a real model (cache update, then
`Method.compress_layer`), then `compare` applies the case's rule.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from kvbench.cache import CompressedCache
from kvbench.errors import KvbenchError
from kvbench.methods import build_method, registry


class MethodNotImplemented(KvbenchError):
    """A case names a method kvbench does not have (yet): reported as skipped, never as passed."""


def synthetic_layer(seed: int, layer: int, num_heads: int, num_kv_heads: int, seq_len: int, head_dim: int):
    """Peaked synthetic attention inputs: a few heavy keys per KV head aligned with a direction its query group
    shares; each layer scales its queries differently. Must match the generator the cases were made with."""
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    group = num_heads // num_kv_heads
    scale = float(10 ** (torch.rand(1, generator=gen).item() * 1.5 - 0.5))
    keys = torch.randn(1, num_kv_heads, seq_len, head_dim, generator=gen)
    values = torch.randn(1, num_kv_heads, seq_len, head_dim, generator=gen)
    queries = torch.randn(1, num_heads, seq_len, head_dim, generator=gen)
    for kv in range(num_kv_heads):
        direction = torch.randn(head_dim, generator=gen)
        direction = direction / direction.norm()
        heavy = torch.randperm(seq_len, generator=gen)[: max(4, seq_len // 32)]
        keys[0, kv, heavy] += 3.0 * direction
        queries[0, kv * group:(kv + 1) * group] += 1.5 * direction
    return queries * scale, keys, values


def synthetic_o_proj(seed: int, layer: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """The stand-in output projection [H*d, H*d] of kvpress-wrapper cases (FORMAT-kvpress055.md): randn / sqrt(H*d)
    from its own generator, so the query/key/value inputs are untouched."""
    width = num_heads * head_dim
    gen = torch.Generator().manual_seed(7919 * seed + 104729 + layer)
    return torch.randn(width, width, generator=gen) / math.sqrt(width)


class IdentityRotaryEmbedding(nn.Module):
    """cos = 1, sin = 0 at every position: the stand-in's RoPE is the identity (pre- = post-RoPE queries)."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        shape = (*position_ids.shape, x.shape[-1])
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)


def stand_in_model(case: dict) -> nn.Module:
    """What a method that needs the model (`Method.needs_model`) reads from it, as the case's official run had it:
    the identity rotary embedding and each layer's output projection `o_proj`."""
    if case.get("stand_in", {}).get("rotary") != "identity":
        raise KvbenchError(f"method {case['method']} needs the model, and the case defines no stand-in for it")
    layers = nn.ModuleList()
    for layer in range(case["num_layers"]):
        weight = synthetic_o_proj(case["seed"], layer, case["num_heads"], case["head_dim"])
        if sha256_of(weight) != case["layers"][layer]["sha256_o_proj"]:
            raise KvbenchError(f"layer {layer}: regenerated o_proj does not match the case's sha256")
        attention = nn.Module()
        attention.o_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        attention.o_proj.weight.data.copy_(weight)
        layers.append(attention)
    return nn.ModuleDict({"rotary_emb": IdentityRotaryEmbedding(), "layers": layers})


def sha256_of(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def weights_digest(model) -> str:
    """sha256 over a model's parameters in name order, as float32 bytes: how a peer's case or timing proves it ran
    the same weights (the scripts that run in kvpress's own environment compute the same digest on their side)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def load_case(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KvbenchError(f"cannot read golden case {path}: {err}") from err


def method_for_case(case: dict):
    """Our method configured as the case's official run: the registered name, the case's budget and head layout,
    and its parameters (translated by the registry where the official code names them differently)."""
    name = case["method"]
    if not registry.is_registered(name):
        raise MethodNotImplemented(f"method not implemented: {name}")
    spec = registry.get(name)
    params = dict(case.get("params", {}))
    if spec.official_params is not None:
        params = spec.official_params(params)
    if spec.preset.get("cache_heads", case["cache_heads"]) != case["cache_heads"]:
        raise KvbenchError(f"case stores {case['cache_heads']} but method {name} fixes {spec.preset['cache_heads']}")
    return build_method(name, budget=case["budget"], **{"cache_heads": case["cache_heads"], **params})


def run_case(case: dict) -> list[list[list[int]]]:
    """Kept original positions [layer][head] for the case, computed by our method on the regenerated inputs."""
    method = method_for_case(case)
    if method.needs_model:
        method.bind(stand_in_model(case))
    num_layers, seq_len = case["num_layers"], case["seq_len"]
    cache = CompressedCache(num_layers)
    method.begin(seq_len, num_layers)
    for layer_idx in range(num_layers):
        q, k, v = synthetic_layer(case["seed"], layer_idx, case["num_heads"], case["num_kv_heads"], seq_len,
                                  case["head_dim"])
        expected = case["layers"][layer_idx]
        for name, tensor in (("query", q), ("key", k), ("value", v)):
            if sha256_of(tensor) != expected[f"sha256_{name}"]:
                raise KvbenchError(f"layer {layer_idx}: regenerated {name} tensor does not match the case's sha256 "
                                   f"(different torch version or generator?)")
        cache.update(k, v, layer_idx)
        method.compress_layer(cache.rank(layer_idx), q, k, v, cache.compressed)  # as the attention wrapper calls it
    kept = cache.kept_positions()
    if case["cache_heads"] == "per_query_head":  # uncompressed layers hold KV heads; the case lists query heads
        group = case["num_heads"] // case["num_kv_heads"]
        kept = [heads if len(heads) == case["num_heads"] else [h for h in heads for _ in range(group)]
                for heads in kept]
    return kept


def compare(case: dict, kept) -> list[str]:
    """Problems found comparing `kept` with the case, by the rule of FORMAT.md: the window part (positions >=
    seq_len - window) as a multiset; the prefix part distinct, of the expected size, and equal to the expected
    positions outside the case's tied positions."""
    cut = case["seq_len"] - case["params"].get("window_size", 0)
    if len(kept) != case["num_layers"]:
        return [f"{len(kept)} layers, expected {case['num_layers']}"]
    problems = []
    for layer_idx, (want_layer, got_layer) in enumerate(zip(case["layers"], kept)):
        want_heads = want_layer["kept_positions"]
        if len(got_layer) != len(want_heads):
            problems.append(f"layer {layer_idx}: {len(got_layer)} heads, expected {len(want_heads)}")
            continue
        for head, (want, got, tied) in enumerate(zip(want_heads, got_layer, want_layer["tied_positions"])):
            problems += _compare_head(f"layer {layer_idx} head {head}", want, [int(p) for p in got], set(tied), cut)
    return problems


def _compare_head(where: str, want: list[int], got: list[int], tied: set[int], cut: int) -> list[str]:
    problems = []
    if Counter(p for p in want if p >= cut) != Counter(p for p in got if p >= cut):
        problems.append(f"{where}: window part differs")
    want_prefix = [p for p in want if p < cut]
    got_prefix = [p for p in got if p < cut]
    if len(got_prefix) != len(want_prefix) or len(set(got_prefix)) != len(got_prefix):
        problems.append(f"{where}: kept {len(got_prefix)} prefix tokens (distinct: {len(set(got_prefix))}), "
                        f"expected {len(want_prefix)}")
    elif set(got_prefix) - tied != set(want_prefix) - tied:
        extra = sorted(set(got_prefix) - set(want_prefix))[:5]
        missing = sorted(set(want_prefix) - set(got_prefix))[:5]
        problems.append(f"{where}: extra {extra} missing {missing}")
    return problems


def case_paths(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders of cases (`*.json`, sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.glob("*.json"))
        elif path.is_file():
            found.append(path)
        else:
            raise KvbenchError(f"no golden case file or folder at {path}")
    return found
