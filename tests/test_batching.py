"""Batched evaluation (`batch_size`, kvbench.batching): batched decoding equals batch 1 token for token with the
same kept positions for every registered method, both query modes and decoding-time compression; continuous
batching; batch_size=auto; bad input and out of memory."""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompt
from kvbench.engine import ContextCache, generate
from kvbench.scheduler import auto_batch_size, check_batch_size, check_pack_tokens, generate_requests
from kvbench.errors import KvbenchError
from kvbench.methods import build_method, registry
from kvbench.requests import Request
from test_decoding import SCHEDULED, decoding_method
from test_methods_generic import paper

NAMES = registry.names(builtin_only=True)
LENGTHS = (70, 41, 96, 58, 83, 47)  # prompts of different lengths (all above the budget)
NEW = (9, 4, 13, 7, 11, 6)  # and different stop points (max_new_tokens; stop tokens below)
BUDGET = 32


def build(name: str, model, tok, interval: int | None = None):
    if interval:
        method = decoding_method(name, budget=BUDGET, interval=interval)
    else:
        method = paper(name, budget=BUDGET)
    if method.needs_model:
        method.bind(model, tok)
    return method


def make_requests(model, agnostic: bool, stops: dict[int, int] | None = None) -> list[Request]:
    """Six requests; query-agnostic: the first two share a context (ask-many), the question is the last 12 tokens."""
    vocab, stops = model.config.vocab_size, stops or {}
    requests = []
    for i, (n, new) in enumerate(zip(LENGTHS, NEW)):
        ids = random_prompt(n, vocab, seed=100 + i)[0].tolist()
        if agnostic and i == 1:  # request 0's context, another question
            ids = requests[0].input_ids + random_prompt(12, vocab, seed=7)[0].tolist()
        stop = (stops[i],) if i in stops else ()
        if agnostic:
            requests.append(Request(ids[:-12], new, stop, min_new_tokens=2 if i == 3 else 0,
                                    question_ids=ids[-12:], key=i))
        else:
            requests.append(Request(ids, new, stop, min_new_tokens=2 if i == 3 else 0, key=i))
    return requests


def run(model, requests, method, batch_size, agnostic):
    contexts = ContextCache() if agnostic else None
    report = {}
    out = list(generate_requests(model, requests, method, batch_size=batch_size, contexts=contexts,
                                 record_kept=True, repetition_penalty=1.1, report=report))
    if batch_size > 1:  # prompts (agnostic: contexts) filling free slots together share a packed prefill forward
        assert report["packed_prefills"] > 0 and report["prefill_pack_tokens"] == 2048
    if agnostic:  # requests 0 and 1 share a context: compressed once (ask-many), at every batch size
        assert contexts.stats()["context_prefills_avoided"] == 1
        assert contexts.stats()["context_prefills"] == len(requests) - 1
    return out


def assert_same(one, many):
    assert sorted(r.key for r, _ in many) == [r.key for r, _ in one]
    by_key = {r.key: out for r, out in many}
    for request, alone in one:
        batched = by_key[request.key]
        assert batched.token_ids == alone.token_ids, request.key
        assert batched.stopped == alone.stopped
        assert batched.kept_positions == alone.kept_positions, request.key
        assert batched.layer_kept == alone.layer_kept and batched.kv_bytes == alone.kv_bytes
        assert batched.method_record == alone.method_record
        assert batched.decode_cuts == alone.decode_cuts and batched.peak_kv_bytes == alone.peak_kv_bytes


def check_method(model, tok, name, agnostic, interval=None):
    method = build(name, model, tok, interval)
    probe = run(model, make_requests(model, agnostic), method, 1, agnostic)
    # stop tokens that end requests 1 and 4 early (at their 3rd and 5th token), min_new_tokens on request 3
    stops = {1: probe[1][1].token_ids[2], 4: probe[4][1].token_ids[4], 3: probe[3][1].token_ids[0]}
    requests = make_requests(model, agnostic, stops)
    one = run(model, requests, method, 1, agnostic)
    assert [r.key for r, _ in one] == list(range(len(requests)))  # batch 1: in order
    many = run(model, requests, method, 4, agnostic)
    assert_same(one, many)
    return one, many


@pytest.mark.parametrize("agnostic", [False, True], ids=["aware", "agnostic"])
@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_batch_1_for_every_method(tiny_llama, name, agnostic):
    model, tok = tiny_llama
    one, many = check_method(model, tok, name, agnostic)
    assert any(out.stopped == "stop_token" for _, out in one)  # the stop points differ
    if name != "fullkv":
        assert any(out.compressed for _, out in one)
    # completion order: a short request finishes before a longer one admitted earlier
    assert [r.key for r, _ in many] != [r.key for r, _ in one]


@pytest.mark.parametrize("agnostic", [False, True], ids=["aware", "agnostic"])
@pytest.mark.parametrize("name", SCHEDULED)
def test_batched_equals_batch_1_with_decoding_time_compression(tiny_llama, name, agnostic):
    model, tok = tiny_llama
    one, _ = check_method(model, tok, name, agnostic, interval=3)
    assert any(out.decode_cuts for _, out in one)


@pytest.mark.parametrize("name", ["snapkv", "adakv"])
def test_batched_equals_batch_1_on_every_tiny_architecture(tiny, name):
    model, tok = tiny
    check_method(model, tok, name, agnostic=False)


def test_batch_1_is_generate(tiny_llama):
    model, tok = tiny_llama
    method = build("adakv", model, tok)
    requests = make_requests(model, agnostic=False)
    for request, out in generate_requests(model, requests, method, batch_size=1):
        alone = generate(model, torch.tensor([request.input_ids]), method, max_new_tokens=request.max_new_tokens)
        assert out.token_ids == alone.token_ids and out.layer_kept == alone.layer_kept


def test_batched_logits_differ_from_batch_1_only_in_the_last_bits(tiny_llama):
    """Batching changes only the order of sums in the matrix products outside attention: bounded here."""
    from kvbench.batching import BatchedCache
    from kvbench.attention import Phase, Session, decoding_batch
    from kvbench.cache import cache_kwargs
    from kvbench.engine import decode_step, prefill

    model, _ = tiny_llama
    method = build_method("snapkv", budget=BUDGET, window_size=8)
    prompts = [random_prompt(n, model.config.vocab_size, seed=n) for n in LENGTHS[:4]]
    alone, caches = [], []
    for p in prompts:
        state = prefill(model, p, method)
        caches.append(state.cache)
        token = state.logits.argmax(-1, keepdim=True)
        alone.append((token, decode_step(model, token, p.shape[1], prefill(model, p, method).cache)))
    batch = BatchedCache(caches)
    with torch.inference_mode(), decoding_batch(batch, [Session(c, Phase.DECODE) for c in caches]):
        out = model(input_ids=torch.cat([t for t, _ in alone]), position_ids=torch.tensor([[p.shape[1]] for p in prompts]),
                    use_cache=True, **cache_kwargs(model, batch))
    diff = max((out.logits[b, -1] - logits[0]).abs().max().item() for b, (_, logits) in enumerate(alone))
    assert diff < 1e-4
    assert [int(out.logits[b, -1].argmax()) for b in range(4)] == [int(l.argmax()) for _, l in alone]


def test_continuous_batching_refills_slots_in_completion_order(tiny_llama):
    model, _ = tiny_llama
    vocab = model.config.vocab_size
    long, short = (Request(random_prompt(40, vocab, seed=i)[0].tolist(), new, key=k)
                   for i, (new, k) in enumerate(((20, "long"), (2, "short"))))
    third = Request(random_prompt(40, vocab, seed=9)[0].tolist(), 3, key="third")
    order = [r.key for r, _ in generate_requests(model, [long, short, third], None, batch_size=2)]
    assert order == ["short", "third", "long"]  # "third" took the slot "short" left and finished first


@pytest.mark.parametrize("bad", [0, -3, "abc", "1.5", True])
def test_bad_batch_size_is_a_one_line_error(bad):
    with pytest.raises(KvbenchError, match="batch_size") as err:
        check_batch_size(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [-1, "abc", "1.5", True])
def test_bad_prefill_pack_tokens_is_a_one_line_error(bad):
    with pytest.raises(KvbenchError, match="prefill_pack_tokens") as err:
        check_pack_tokens(bad, torch.device("cpu"))
    assert "\n" not in str(err.value)
    assert check_pack_tokens("auto", torch.device("cpu")) == 2048 and check_pack_tokens(0, torch.device("cpu")) == 0


def test_prefill_pack_tokens_0_prefills_each_prompt_alone_and_auto_packs(tiny_llama):
    model, tok = tiny_llama
    method = build("snapkv", model, tok)
    requests = make_requests(model, agnostic=False)
    one = run(model, requests, method, 1, False)
    for pack, packed in ((0, 0), (2048, 1), (150, 1)):  # 150: the 70 + 41 token prompts, then one at a time
        report = {}
        many = list(generate_requests(model, requests, method, batch_size=4, record_kept=True,
                                      repetition_penalty=1.1, report=report, prefill_pack_tokens=pack))
        assert_same(one, many)
        assert report["prefill_pack_tokens"] == pack and report["packed_prefills"] >= packed
        assert report["packed_prompts"] <= (2 * report["packed_prefills"] if pack == 150 else 6)
        assert (report["packed_prefills"] == 0) is (pack == 0)


def test_batch_size_in_the_config_is_validated_before_the_model_loads(tmp_path):
    from kvbench.config import compose, validate

    assert validate(compose(["batch_size=4"])).batch_size == 4
    assert validate(compose(["batch_size=auto"])).batch_size == "auto"
    assert validate(compose([])).batch_size == 1
    for bad in ("0", "-1", "abc"):
        with pytest.raises(KvbenchError, match="batch_size"):
            validate(compose([f"batch_size={bad}"]))
    assert validate(compose([])).prefill_pack_tokens == "auto"
    assert validate(compose(["prefill_pack_tokens=0"])).prefill_pack_tokens == 0
    for bad in ("-1", "abc"):
        with pytest.raises(KvbenchError, match="prefill_pack_tokens"):
            validate(compose([f"prefill_pack_tokens={bad}"]))


def test_auto_batch_size_follows_free_memory_and_prompt_length(tiny_llama):
    model, _ = tiny_llama
    method = build_method("snapkv", budget=BUDGET, window_size=8)
    per = auto_batch_size(model, method, 1000, 10 ** 12)[1]["kv_bytes_per_sequence"]
    small, why = auto_batch_size(model, method, 1000, 2 * (per * 3 + 10 ** 6))
    assert 1 <= small <= 3 and why["free_bytes"] == 2 * (per * 3 + 10 ** 6)
    assert auto_batch_size(model, method, 1000, 1)[0] == 1  # nothing free: one at a time
    assert auto_batch_size(model, method, 1000, 10 ** 12)[0] == 16  # the CPU cap
    assert auto_batch_size(model, method, 4000, 2 * (per * 3 + 10 ** 6))[0] < small or small == 1
    report = {}
    requests = make_requests(model, agnostic=False)
    outs = list(generate_requests(model, requests, method, batch_size="auto", report=report))
    assert len(outs) == len(requests) and report["batch_size"] >= 1 and "batch_size_auto" in report


def test_out_of_memory_names_batch_size_and_yields_only_finished_samples(tiny_llama, monkeypatch):
    from kvbench import scheduler

    model, _ = tiny_llama
    requests = make_requests(model, agnostic=False)
    real = scheduler.BatchedCache

    def failing(caches):
        if len(caches) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(caches)

    monkeypatch.setattr(scheduler, "BatchedCache", failing)
    done = []
    with pytest.raises(KvbenchError, match="batch_size=4") as err:
        for request, out in generate_requests(model, requests, None, batch_size=4):
            done.append(request.key)
    assert "lower batch_size" in str(err.value) and "\n" not in str(err.value)
    assert done == []  # nothing finished, nothing yielded


@pytest.mark.parametrize("error, agnostic", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 2147483648 bytes."), False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True)], ids=["cuda", "cpu", "agnostic"])
def test_auto_backs_off_on_out_of_memory_to_the_outputs_of_batch_1(tiny_llama, monkeypatch, error, agnostic):
    """batch_size=auto runs out of memory at its third batched step with all six samples decoding: it halves the
    batch, starts the unfinished samples again, and every sample is yielded once with batch 1's tokens."""
    from kvbench import scheduler

    model, tok = tiny_llama
    method = build("snapkv", model, tok)
    requests = make_requests(model, agnostic)
    one = run(model, requests, method, 1, agnostic)
    real, rows = scheduler.BatchedCache, []

    def batched(caches):
        rows.append(len(caches))
        if len(caches) > 3 and len(rows) > 2:
            raise error
        return real(caches)

    monkeypatch.setattr(scheduler, "BatchedCache", batched)
    monkeypatch.setattr(scheduler, "free_memory_bytes", lambda device: 10 ** 12)  # auto picks its cap, 16
    report = {}
    contexts = ContextCache() if agnostic else None
    many = list(generate_requests(model, requests, method, batch_size="auto", contexts=contexts, report=report,
                                  record_kept=True, repetition_penalty=1.1))
    assert rows[:3] == [6, 6, 6] and rows[3] == 3 and max(rows[3:]) <= 3  # out of memory at six, then three
    assert_same(one, many)  # each sample once, batch 1's tokens, kept positions and records
    assert report["batch_size_auto"]["batch_size"] == 16
    assert report["batch_size"] == 3 and report["batch_size_backoffs"] == 1


def backed_off_run(tiny_llama, monkeypatch, name: str, call: int, **kwargs):
    """SnapKV on the six requests at batch 1, then at batch_size=auto with `scheduler.<name>` out of memory at its
    `call`-th call (`out_of_memory_at`): (batch 1's outputs, auto's outputs, each call's `x`, auto's report)."""
    model, tok = tiny_llama
    method = build("snapkv", model, tok)
    requests = make_requests(model, agnostic=False)
    one = run(model, requests, method, 1, False)
    seen = out_of_memory_at(monkeypatch, name, call)
    report = {}
    many = list(generate_requests(model, requests, method, batch_size="auto", report=report, record_kept=True,
                                  repetition_penalty=1.1, **kwargs))
    return one, many, seen, report


def out_of_memory_at(monkeypatch, name: str, call: int) -> list:
    """`scheduler.<name>(model, x, ...)` runs out of CUDA memory at its `call`-th call (auto's free memory: plenty);
    returns the list of each call's `x`."""
    from kvbench import scheduler

    real, seen = getattr(scheduler, name), []

    def wrapped(model, x, *args, **kwargs):
        seen.append(x)
        if len(seen) == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(scheduler, name, wrapped)
    monkeypatch.setattr(scheduler, "free_memory_bytes", lambda device: 10 ** 12)
    return seen


def test_auto_backs_off_when_a_prefill_beside_live_samples_runs_out_of_memory(tiny_llama, monkeypatch):
    """The fourth prefill runs out of memory while three samples decode: the batch becomes two, the four start again
    (the three partial outputs dropped), and every sample is yielded once with batch 1's tokens. (Each prompt is
    prefilled alone here, `prefill_pack_tokens=0`; a packed prefill that runs out of memory: the next test.)"""
    one, many, started, report = backed_off_run(tiny_llama, monkeypatch, "start", 4, prefill_pack_tokens=0)
    lengths = [len(r.input_ids) for r, _ in one]
    assert [ids.shape[1] for ids in started[:8]] == lengths[:4] + lengths[:4]  # the four started again, in order
    assert_same(one, many)
    assert report["batch_size"] == 2 and report["batch_size_backoffs"] == 1
    assert report["packed_prefills"] == 0


def test_auto_backs_off_when_a_packed_prefill_runs_out_of_memory(tiny_llama, monkeypatch):
    """The six prompts go into one packed prefill forward, which runs out of memory: the batch becomes three, the six
    start again (three in one packed prefill, the others as slots free up), and every sample is yielded once with
    batch 1's tokens."""
    one, many, packs, report = backed_off_run(tiny_llama, monkeypatch, "prefill_packed", 1)
    assert [len(prompts) for prompts in packs[:2]] == [6, 3]
    assert_same(one, many)
    assert report["batch_size"] == 3 and report["batch_size_backoffs"] == 1
    assert report["packed_prefills"] == len(packs) - 1 and report["prefill_pack_tokens"] == 2048


def test_out_of_memory_with_one_sample_alone_is_a_one_line_error(tiny_llama, monkeypatch):
    from kvbench import scheduler

    model, _ = tiny_llama
    requests = make_requests(model, agnostic=False)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(scheduler, "generate", out_of_memory)
    with pytest.raises(KvbenchError, match=r"one sample alone \(batch_size=1\)") as err:
        list(generate_requests(model, requests, None, batch_size=1))
    assert "\n" not in str(err.value)
    # auto backs off to one sample at a time (6 -> 3 -> 1); one alone does not fit either
    monkeypatch.setattr(scheduler, "BatchedCache", out_of_memory)
    monkeypatch.setattr(scheduler, "decode_step", out_of_memory)
    monkeypatch.setattr(scheduler, "free_memory_bytes", lambda device: 10 ** 12)
    report = {}
    with pytest.raises(KvbenchError, match=r"one sample alone \(batch_size=auto, chosen 1 after 2 back-offs\)"):
        list(generate_requests(model, requests, None, batch_size="auto", report=report))
    assert report["batch_size"] == 1 and report["batch_size_backoffs"] == 2


def test_resume_after_a_kill_mid_batch_gives_the_same_predictions(tiny_llama):
    """A run stopped while a batch is in flight keeps only what was yielded; rerunning the rest (what a resumed run
    does) gives the predictions of an uninterrupted run."""
    model, tok = tiny_llama
    method = build("snapkv", model, tok)
    requests = make_requests(model, agnostic=False)
    whole = {r.key: out.token_ids for r, out in generate_requests(model, requests, method, batch_size=4)}
    stream = generate_requests(model, requests, method, batch_size=4)
    kept = {}
    for request, out in stream:
        kept[request.key] = out.token_ids
        if len(kept) == 2:
            break  # killed: the other live sequences never finish and are not written
    stream.close()
    rest = [r for r in requests if r.key not in kept]
    kept.update({r.key: out.token_ids for r, out in generate_requests(model, rest, method, batch_size=4)})
    assert kept == whole


def test_pipeline_run_at_batch_size_4_writes_batch_1_predictions_and_records_it(tmp_path):
    """End to end (LongBench on the tiny Llama, 4 samples decoding side by side): the same
    predictions as batch 1, and run.json records the batch size applied."""
    import json

    from kvbench.config import compose, output_dir
    from kvbench.pipeline import evaluate
    from kvbench.results import read_predictions
    from test_query_agnostic import LB_TASK, SHARED, lb_overrides

    if not SHARED.is_dir():
        pytest.skip("shared LongBench files not present")
    preds = {}
    for size in (1, 4):
        cfg = compose(lb_overrides(tmp_path / str(size), "method=snapkv", "budget=48", "method.window_size=8", "benchmark.limit=4",
                                   f"batch_size={size}"))
        evaluate(cfg)
        preds[size] = {r["_id"]: r["pred"] for r in read_predictions(output_dir(cfg) / "predictions" / f"{LB_TASK}.jsonl")}
        run = json.loads((output_dir(cfg) / "run.json").read_text())
        assert run["config"]["batch_size"] == size and run["sessions"][-1]["timing"]["batch_size"] == size
    assert len(preds[4]) == 4 and preds[4] == preds[1]


def test_pipeline_run_at_batch_size_auto_records_its_back_off(tmp_path, monkeypatch):
    """End to end: auto runs out of memory mid-batch, backs off, writes batch 1's predictions once each, and
    run.json's timing records the final batch size and the back-off."""
    import json

    from kvbench import scheduler
    from kvbench.config import compose, output_dir
    from kvbench.pipeline import evaluate
    from kvbench.results import read_predictions
    from test_query_agnostic import LB_TASK, SHARED, lb_overrides

    if not SHARED.is_dir():
        pytest.skip("shared LongBench files not present")
    real, rows = scheduler.BatchedCache, []

    def batched(caches):
        rows.append(len(caches))
        if len(caches) > 2 and len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(caches)

    monkeypatch.setattr(scheduler, "BatchedCache", batched)
    monkeypatch.setattr(scheduler, "free_memory_bytes", lambda device: 10 ** 12)
    preds, timing = {}, {}
    for size in ("1", "auto"):
        cfg = compose(lb_overrides(tmp_path / size, "method=snapkv", "budget=48", "method.window_size=8",
                                   "benchmark.limit=4", f"batch_size={size}"))
        evaluate(cfg)
        lines = read_predictions(output_dir(cfg) / "predictions" / f"{LB_TASK}.jsonl")
        preds[size] = [(r["_id"], r["pred"]) for r in lines]
        timing[size] = json.loads((output_dir(cfg) / "run.json").read_text())["sessions"][-1]["timing"]
    assert rows[:3] == [4, 4, 4] and max(rows[3:]) <= 2
    assert sorted(preds["auto"]) == sorted(preds["1"]) and len(preds["auto"]) == 4
    assert timing["auto"]["batch_size"] == 2 and timing["auto"]["batch_size_backoffs"] == 1
    assert timing["auto"]["batch_size_auto"]["batch_size"] == 16 and "batch_size_backoffs" not in timing["1"]


def test_auto_sizes_the_batch_for_a_sessions_whole_conversation(tiny_llama):
    """batch_size=auto reads each request's reach (`Request.positions()`): for a session, the context plus every
    turn's question and answer, not the context plus one generation."""
    from kvbench.requests import Turn

    model, _ = tiny_llama
    turns = tuple(Turn((7,) * 10, (9,) * 30, (11,)) for _ in range(2))
    session = Request(random_prompt(100, model.config.vocab_size, seed=1)[0].tolist(), 8, turns=turns, key="s")
    report = {}
    [(_, out)] = list(generate_requests(model, [session], None, batch_size="auto", report=report))
    assert len(out.turns) == 2
    assert report["batch_size_auto"]["longest_tokens"] == session.positions() == 100 + 2 * (10 + 30)
