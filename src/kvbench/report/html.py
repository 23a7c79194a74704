"""`report.html`: one self-contained page (no network: inline CSS and JavaScript, figures as base64 PNG) with every
table of the report (sortable: click a header; `report.html#sort=T:C:desc` sorts table T by column C on load), the
figures, and one row per run with its settings from run.json and a relative link to its folder.

After loading, the page writes what rendered into `<p id="kvbench-status">` (tables, rows, images with a nonzero
natural width), so a headless browser's dumped DOM shows whether it rendered.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

from kvbench.atomic import atomic_write
from kvbench.labels import decode_label, display_method

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; }
td.num { text-align: right; white-space: nowrap; }
table.sortable thead tr:last-child th { cursor: pointer; background: #f2f2f2; }
table.sortable thead tr:last-child th[data-dir]::after { content: attr(data-dir); color: #888; }
tr.groups th { background: #fafafa; font-weight: normal; font-style: italic; }
p.note { font-size: 11px; color: #555; margin: .1em 0; }
figure { display: inline-block; margin: .5em; } figure img { max-width: 900px; }
details pre { font-size: 11px; max-height: 30em; overflow: auto; background: #f8f8f8; }
"""

_SCRIPT = """
function kvValue(td) {
  var v = td.getAttribute('data-v'); if (v === null) v = td.textContent.replace(/[*\u2020]/g, '');
  v = v.trim(); if (v === '' || v === '-') return -Infinity;
  var n = parseFloat(v); return isNaN(n) || !/^-?[0-9.]/.test(v) ? v.toLowerCase() : n;
}
function kvSort(table, col, desc) {
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = kvValue(a.cells[col]), y = kvValue(b.cells[col]);
    if (typeof x !== typeof y) { x = typeof x; y = typeof y; }
    var r = x < y ? -1 : x > y ? 1 : 0; return desc ? -r : r;
  });
  rows.forEach(function (r) { body.appendChild(r); });
  var head = table.tHead.rows[table.tHead.rows.length - 1].cells;
  for (var i = 0; i < head.length; i++) head[i].removeAttribute('data-dir');
  head[col].setAttribute('data-dir', desc ? ' \u25bc' : ' \u25b2');
  table.setAttribute('data-sorted', col + (desc ? ':desc' : ':asc'));
}
document.addEventListener('DOMContentLoaded', function () {
  var tables = document.querySelectorAll('table.sortable');
  tables.forEach(function (table) {
    var head = table.tHead.rows[table.tHead.rows.length - 1].cells;
    Array.prototype.forEach.call(head, function (th, col) {
      th.addEventListener('click', function () {
        kvSort(table, col, table.getAttribute('data-sorted') === col + ':asc');
      });
    });
  });
  var m = /sort=(\\d+):(\\d+)(:desc)?/.exec(location.hash);
  if (m && tables[+m[1]]) kvSort(tables[+m[1]], +m[2], !!m[3]);
});
window.addEventListener('load', function () {
  var images = document.querySelectorAll('img'), shown = 0, rows = 0;
  images.forEach(function (img) { if (img.complete && img.naturalWidth > 0) shown++; });
  var tables = document.querySelectorAll('table.sortable');
  tables.forEach(function (t) { rows += t.tBodies[0].rows.length; });
  var status = document.getElementById('kvbench-status');
  status.textContent = 'rendered: tables=' + tables.length + ' rows=' + rows + ' images=' + shown + '/' +
    images.length;
  status.setAttribute('data-images-shown', shown);
});
"""


def _sort_value(text: str) -> str:
    """The number a Markdown cell starts with (bold, dagger and CI stripped), else the text."""
    match = re.match(r"\s*\**\s*([-+]?\d+(?:\.\d+)?)", text)
    return match.group(1) if match else text.strip()


def _inline(text: str) -> str:
    """Markdown bold (**x**) as <b>, the rest escaped."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def markdown_html(text: str) -> str:
    """Markdown pipe tables as sortable HTML tables (the first row is the header), other lines as paragraphs."""
    out, table = [], []

    def flush():
        if not table:
            return
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                if not re.fullmatch(r"[\s|:\-]+", line)]
        head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
        body = "\n".join("<tr>" + "".join(f'<td data-v="{html.escape(_sort_value(c))}">{_inline(c)}</td>'
                                          for c in row) + "</tr>" for row in rows[1:])
        out.append(f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>')
        table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f'<p class="note">{_inline(line)}</p>')
    flush()
    return "\n".join(out) + "\n"


def _run_settings(run_dir: str) -> dict:
    """What report.html shows of one run, from its run.json ({} where it cannot be read)."""
    try:
        run = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _runs_table(run_dirs: list[str], out_dir: Path) -> str:
    """One row per run: link to its folder, its main settings, and its resolved config, versions and commit."""
    rows = []
    for run_dir in run_dirs:
        run = _run_settings(run_dir)
        config = run.get("config") if isinstance(run.get("config"), dict) else {}
        bench = config.get("benchmark") if isinstance(config.get("benchmark"), dict) else {}
        method = run.get("method") if isinstance(run.get("method"), dict) else {}
        link = os.path.relpath(run_dir, out_dir.resolve()).replace(os.sep, "/")
        versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
        details = json.dumps({"config": config, "versions": versions, "git_commit": run.get("git_commit")},
                             indent=1, sort_keys=True, default=str)
        cells = [f'<a href="{html.escape(link)}/">{html.escape(Path(run_dir).name)}</a>',
                 html.escape(str(run.get("benchmark", ""))), html.escape(display_method(method.get("name", "?"))),
                 html.escape(str(method.get("budget", ""))), html.escape(str(bench.get("query") or "aware")),
                 html.escape(decode_label(method.get("decode_interval"))),
                 html.escape(str(run.get("protocol", ""))), html.escape(str(run.get("status", ""))),
                 html.escape(str(run.get("git_commit") or "")[:10]),
                 html.escape(", ".join(f"{k} {v}" for k, v in versions.items() if k in ("kvbench", "torch",
                                                                                        "transformers"))),
                 f"<details><summary>run.json</summary><pre>{html.escape(details)}</pre></details>"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("Run folder", "Benchmark", "Method", "Budget", "Query", "Decode", "Protocol",
                                             "Status", "Commit", "Versions", "Settings"))
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


def write_html(path: Path, sections: list[tuple[str, str, str]], figures: list[Path], run_dirs: list[str]) -> Path:
    """Write report.html: the sections (title, anchor, HTML), the PNG figures inline, and the runs' settings."""
    path = Path(path)
    body = [f'<h2 id="{html.escape(anchor)}">{html.escape(title)}</h2>\n{content}' for title, anchor, content
            in sections]
    images = "\n".join(
        f'<figure><img alt="{html.escape(png.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}"><figcaption>{html.escape(png.name)}</figcaption></figure>'
        for png in figures)
    contents = "".join(f'<li><a href="#{html.escape(a)}">{html.escape(t)}</a></li>' for t, a, _ in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>kvbench report</title>'
            f'<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>\n<h1>kvbench report</h1>\n'
            f'<p id="kvbench-status">not rendered (JavaScript off?)</p>\n'
            f'<p>Click a column header to sort. Scores in points (0-100) with 95% bootstrap CIs; bold: best compressed '
            f'method of its group, †: not significantly better than the second best.</p>\n'
            f'<ul>{contents}<li><a href="#figures">Figures</a></li><li><a href="#runs">Runs</a></li></ul>\n'
            + "\n".join(body)
            + f'\n<h2 id="figures">Figures</h2>\n{images or "<p>No figure applies to these results.</p>"}\n'
            f'<h2 id="runs">Runs ({len(run_dirs)})</h2>\n{_runs_table(run_dirs, path.parent)}\n</body></html>\n')
    return atomic_write(path, page)
