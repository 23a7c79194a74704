"""Every golden case of the official implementations passes through the same code path as real models, and the
checker really fails on a case we do not reproduce."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from kvbench.golden import case_paths, compare, load_case, run_case

CASES = case_paths([REPO / "tests" / "golden" / "cases"])


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


def test_script_passes_on_all_cases(capsys):
    assert load_script().main([str(REPO / "tests" / "golden" / "cases")]) == 0
    assert capsys.readouterr().out.strip().endswith("67 passed, 0 failed")


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
