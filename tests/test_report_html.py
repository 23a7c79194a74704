"""report.html: one self-contained page (sortable tables with CIs, inline figures, run settings, relative links);
the slow test opens it in headless Chromium and checks what rendered."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvbench.report.__main__ import main
from test_ruler_report import _run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture()
def report(tmp_path) -> Path:
    results = tmp_path / "results"
    _run(results, "fullkv", 128, {1024: {"niah_single_1": 100.0, "vt": 100.0}, 2048: {"niah_single_1": 100.0,
                                                                                      "vt": 66.67}})
    _run(results, "snapkv", 128, {1024: {"niah_single_1": 66.67, "vt": 33.33}, 2048: {"niah_single_1": 33.33,
                                                                                      "vt": 0.0}})
    _run(results, "dynamickv", 128, {1024: {"niah_single_1": 33.33, "vt": 66.67},
                                     2048: {"niah_single_1": 33.33, "vt": 33.33}})
    _run(results, "snapkv", 128, {1024: {"niah_single_1": 0.0, "vt": 33.33}, 2048: {"niah_single_1": 0.0,
                                                                                    "vt": 0.0}}, query="agnostic")
    assert main([str(results), "--out", str(tmp_path / "report")]) == 0
    return tmp_path / "report" / "report.html"


def _first_table(page: str) -> tuple[list[str], list[str]]:
    """(header cells, method cell of each body row) of the first sortable table."""
    table = page[page.index('<table class="sortable"'):]
    table = table[:table.index("</table>")]
    header = re.findall(r"<th[^>]*>([^<]*)</th>", table.split("</thead>")[0].split("<tr>")[-1])
    method = header.index("Method")
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    return header, [re.findall(r"<td[^>]*>(.*?)</td>", row)[method] for row in rows]


def test_html_is_self_contained_with_tables_cis_figures_settings_and_links(report):
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # offline: no CDN, no remote asset
    header, methods = _first_table(page)  # ruler at 1024 tokens
    assert header[:6] == ["Model", "Query", "Decode", "Budget", "Method", "KV MiB"] and header[-1] == "Avg."
    assert methods == ["FullKV", "SnapKV", "DynamicKV", "SnapKV"]
    assert " ± " in page and "<b>" in page and "†" in page  # CIs, bold and dagger as in the Markdown tables
    assert re.search(r'<td class="num" data-v="66\.67"><b>66\.67 ± [0-9.]+</b>†</td>', page)
    assert page.count('src="data:image/png;base64,') >= 2  # score vs length and score vs budget, inline
    assert 'href="../results/m/ruler/snapkv_128_agnostic/"' in page  # relative link to each run folder
    assert page.count("<summary>run.json</summary>") == 4 and "&quot;query&quot;: &quot;agnostic&quot;" in page
    assert "kvbench-status" in page and "function kvSort" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    """Chromium runs the page's scripts: the sort named in the URL reorders the first table, every image decodes
    (naturalWidth > 0), and a screenshot is written."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: `apt-get install -y chromium` (make test-slow installs it)")
    header, methods = _first_table(report.read_text(encoding="utf-8"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1200,1400"]
    url = f"{report.as_uri()}#sort=0:{header.index('Method')}:desc"
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    status = re.search(r'id="kvbench-status" data-images-shown="(\d+)">rendered: tables=(\d+) rows=(\d+) '
                       r'images=(\d+)/(\d+)', dom)
    assert status, dom[:2000]
    shown, tables, rows, decoded, images = map(int, status.groups())
    assert images >= 2 and shown == decoded == images and tables >= 6 and rows >= 20
    _, sorted_methods = _first_table(dom)
    assert sorted_methods == sorted(methods, key=str.lower, reverse=True) != methods  # the sort script ran
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_any_benchmark_gets_the_common_table_without_a_special_case(tmp_path):
    """A benchmark the report has never heard of (here `toybench`) gets the same table: CIs, n, bold + dagger."""
    from test_report import write_run

    model = {"name": "m", "hub_id": "m"}
    for method, budget, samples in (("fullkv", None, [1.0, 1.0, 0.0]), ("snapkv", 64, [1.0, 0.0, 0.0]),
                                    ("h2o", 64, [0.0, 0.0, 0.0])):
        write_run(tmp_path / "results", model, method, budget, {"t1": 0.0}, benchmark="toybench",
                  samples={"t1": samples}, layer_kept=(1,))
    assert main([str(tmp_path / "results"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "toybench_scores.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:6]]
    assert rows[0] == ["Model", "Decode", "Budget", "Method", "KV MiB", "n", "t1", "Avg."]
    assert rows[1][3] == "FullKV" and rows[1][6].startswith("66.67 ± ") and "**" not in rows[1][6]
    assert rows[3][3] == "SnapKV" and rows[3][5] == "3" and rows[3][6] == "**33.33 ± 50.00**†"  # 3 samples: n.s.
    assert {row[1] for row in rows[1:]} == {"prefill"}  # the schedule, stated where every run is prefill-only
    assert '<h2 id="toybench_scores">' in (tmp_path / "out" / "report.html").read_text()
