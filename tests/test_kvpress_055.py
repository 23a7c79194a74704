"""kvpress 0.5.5 presses beyond KVzip (cases from `scripts/golden/kvpress_055.py synth`, kvpress run unmodified on
the shared synthetic inputs): KeyDiff, LagKV, and AdaKVPress's safeguard (`adaptive_mode=kvpress`)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import REPO
from kvbench.golden import case_paths, compare, load_case, run_case
from kvbench.methods.base import head_adaptive_counts, kvpress_safeguard

GOLDEN = REPO / "tests" / "golden" / "cases-2026"
ADAKV = [p for p in case_paths([GOLDEN]) if p.name.startswith("adakv_gqa_kvpress_")]
LAGKV = [p for p in case_paths([GOLDEN]) if p.name.startswith("lagkv_")]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_kvpress_safeguard_counts_the_window():
    """kvpress: int(n_kept * alpha) of the n_kept = budget + window tokens, the window first (at least 1)."""
    assert kvpress_safeguard(64, 64, 0.2) == 0  # int(128 * 0.2) = 25 <= 64: the window covers it
    assert kvpress_safeguard(64, 64, 0.6) == 12  # int(128 * 0.6) = 76 - 64
    assert kvpress_safeguard(10, 0, 0.01) == 1 and kvpress_safeguard(10, 0, 0.0) == 0
    scores = torch.cat([torch.arange(20.0, 10, -1)[None], torch.arange(10.0, 0, -1)[None]])  # head 0 wins all
    # budget 4 + window 4, alpha 0.5: kvpress int(8 * 0.5) = 4 positions, the window's; exact: int(4 * 0.5) = 2
    assert head_adaptive_counts(scores, 4, 0.5, "kvpress", window=4).tolist() == [8, 0]
    assert head_adaptive_counts(scores, 4, 0.5, "exact", window=4).tolist() == [6, 2]
    assert head_adaptive_counts(scores, 4, 0.9, "kvpress", window=4).tolist() == [5, 3]  # int(7.2) - 4


def test_adakv_kvpress_cases_present_and_head_adaptive():
    assert len(ADAKV) == 12
    case = load_case(ADAKV[0])
    assert len({len(h) for layer in case["layers"] for h in layer["kept_positions"]}) > 1


def test_adakv_exact_is_not_kvpress():
    """The cases tell the two floors apart: where AdaKVPress's safeguard binds (alpha 0.95), kvbench's `exact`
    floor (int((budget - window) * alpha) outside the window) keeps other tokens than kvpress on some of them;
    `adaptive_mode=kvpress` (what the registry translates the cases to) keeps the same on all."""
    from kvbench.methods import registry

    differ = 0
    for path in [p for p in ADAKV if p.stem.endswith("a0.95")]:
        case = load_case(path)
        translated = registry.get("adakv_gqa").official_params(case["params"])
        assert translated["adaptive_mode"] == "kvpress" and compare(case, run_case(case)) == []
        exact = copy.deepcopy(case)
        exact["params"] = translated | {"adaptive_mode": "exact"}
        differ += bool(compare(case, run_case(exact)))
    assert differ > 0, "no case separates the two definitions"


@pytest.mark.parametrize("path", LAGKV, ids=lambda p: p.stem)
def test_lagkv_keeps_kvpress_positions_exactly_even_at_rank_ties(path):
    """LagKV's scores tie across partitions (rank / lag_size), so the case's tied positions are wide; kvbench ranks
    the same tensor with the same top-k and keeps exactly kvpress's positions anyway."""
    case = load_case(path)
    got = run_case(case)
    assert [[sorted(h) for h in layer] for layer in got] == [l["kept_positions"] for l in case["layers"]]
