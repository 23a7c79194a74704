"""KVzip against kvpress 0.5.5 run unmodified (`scripts/golden/kvpress_055.py kvzip`): the same model (weights
digest), the same token ids, kvpress's settings -> the same kept positions in every layer and KV head.

The tiny-model cases run in the fast suite; the SmolLM2 ones (prompts of 300 to 1,900 tokens) are slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, cached_model
from kvbench.engine import prefill
from kvbench.golden import weights_digest
from kvbench.methods import build_method

CASES = sorted((REPO / "tests" / "golden" / "kvpress-0.5.5").glob("kvzip_*.json"))
SLOW_MODELS = {"smollm2_135m"}


def case_params(path: Path):
    case = json.loads(path.read_text())
    marks = [pytest.mark.slow] if case["model"] in SLOW_MODELS else []
    return pytest.param(path, marks=marks, id=path.stem)


def kvbench_kept(case: dict) -> list[list[list[int]]]:
    model, tok = cached_model(case["model"])
    assert weights_digest(model) == case["weights_sha256"], "not the model kvpress ran"
    p = case["params"]
    method = build_method("kvzip", compression_ratio=p["compression_ratio"], layerwise=p["layerwise"],
                          n_sink=p["n_sink"], plus=p["kvzip_plus_normalization"], chunk_size=p["chunk_size"],
                          preamble="chat_template")
    method.bind(model, tok)
    assert method.preamble_length == case["preamble_length"]
    torch.set_num_threads(1)
    cache = prefill(model, torch.tensor([case["input_ids"]]), method).cache
    return [[sorted(head) for head in layer] for layer in cache.kept_positions()]


def test_cases_exist_for_both_models():
    models = {json.loads(p.read_text())["model"] for p in CASES}
    assert {"tiny_llama", "smollm2_135m"} <= models


@pytest.mark.parametrize("path", [case_params(p) for p in CASES])
def test_kvzip_keeps_what_kvpress_055_keeps(path):
    case = json.loads(path.read_text())
    got = kvbench_kept(case)
    want = case["kept_positions"]
    equal = sum(g == w for gl, wl in zip(got, want) for g, w in zip(gl, wl))
    heads = case["num_layers"] * case["num_kv_heads"]
    assert equal == heads, f"{equal}/{heads} layer-heads equal"
    total = sum(len(h) for layer in want for h in layer)
    layers = 1 if case["params"]["layerwise"] else case["num_layers"]  # layerwise: int(H_kv * n * ratio) per layer
    numel = layers * case["num_kv_heads"] * case["seq_len"]
    assert total == (numel - int(numel * case["params"]["compression_ratio"])) * (case["num_layers"] // layers)


def test_kvzip_settings_are_checked_and_kvzip_plus_is_the_plus_flag():
    from kvbench.errors import KvbenchError

    with pytest.raises(KvbenchError, match="preamble='model'"):
        build_method("kvzip", budget=64, preamble="model")
    with pytest.raises(KvbenchError, match="compression_ratio=1"):
        build_method("kvzip", compression_ratio=1.0)
    with pytest.raises(KvbenchError, match="no window"):
        build_method("kvzip", compression_ratio=0.5, window_size=8)
    assert build_method("kvzip_plus", budget=64).plus and not build_method("kvzip", budget=64).plus
    with pytest.raises(KvbenchError, match="fixes"):
        build_method("kvzip_plus", budget=64, plus=False)
