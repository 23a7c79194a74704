"""One method pipeline (issue 22 item 3) and the wrappers ChunkKV / CriticalKV / DefensiveKV (issue 24): every scorer
runs score -> allocate -> select -> store, adaptive allocation composes with every scorer that supports it (equal to
kvpress 0.5.5's `AdaKVPress(press)` on the golden inputs), and a combination that cannot work is refused. The golden
cases themselves run in tests/test_golden.py (every case of cases-2026)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, random_prompt
from kvbench.config import compose
from kvbench.engine import generate
from kvbench.errors import KvbenchError
from kvbench.golden import case_paths, compare, load_case, run_case
from kvbench.methods import METHODS, build_method, method_from_config, registry
from kvbench.methods.base import ScoredMethod

CASES = case_paths([REPO / "tests" / "golden" / "cases-2026"])
KVPRESS_055 = [p for p in CASES if "kvpress==0.5.5" in load_case(p)["reference"]]
DEFENSIVE = [p for p in CASES if load_case(p)["reference"].startswith("FFY0/DefensiveKV@9251b95")]
# Methods outside the shared pipeline, with the reason (goal: none): FullKV scores nothing; KVzip scores in extra
# passes through the model after the prefill (`after_prefill`).
OUTSIDE = {"fullkv", "kvzip"}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_every_scorer_runs_the_one_pipeline():
    bypass = {name for name, cls in METHODS.items()
              if not issubclass(cls, ScoredMethod) or cls.compress_layer is not ScoredMethod.compress_layer}
    assert bypass == OUTSIDE


def test_kvpress_055_cases_present():
    methods = {load_case(p)["method"] for p in KVPRESS_055}
    assert methods == {"knorm", "tova", "expected_attention", "chunkkv", "criticalkv"}
    assert len(KVPRESS_055) == 64


def test_defensivekv_cases_present():
    assert sorted({load_case(p)["method"] for p in DEFENSIVE}) == ["defensivekv", "layer_defensivekv"]
    assert len(DEFENSIVE) == 12


@pytest.mark.parametrize("name", ["adakvpress_knorm_s0_L8_H8x2_n512_b64", "adakvpress_expected_attention_s1_L8_H8x2_n512_b128",
                                  "criticaladakv_knorm_s0_L8_H8x2_n512_b64"])
def test_adaptive_allocation_is_applied(name):
    """The same case with uniform allocation keeps other tokens: the adaptive setting is not silently dropped (before
    the pipeline, `allocation=adaptive` on KNorm/EA was recorded and ignored)."""
    case = load_case(REPO / "tests" / "golden" / "cases-2026" / f"{name}.json")
    uniform = {**case, "params": {k: v for k, v in case["params"].items() if k not in ("press", "alpha_safeguard")}}
    assert compare(case, run_case(uniform))
    method = build_method(case["method"], budget=case["budget"], allocation="adaptive",
                          **{k: v for k, v in uniform["params"].items() if k != "compression_ratio"})
    assert method.allocation == "adaptive" and method.params()["allocation"] == "adaptive"


@pytest.mark.parametrize("name", ["dynamickv", "cake", "chunkkv"])
def test_adaptive_is_refused_where_it_cannot_apply(name):
    with pytest.raises(KvbenchError, match="allocation=adaptive does not apply") as err:
        build_method(name, budget=64, allocation="adaptive")
    assert "\n" not in str(err.value)


def test_layer_defensivekv_refuses_uniform_allocation():
    with pytest.raises(KvbenchError, match="allocation must be adaptive"):
        build_method("layer_defensivekv", budget=64, allocation="uniform")


@pytest.mark.parametrize("name", ["defensivekv", "layer_defensivekv"])
def test_defensivekv_on_a_tiny_model(tiny_llama, name):
    """Heads (and, for the layer variant, layers) keep different counts; the totals are the budget."""
    model, tok = tiny_llama
    method = build_method(name, budget=48)
    method.bind(model, tok)
    out = generate(model, random_prompt(300, len(tok), seed=5), method, max_new_tokens=3)
    assert len(out.token_ids) == 3
    counts = method.head_budgets
    if name == "defensivekv":
        assert all(sum(layer) == 2 * 48 for layer in counts) and any(len(set(layer)) > 1 for layer in counts)
    else:
        assert sum(map(sum, counts)) == 4 * 2 * 48 and len({sum(layer) for layer in counts}) > 1


def test_wrappers_refuse_shared_settings_in_scorer_params():
    with pytest.raises(KvbenchError, match="shares them with its scorer"):
        build_method("chunkkv", budget=64, scorer="knorm", scorer_params={"allocation": "adaptive"})


def test_wrappers_refuse_a_scorer_that_is_not_per_layer():
    for scorer in ("cake", "kvzip", "chunkkv", "fullkv"):
        with pytest.raises(KvbenchError, match="wraps a per-layer scorer"):
            build_method("criticalkv", budget=64, scorer=scorer)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if issubclass(c, ScoredMethod)))
def test_every_scorer_config_carries_allocation(name):
    """`method.allocation=adaptive` works without `+` on every scorer that supports it."""
    spec = registry.get(name)
    value = "adaptive" if spec.cls.supports_adaptive else "uniform"
    cfg = compose([f"method={name}", f"method.allocation={value}", "budget=64"])
    assert method_from_config(cfg.method, cfg.budget).allocation == value


@pytest.mark.parametrize("overrides", [["method.scorer=knorm"], ["method.scorer=snapkv", "method.entropy_gated=true"],
                                       ["method.scorer=tova", "method.chunk_length=8"]])
def test_chunkkv_on_a_tiny_model(tiny_llama, overrides):
    model, tok = tiny_llama
    cfg = compose(["method=chunkkv", "budget=48", *overrides])
    method = method_from_config(cfg.method, cfg.budget)
    out = generate(model, random_prompt(300, len(tok), seed=5), method, max_new_tokens=3)
    assert len(out.token_ids) == 3 and len(method.layer_counts) == 4
    prefix_budget = 48 - method.window_size
    if method.entropy_gated:  # exactly the budget
        assert method.layer_counts == [prefix_budget] * 4
    else:  # whole chunks: kvpress's max(1, int(chunks * kept fraction)) of them
        chunks = -(-(300 - method.window_size) // method.chunk_length)
        kept = max(1, chunks * prefix_budget // (300 - method.window_size))
        assert method.layer_counts == [kept * method.chunk_length] * 4


@pytest.mark.parametrize("allocation", ["uniform", "adaptive"])
def test_criticalkv_on_a_tiny_model(tiny_llama, allocation):
    model, tok = tiny_llama
    method = build_method("criticalkv", budget=48, allocation=allocation)
    method.bind(model, tok)
    out = generate(model, random_prompt(300, len(tok), seed=6), method, max_new_tokens=3)
    assert len(out.token_ids) == 3
    if allocation == "adaptive":
        assert any(len(set(counts)) > 1 for counts in method.head_budgets)


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_run_py_chunkkv_and_criticalkv(tmp_path):
    from test_pipeline import overrides

    for extra in (["method=chunkkv", "method.scorer=knorm"], ["method=criticalkv", "method.allocation=adaptive"]):
        proc = subprocess.run([sys.executable, "run.py", *overrides(tmp_path, *extra, "budget=48",
                                                                       "benchmark.limit=1")],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
