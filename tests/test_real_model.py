"""Real-model checks on the embedded SmolLM2 (slow: `make test-slow`)."""
from __future__ import annotations

import pytest

from conftest import SHARED_LONGBENCH
from kvbench.config import compose, output_dir
from kvbench.pipeline import evaluate
from kvbench.results import read_predictions

pytestmark = pytest.mark.slow


def test_smollm2_finds_the_needle_with_its_chat_template(tmp_path):
    """Protocol reference section 13: FullKV scores 1.0 at 1000 and 2000 tokens through the chat template."""
    cfg = compose(["benchmark=needle", "method=fullkv", f"results_root={tmp_path}", "progress=false",
                   "benchmark.grid.start=1000", "benchmark.grid.end=2000", "benchmark.grid.step=1000",
                   "benchmark.grid.depths=3"])
    scores = evaluate(cfg)
    lines = read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")
    assert [r["score"] for r in lines] == [1.0] * 6, [r["response"] for r in lines]
    assert scores["mean_score"] == 1.0


def test_smollm2_raw_needle_prompt_gives_empty_answers(tmp_path):
    """The papers' raw prompt makes SmolLM2 stop at once (why its config uses the chat prompt)."""
    cfg = compose(["benchmark=needle", "benchmark.prompt=raw", "method=fullkv", f"results_root={tmp_path}",
                   "progress=false", "benchmark.grid.start=1000", "benchmark.grid.end=1000",
                   "benchmark.grid.step=1000", "benchmark.grid.depths=2"])
    evaluate(cfg)
    assert [r["response"] for r in read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")] == ["", ""]


def test_smollm2_passage_retrieval_with_and_without_compression(tmp_path):
    """A compressed run keeps the budget in every layer and produces a real answer on real data."""
    base = [f"benchmark.data_dir={SHARED_LONGBENCH}", "benchmark.tasks=[passage_retrieval_zh]", "benchmark.limit=1",
            "model.max_input_len=2048", f"results_root={tmp_path}", "progress=false"]
    full = evaluate(compose(base + ["method=fullkv"]))
    cfg = compose(base + ["method=dynamickv", "budget=128"])
    evaluate(cfg)
    [line] = read_predictions(output_dir(cfg) / "predictions" / "passage_retrieval_zh.jsonl")
    kept = line["layer_kept"]
    # Official mode on 30 layers: the last update is at layer 27, so layers 28-29 keep the temporary maximum
    # (10 x 120 + window 8); the first 28 share the whole-model prefix budget 120 x 30 (less where the official
    # slice runs past what a layer holds).
    assert kept[28:] == [1208, 1208] and sum(kept[:28]) <= 120 * 30 + 8 * 28
    assert line["kv_bytes"] == sum(kept) * 9 * 64 * 2 * 4  # 9 query heads (official layout), head_dim 64, fp32
    assert line["new_tokens"] > 0 and full["n"]["passage_retrieval_zh"] == 1


@pytest.mark.parametrize("model_name", ["smollm2_135m", "gemma3_270m"])
def test_converted_copy_of_a_gguf_model_is_the_same_model(tmp_path, monkeypatch, capsys, model_name):
    # The first load converts the GGUF and keeps the copy; the second reads the copy: same tokenizer (ids, chat
    # template, special tokens), same weights, same generated tokens.
    import importlib.util
    import os
    import time

    import torch
    from omegaconf import OmegaConf

    from kvbench.engine import generate
    from kvbench.models import (CONVERTED_MARK, ModelSpec, _cached_tokenizer, converted_damage, converted_folder,
                                load_model)

    spec = ModelSpec.from_config(OmegaConf.to_container(compose([f"model={model_name}"]).model, resolve=True))
    if importlib.util.find_spec(spec.gguf_package) is None:
        pytest.skip(f"{spec.gguf_package} is not installed (make gemma)")
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    _cached_tokenizer.cache_clear()
    start = time.perf_counter()
    model_a, tok_a = load_model(spec)
    first = time.perf_counter() - start
    assert (converted_folder(spec, torch.float32) / CONVERTED_MARK).is_file()
    _cached_tokenizer.cache_clear()
    start = time.perf_counter()
    model_b, tok_b = load_model(spec)
    second = time.perf_counter() - start
    texts = ["The best thing to do in San Francisco is", "Ünïcödé 中文 \n\n  tabs\tand 1234567 <|endoftext|>"]
    for text in texts:
        assert tok_a(text).input_ids == tok_b(text).input_ids
        assert tok_a.encode(text, add_special_tokens=False) == tok_b.encode(text, add_special_tokens=False)
    assert (tok_a.bos_token_id, tok_a.eos_token_id, tok_a.pad_token_id) == \
        (tok_b.bos_token_id, tok_b.eos_token_id, tok_b.pad_token_id)
    assert tok_a.chat_template == tok_b.chat_template and len(tok_a) == len(tok_b)
    assert model_a.generation_config.eos_token_id == model_b.generation_config.eos_token_id
    state_b = model_b.state_dict()
    assert all(torch.equal(value, state_b[name]) for name, value in model_a.state_dict().items())
    ids = torch.tensor([tok_a(texts[0]).input_ids])
    assert generate(model_a, ids, None, max_new_tokens=12).token_ids == \
        generate(model_b, ids, None, max_new_tokens=12).token_ids
    print(f"{model_name}: GGUF load + conversion {first:.1f} s, converted copy {second:.1f} s")
    assert second < first
    if model_name == "smollm2_135m":  # a truncated copy is noticed, said in one line, read from the GGUF and rebuilt
        folder = converted_folder(spec, torch.float32)
        # A new, truncated file (model_b maps the old one: truncating it in place would crash model_b's reads).
        (folder / "cut").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
        os.replace(folder / "cut", folder / "model.safetensors")
        capsys.readouterr()
        _cached_tokenizer.cache_clear()
        model_c, _ = load_model(spec)
        assert "is damaged (model.safetensors has 1000 bytes" in capsys.readouterr().err
        assert converted_damage(folder) is None
        state_a = model_a.state_dict()
        assert all(torch.equal(value, state_a[name]) for name, value in model_c.state_dict().items())


@pytest.mark.parametrize("bench", [
    ["benchmark=needle", "benchmark.grid.start=1000", "benchmark.grid.end=2000", "benchmark.grid.step=1000",
     "benchmark.grid.depths=3"],
    ["benchmark=ruler", "benchmark.tasks=[niah_single_1,niah_multikey_1]", "benchmark.lengths=[1024]",
     "benchmark.samples=3"]], ids=["needle", "ruler"])
def test_smollm2_batch_4_with_packed_prefills_gives_batch_1_predictions(tmp_path, bench):
    """The demo's needle and RULER on SmolLM2 with SnapKV-128: batch 4 (prompts packed into shared prefill
    forwards) writes batch 1's answers, kept tokens and scores."""
    import json

    runs = {}
    for size in (1, 4):
        cfg = compose(bench + ["method=snapkv", "budget=128", f"batch_size={size}", "prefill_pack_tokens=8192",
                               f"results_root={tmp_path / str(size)}", "progress=false"])
        scores = evaluate(cfg)
        folder = output_dir(cfg)
        lines = sorted(json.dumps({k: v for k, v in r.items() if not k.endswith("_s")}, sort_keys=True)
                       for path in sorted((folder / "predictions").glob("*.jsonl")) for r in read_predictions(path))
        timing = json.loads((folder / "run.json").read_text())["sessions"][-1]["timing"]
        runs[size] = (scores, lines, timing)
    (one, alone, _), (four, batched, timing) = runs[1], runs[4]
    assert timing["batch_size"] == 4 and timing["packed_prefills"] > 0
    assert len(alone) >= 6 and batched == alone  # answers, scores, kept tokens per layer, KV bytes: all but times
    assert {k: v for k, v in four.items() if not k.endswith("_s")} == {k: v for k, v in one.items()
                                                                           if not k.endswith("_s")}


def test_smollm2_packed_prefill_logits_differ_from_batch_1_only_in_the_last_bits():
    """Four 512-token essay prompts prefilled packed against one by one (SnapKV-128, float32): the same kept
    positions and cached keys, last-token logits within 1e-4 (measured: 7.6e-6; README "Batched evaluation")."""
    import torch

    from conftest import cached_model
    from kvbench.batching import fork_method
    from kvbench.engine import prefill, prefill_packed
    from kvbench.methods import build_method
    from kvbench.needle.haystack import haystack_token_ids, load_haystack

    model, tok = cached_model("smollm2_135m")
    ids = haystack_token_ids(tok, load_haystack(), 4 * 512)
    prompts = [torch.tensor([ids[i * 512:(i + 1) * 512]]) for i in range(4)]
    method = build_method("snapkv", budget=128)
    alone = [prefill(model, p, method) for p in prompts]
    packed = prefill_packed(model, prompts, [fork_method(method) for _ in prompts])
    diff = max((a.logits - b.logits).abs().max().item() for a, b in zip(alone, packed))
    assert diff < 1e-4
    for a, b in zip(alone, packed):
        assert a.cache.kept_positions() == b.cache.kept_positions()
        assert all(torch.equal(x.keys, y.keys) for x, y in zip(a.cache.layers, b.cache.layers))
