"""Every golden case of the official implementations passes through the same code path as real models, and the
checker really fails on a case we do not reproduce."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from kvbench.golden import MethodNotImplemented, case_paths, compare, load_case, run_case
from kvbench.methods import registry

CASES = case_paths([REPO / "tests" / "golden" / "cases"])
CASES_2026 = case_paths([REPO / "tests" / "golden" / "cases-2026"])


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_golden", REPO / "scripts" / "check_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_methods_are_covered():
    assert len(CASES) == 67
    assert {load_case(p)["method"] for p in CASES} == {"fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv",
                                                      "dynamickv"}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path):
    case = load_case(path)
    assert compare(case, run_case(case)) == []


def test_2026_cases_cover_adakv_and_the_new_baselines():
    counts = {}
    for path in CASES_2026:
        case = load_case(path)
        if case["reference"].startswith(("kvpress==0.5.5", "FFY0/DefensiveKV")):
            continue  # the wrapper cases: counted in test_method_pipeline.py
        counts[case["method"]] = counts.get(case["method"], 0) + 1
    assert counts == {"adakv": 11, "adakv_gqa": 9 + 12, "adakv_pyramid": 10, "adakv_pyramid_gqa": 9, "knorm": 10,
                      "tova": 10, "cake": 10, "keydiff": 8, "lagkv": 16}  # adakv_gqa: + 12 of kvpress's AdaKVPress


@pytest.mark.parametrize("path", CASES_2026, ids=[p.stem for p in CASES_2026])
def test_golden_case_2026(path):
    case = load_case(path)
    if not registry.is_registered(case["method"]):
        with pytest.raises(MethodNotImplemented):
            run_case(case)
        pytest.skip(f"method not implemented: {case['method']}")
    assert compare(case, run_case(case)) == []


def test_adakv_cases_keep_different_counts_per_head_and_we_match_them():
    """The AdaKV cases really are head-adaptive (so passing them exercises the per-head path)."""
    case = load_case(REPO / "tests" / "golden" / "cases-2026" / "adakv_s0_L8_H8x2_n512_b64_w32_maxpool.json")
    kept = run_case(case)
    assert len({len(head) for head in kept[0]}) > 1
    assert [[len(h) for h in layer] for layer in kept] == [[len(h) for h in layer["kept_positions"]]
                                                           for layer in case["layers"]]


def test_script_passes_on_all_cases(capsys):
    assert load_script().main([str(REPO / "tests" / "golden" / "cases")]) == 0
    assert capsys.readouterr().out.strip().endswith("67 passed, 0 failed")


def test_script_reports_unimplemented_methods_as_skipped_not_passed(tmp_path, capsys):
    case = load_case(REPO / "tests" / "golden" / "cases" / "h2o_s0_L8_n512_b128_w8.json")
    (tmp_path / "h2o.json").write_text(json.dumps(case))
    (tmp_path / "nosuch.json").write_text(json.dumps(case | {"method": "nosuch_method"}))
    script = load_script()
    assert script.main([str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "SKIP nosuch.json: skipped: method not implemented (nosuch_method)" in out
    assert out.strip().endswith("1 passed, 0 failed, 1 skipped (method not implemented: nosuch_method (1))")
    assert script.main([str(tmp_path), "--allow-missing"]) == 0


def test_script_reports_a_case_we_do_not_reproduce(tmp_path, capsys):
    case = load_case(REPO / "tests" / "golden" / "cases" / "dynamickv_s218_L12_n700_b192_w8_avgpool_r10_dup.json")
    case["params"]["mode"] = "fixed"  # the fixed mode does not duplicate the window: must differ from official
    (tmp_path / "fixed.json").write_text(json.dumps(case))
    case = load_case(REPO / "tests" / "golden" / "cases" / "h2o_s0_L8_n512_b128_w8.json")
    case["layers"][0]["sha256_key"] = "0" * 64
    (tmp_path / "tampered.json").write_text(json.dumps(case))
    assert load_script().main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL fixed.json" in out and "FAIL tampered.json" in out and "does not match" in out
    assert out.strip().endswith("0 passed, 2 failed")
