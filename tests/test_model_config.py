"""A model config is `name` + `hub_id`: the paper settings live with the protocol / needle configs, and the
training length comes from the model's own config (max_position_embeddings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from kvbench.config import compose, validate
from kvbench.errors import KvbenchError
from kvbench.models import EMBEDDED, load_tokenizer
from kvbench.pipeline import prepare
from kvbench.results import MOVED_MODEL_KEYS, RunStore, fingerprint

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
CONTEXT = 1536  # the tiny model's max_position_embeddings: what trained_len must become


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A tiny random llama saved as a local folder (weights, config, tokenizer), and a config dir whose model
    config holds only its name and that folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bare")
    tokenizer = load_tokenizer(EMBEDDED)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)
    LlamaForCausalLM(config).save_pretrained(root / "weights")
    tokenizer.save_pretrained(root / "weights")
    (root / "configs" / "model").mkdir(parents=True)
    (root / "configs" / "model" / "bare.yaml").write_text(f"name: bare\nhub_id: {root / 'weights'}\n")
    return root


def _args(root, tmp_path, *extra):
    return [f"hydra.searchpath=[file://{root / 'configs'}]", "model=bare", "method=snapkv", "budget=64",
            f"results_root={tmp_path}", "progress=false", *extra]


def _run(root, tmp_path, *extra):
    return subprocess.run([sys.executable, "run.py", *_args(root, tmp_path, *extra)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=ONE_THREAD)


def _record(tmp_path, benchmark):
    [run] = (tmp_path / "bare" / benchmark).glob("*/run.json")
    return json.loads(run.read_text())


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_a_name_and_hub_id_model_runs_longbench_needle_and_ruler(bare_model, tmp_path):
    data, hay = tmp_path / "data", tmp_path / "hay"
    data.mkdir(), hay.mkdir()
    rows = [{"input": f"段落{i}?", "context": "段落1：天空。段落2：大海。" * 30, "answers": [f"段落{i}"], "length": 300,
             "all_classes": None, "_id": f"id{i}", "dataset": "passage_retrieval_zh", "language": "zh"} for i in (1, 2)]
    (data / "passage_retrieval_zh.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                     encoding="utf-8")
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 60)
    runs = {
        "longbench": _run(bare_model, tmp_path, f"benchmark.data_dir={data}", "benchmark.verify_checksums=false",
                          "benchmark.tasks=[passage_retrieval_zh]"),
        "needle": _run(bare_model, tmp_path, "benchmark=needle", f"benchmark.haystack_dir={hay}",
                       "benchmark.grid.start=300", "benchmark.grid.end=300", "benchmark.grid.step=100",
                       "benchmark.grid.depths=2"),
        "ruler": _run(bare_model, tmp_path, "benchmark=ruler", "benchmark.lengths=[1024]", "benchmark.samples=1",
                      "benchmark.tasks=[niah_single_1]", f"benchmark.haystack_dir={hay}"),
    }
    for benchmark, proc in runs.items():
        assert proc.returncode == 0, (benchmark, proc.stderr[-2000:])
        record = _record(tmp_path, benchmark)
        assert record["status"] == "complete" and record["model"]["trained_len"] == CONTEXT
    longbench = _record(tmp_path, "longbench")
    assert (longbench["method"]["pooling"], longbench["method"]["window_size"]) == ("avgpool", 32)
    assert _record(tmp_path, "needle")["protocol"] == "needle_raw"
    # RULER checks its lengths against the context read from the model's config, before any weights load
    with pytest.raises(KvbenchError, match=f"exceed bare's context of {CONTEXT} tokens"):
        prepare(_compose(bare_model, tmp_path, "benchmark=ruler", "benchmark.lengths=[2048]"))


def _compose(root, tmp_path, *extra):
    """The config run.py composes with the bare model config on Hydra's search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=_args(root, tmp_path, *extra))


def test_an_embedded_model_without_trained_len_gets_a_clear_ruler_error(tmp_path):
    cfg = compose(["model=smollm2_135m", "benchmark=ruler", "~model.trained_len", f"results_root={tmp_path}",
                   "benchmark.lengths=[1024]"])
    with pytest.raises(KvbenchError, match="model.trained_len=<tokens>"):
        prepare(cfg)


@pytest.mark.parametrize("key,place", [("paper_pooling", "protocol.methods.pooling"),
                                       ("needle_prompt", "benchmark.prompt")])
def test_a_moved_model_key_is_refused_not_ignored(key, place):
    cfg = compose(["model=tiny_llama", f"+model.{key}=x"])
    with pytest.raises(KvbenchError, match=f"model.{key} is no longer a model setting; set {place}"):
        validate(cfg)


@pytest.mark.parametrize("hub_id,pooling,radio_max,prompt", [
    ("Qwen/Qwen2-7B-Instruct", "maxpool", 5, "raw"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "maxpool", 10, "raw"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "avgpool", 10, "raw"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "avgpool", 10, "chat"),
    ("some/other-model", "avgpool", 10, "raw"),
])
def test_paper_settings_follow_the_hub_id(hub_id, pooling, radio_max, prompt):
    cfg = compose(["model=tiny_llama", f"+model.hub_id={hub_id}", "method=dynamickv", "benchmark=needle"])
    assert (cfg.method.pooling, cfg.method.radio_max, cfg.benchmark.prompt) == (pooling, radio_max, prompt)
    factory = compose(["model=tiny_llama", f"+model.hub_id={hub_id}", "method=dynamickv", "protocol=kvcache_factory"])
    assert (factory.method.pooling, factory.method.radio_max) == ("maxpool", radio_max)


def test_folders_recorded_before_the_move_are_still_the_same_settings(tmp_path):
    settings = {"model": {"name": "m", "extra": {}}, "seed": 1}
    old = {"model": {"name": "m", "extra": {k: "x" for k in MOVED_MODEL_KEYS}}, "seed": 1}
    folder = tmp_path / "run"
    (folder / "predictions").mkdir(parents=True)
    (folder / "predictions" / "t.jsonl").write_text('{"_id": 1}\n')
    (folder / "run.json").write_text(json.dumps({"fingerprint": fingerprint(old), "settings": old}))
    RunStore(folder, settings, {}).check()  # resumable: no refusal
    other = {**settings, "seed": 2}
    with pytest.raises(KvbenchError, match="different settings"):
        RunStore(folder, other, {}).check()
