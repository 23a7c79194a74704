"""KNorm, TOVA (kvpress 0.5.4) and CAKE (antgroup/cakekv) keep exactly what the official code keeps on the golden
cases of tests/golden/cases-2026 (FORMAT-2026.md), through `kvbench.golden.run_case`: the calls the attention hook
makes on a real model."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import REPO
from kvbench.golden import case_paths, compare, load_case, run_case

CASES = [p for p in case_paths([REPO / "tests" / "golden" / "cases-2026"])
         if p.name.startswith(("knorm_", "tova_", "cake_"))]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_cases_present():
    assert len(CASES) == 30
    assert {load_case(p)["method"] for p in CASES} == {"knorm", "tova", "cake"}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path):
    case = load_case(path)
    assert compare(case, run_case(case)) == []


@pytest.mark.parametrize("name", ["knorm_s0_L8_H8x2_n1100_b128", "tova_s1_L8_H8x2_n1100_b128", "tova_s1_L8_H8x8_n512_b128"])
def test_kvbench_budget_equals_kvpress_ratio(name):
    """kvbench's `budget` (tokens per KV head) keeps what kvpress keeps with the case's compression ratio, also
    where `int(n * (1 - budget / n))` would round one short (n = 1100, b = 128)."""
    case = load_case(REPO / "tests" / "golden" / "cases-2026" / f"{name}.json")
    by_budget = copy.deepcopy(case)
    del by_budget["params"]["compression_ratio"]
    assert compare(case, run_case(by_budget)) == []


def test_a_wrong_allocation_fails():
    """The check can fail: CAKE without cascading differs from the cascading case, and other taus change budgets."""
    case = load_case(REPO / "tests" / "golden" / "cases-2026" / "cake_s0_L12_H8x2_n512_b64_w32_casc.json")
    flat = copy.deepcopy(case)
    flat["params"]["cascading"] = False
    assert compare(case, run_case(flat))
    other_tau = copy.deepcopy(case)
    other_tau["params"]["tau1"], other_tau["params"]["tau2"] = 1.6, 0.6
    assert compare(case, run_case(other_tau))
