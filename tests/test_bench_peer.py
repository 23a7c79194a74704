"""The bench's kvpress peer column (benchmarks/peer.py): the columns it writes with a stand-in peer that speaks the
protocol of benchmarks/kvpress_peer.py (no kvpress needed), the clean skip without a peer, the errors; and, slow,
kvpress 0.5.5 itself in its own environment keeping the same positions as kvbench on the same model and ids."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks import bench, peer  # noqa: E402

KVPRESS_PYTHON = Path("/work/kvpress-venv/bin/python")
TINY = dict(model="tiny_llama", prefill_lengths=[160], decode_lengths=[160], decode_budgets=[64], repeats=3,
            decode_steps=2, kv_check_length=160, kv_check_budgets=[64], adaptive_budget=0, prefill_budget=128)

FAKE_PEER = '''#!{python}
"""A stand-in for kvpress_peer.py: the same protocol; it loads the model folder it is sent (for the weights'
sha256), logs each request and answers every prefill with {seconds} s."""
import hashlib, json, os, sys

log = open(os.environ["FAKE_PEER_LOG"], "a")
for line in sys.stdin:
    req = json.loads(line)
    log.write(line)
    log.flush()
    if req["op"] == "load":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(req["model_dir"])
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
        reply = {{"kvpress": "fake", "torch": "t", "transformers": "x", "python": "p", "threads": req["threads"],
                 "weights_sha256": h.hexdigest()}}
    elif {fail_prefill}:
        reply = {{"error": "RuntimeError: the stand-in fails here"}}
    else:
        reply = {{"seconds": {seconds}, "tokenizer_s": 0.0}}
    print(json.dumps(reply), flush=True)
'''


def fake_peer(tmp_path: Path, seconds: float = 1000.0, fail_prefill: bool = False) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_PEER.format(python=sys.executable, seconds=seconds, fail_prefill=fail_prefill))
    path.chmod(0o755)
    return path


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_bench_writes_the_peer_columns_from_a_peer_that_returns_json(tmp_path, monkeypatch, one_thread):
    python = fake_peer(tmp_path)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_PEER_LOG", str(log))
    settings = bench.Settings(**TINY, methods=["knorm", "adakv"], peer_python=str(python))
    record = bench.run_cpu(settings, skip_scorers=True)
    section = record["peer"]
    assert section["same_weights"] and section["peer"]["kvpress"] == "fake" and section["threads"] == 1
    rows = section["lengths"]["160"]
    assert list(rows) == ["knorm", "adakv_gqa"]  # the pairs of the chosen methods, Ada-SnapKV as kvpress's GQA one
    for row in rows.values():
        assert row["kvpress_raw_s"] == [1000.0] * 3 and row["kvpress_s"] == 1000.0
        assert len(row["kvbench_raw_s"]) == 3 and row["kvbench_s"] == statistics.median(row["kvbench_raw_s"]) > 0
        assert row["ratio_vs_kvpress"] == statistics.median(t / 1000.0 for t in row["kvbench_raw_s"])
        assert row["same_positions"] is None and "kvpress_tokenizer_s" not in row  # the stand-in sends neither
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    assert requests[0]["op"] == "load" and requests[0]["threads"] == 1 and requests[0]["dtype"] == "float32"
    prefills = [r for r in requests if r["op"] == "prefill"]
    assert len(prefills) == 2 * (1 + 3)  # per pair: the warm-up with kept positions, then 3 timed repeats
    ids = bench.prompt_ids(160, 49152, "cpu", settings.seed)[0].tolist()
    assert all(r["ids"] == ids for r in prefills)  # the prefill table's ids
    knorm = prefills[0]["press"]
    assert knorm["press"] == "KnormPress" and int(160 * (1 - knorm["params"]["compression_ratio"])) == 128
    ada = [r["press"] for r in prefills if r["press"]["press"] == "AdaKVPress"][0]
    assert ada["inner"]["press"] == "SnapKVPress" and ada["inner"]["params"]["window_size"] == 64
    labels = {t["target"]: t for t in record["targets"]}
    assert labels["knorm prefill <= 1.05x kvpress KnormPress"]["passed"]  # 1000 s is slow
    table = bench.summary_table(record)
    assert "Peer: kvpress fake" in table and f"({rows['knorm']['ratio_vs_kvpress']:.3f}x)" in table


def run_peer(settings: "bench.Settings", python: str | None) -> dict:
    from conftest import cached_model

    model, tok = cached_model("tiny_llama")
    return peer.bench_peer(model, tok, settings, python, lambda n: bench.prompt_ids(n, len(tok), "cpu"))


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_a_faster_peer_fails_the_target(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("FAKE_PEER_LOG", str(tmp_path / "log"))
    section = run_peer(bench.Settings(**TINY, methods=["tova"]), str(fake_peer(tmp_path, seconds=1e-6)))
    target = peer.targets(section)
    assert len(target) == 1 and not target[0]["passed"] and target[0]["measured"] > 1.05
    assert target[0]["target"] == "tova prefill <= 1.05x kvpress TOVAPress" and target[0]["at_tokens"] == 160


def test_no_peer_skips_the_column_with_a_note(monkeypatch, one_thread, capsys):
    monkeypatch.delenv(peer.PEER_ENV, raising=False)
    monkeypatch.setattr(peer, "kvpress_here", lambda: False)  # whatever this python has
    assert peer.resolve_python(None) is None
    record = bench.run_cpu(bench.Settings(**TINY, methods=["knorm"]), skip_scorers=True)
    assert "kvpress not found" in record["peer"]["skipped"] and record["prefill"]["sdpa"]["160"]["knorm"]
    assert "peer: kvpress column skipped: kvpress not found" in capsys.readouterr().out
    assert not [t for t in record["targets"] if "kvpress" in t["target"]]
    assert "Peer (kvpress): skipped: kvpress not found" in bench.summary_table(record)


def test_the_environment_variable_names_the_peer(tmp_path, monkeypatch):
    monkeypatch.setenv(peer.PEER_ENV, str(fake_peer(tmp_path)))
    assert peer.resolve_python(None) == str(tmp_path / "fake-python")
    assert peer.resolve_python(sys.executable) == sys.executable  # --peer-python wins


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_a_peer_that_fails_is_recorded_and_the_bench_goes_on(tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.setenv("FAKE_PEER_LOG", str(tmp_path / "log"))
    section = run_peer(bench.Settings(**TINY, methods=["knorm"]), str(fake_peer(tmp_path, fail_prefill=True)))
    assert section == {"skipped": "the peer failed: RuntimeError: the stand-in fails here"}
    assert "kvpress column skipped" in capsys.readouterr().out and peer.targets(section) == []


@pytest.mark.skipif(importlib.util.find_spec("kvpress") is not None, reason="kvpress is installed in this python")
def test_a_peer_python_without_kvpress_says_why(one_thread):
    """The real peer script under a python without kvpress: the import error comes back as the reason."""
    section = run_peer(bench.Settings(**TINY, methods=["knorm"]), sys.executable)
    assert section["skipped"].startswith("the peer failed") and "kvpress" in section["skipped"]


@pytest.mark.parametrize("argv, message", [
    (["--peer-python", "/nonexistent/python"], "--peer-python /nonexistent/python (or $KVBENCH_PEER_PYTHON): no such"),
    (["--peer-lengths", "2048", "100"], "--peer-lengths 100: a prompt must be longer than the budget"),
])
def test_bad_peer_settings_are_one_line_errors_before_the_model_loads(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "load_bench_model", lambda *a: pytest.fail("the model loaded"))
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_same_positions_counts_equal_lists_and_differing_positions():
    ours = [[[0, 1, 5], [2, 3, 4]], [[7, 8, 9], [1, 2, 3]]]
    theirs = [[[5, 1, 0], [2, 3, 6]], [[7, 8, 9], [0, 1, 2]]]
    assert peer.same_positions(ours, theirs) == {"layer_heads_equal": 2, "layer_heads": 4, "positions_differing": 4,
                                                 "shape_matches": True}
    assert not peer.same_positions(ours, theirs[:1])["shape_matches"]


@pytest.mark.parametrize("n, budget", [(1100, 128), (2048, 128), (160, 128), (8192, 128), (4096, 512)])
def test_compression_ratio_keeps_the_budget_under_kvpress_rounding(n, budget):
    assert int(n * (1 - peer.compression_ratio(n, budget))) == budget


@pytest.mark.slow
@pytest.mark.skipif(not KVPRESS_PYTHON.exists(), reason="kvpress 0.5.5's own environment is not at /work/kvpress-venv")
def test_kvpress_itself_keeps_kvbenchs_positions_on_the_same_model_and_ids(one_thread):
    """kvpress 0.5.5 unmodified, every pair, tiny Llama: same weights, and the same kept positions in every layer
    and KV head (README text, 300 tokens); kvpress's KVzip time includes a tokenizer load, which is reported."""
    from conftest import cached_model

    model, tok = cached_model("tiny_llama")
    text = (REPO / "README.md").read_text()
    settings = bench.Settings(model="tiny_llama", prefill_lengths=[300], repeats=1)
    section = peer.bench_peer(model, tok, settings, str(KVPRESS_PYTHON),
                              lambda n: torch.tensor([tok.encode(text, add_special_tokens=False)[:n]]))
    assert section["peer"]["kvpress"] == "0.5.5" and section["same_weights"]
    rows = section["lengths"]["300"]
    assert list(rows) == [p.name for p in peer.PAIRS]
    for name, row in rows.items():
        assert row["same_positions"] == {"layer_heads_equal": 8, "layer_heads": 8, "positions_differing": 0,
                                         "shape_matches": True}, name
        assert row["kvpress_s"] > 0 and row["ratio_vs_kvpress"] > 0
    assert rows["kvzip"]["kvpress_tokenizer_s"] > 0 and "kvpress_tokenizer_s" not in rows["knorm"]
