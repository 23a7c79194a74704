"""Needle heatmaps: grid orientation, titles, thinned ticks, training-length line, files and CLI."""

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from kvbench.errors import KvbenchError
from kvbench.needle.plot import (
    CMAP,
    heatmap,
    load_needle_run,
    main,
    plot_run,
    plot_stacked,
    score_grid,
    stacked_figure,
    trained_len_line_x,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(lengths, depths, score_of):
    return [{"context_length": length, "depth_percent": depth, "score": score_of(length, depth),
             "score_rouge": 0.0, "response": ""} for length in lengths for depth in depths]


def _write_run(folder, records, method="snapkv", budget=64, model="SmolLM2-135M-Instruct", run_json=True,
               query=None, decode=None):
    (folder / "predictions").mkdir(parents=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (folder / "predictions" / "needle.jsonl").write_text(lines, encoding="utf-8")
    if run_json:
        run = {"model": {"name": model}, "method": {"name": method, "budget": budget,
                                                    **({"decode_interval": decode} if decode else {})},
               **({"config": {"benchmark": {"query": query}}} if query else {})}
        (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return folder


def _wide_axes():
    fig = Figure(figsize=(16, 3))
    return fig.add_axes((0.06, 0.3, 0.86, 0.55))  # 13.76 in wide


def test_grid_rows_are_depths_top_down_and_cells_are_means():
    records = _records([1000, 1100], [0, 50, 100], lambda length, depth: depth / 100)
    records.append({"context_length": 1000, "depth_percent": 0, "score": 1.0})  # cell (0, 1000): mean 0.5
    ax = _wide_axes()
    mesh = heatmap(records, ax, "SnapKV, KV size 64", colorbar=False)
    assert [label.get_text() for label in ax.get_yticklabels()] == ["0", "50", "100"]
    bottom, top = ax.get_ylim()
    assert bottom > top  # y axis inverted: row 0 (depth 0) drawn at the top
    cells = np.asarray(mesh.get_array()).reshape(3, 2)
    np.testing.assert_allclose(cells, [[0.5, 0.0], [0.5, 0.5], [1.0, 1.0]])
    # The average is over all results (4 / 7 = 0.57), as the papers' df["Score"].mean(), not over
    # the six cells (3.5 / 6 = 0.58).
    assert ax.get_title() == "SnapKV, KV size 64 — Average Score 0.57"
    assert ax.get_xlabel() == "Token Limit" and ax.get_ylabel() == "Depth Percent"
    assert mesh.norm.vmin == 0.0 and mesh.norm.vmax == 1.0 and mesh.cmap is CMAP


def test_colormap_runs_red_to_yellow_to_green():
    red, yellow, green = (np.array(CMAP(x)[:3]) * 255 for x in (0.0, 0.5, 1.0))
    np.testing.assert_allclose(red, [0xF0, 0x49, 0x6E], atol=0.5)
    # The middle is one 256-entry lookup step off exact 0.5, hence the looser tolerance.
    np.testing.assert_allclose(yellow, [0xEB, 0xB8, 0x39], atol=1.5)
    np.testing.assert_allclose(green, [0x0C, 0xD7, 0x9F], atol=0.5)


def test_x_ticks_are_thinned_to_round_lengths():
    llama = _records(range(1000, 8001, 100), [0, 100], lambda length, depth: 1.0)
    ax = _wide_axes()
    heatmap(llama, ax, "", colorbar=False)
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert labels == [str(length) for length in range(1000, 8001, 500)]
    assert ax.get_xticklabels()[0].get_rotation() == 45
    mistral = _records(range(400, 32001, 400), [0, 100], lambda length, depth: 1.0)
    ax = _wide_axes()
    heatmap(mistral, ax, "", colorbar=False)
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert labels == [str(length) for length in range(2000, 32001, 2000)]
    assert ax.get_title() == "Average Score 1.00"


def test_training_length_line_follows_visualize_py():
    lengths = list(range(1000, 8001, 100))
    assert trained_len_line_x(lengths, 4050) == pytest.approx(31.8)  # 4100 is column 31
    assert trained_len_line_x(lengths, 8150) == pytest.approx(70.97)  # none exceeds: right edge
    assert trained_len_line_x([1000, 2000], 8192) == pytest.approx(1.97)
    ax = _wide_axes()
    heatmap(_records(lengths, [0], lambda length, depth: 0.0), ax, "", trained_len=4050, colorbar=False)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == pytest.approx([31.8, 31.8])
    assert line.get_linestyle() == "--" and line.get_color() == "white"


def test_score_grid_rejects_records_without_scores():
    with pytest.raises(KvbenchError, match="score"):
        score_grid([{"context_length": 1000, "depth_percent": 0}])
    with pytest.raises(KvbenchError, match="No needle results"):
        score_grid([])


def test_plot_run_writes_png_and_pdf_atomically(tmp_path):
    records = _records([1000, 1100, 1200], [0, 50, 100], lambda length, depth: 0.25)
    run_dir = _write_run(tmp_path / "snapkv_64", records)
    written = plot_run(run_dir)
    assert [path.name for path in written] == ["needle_heatmap.png", "needle_heatmap.pdf", "needle_retrieval.png",
                                               "needle_retrieval.pdf"]
    assert (run_dir / "needle_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "needle_heatmap.pdf").read_bytes()[:5] == b"%PDF-"
    assert not list(run_dir.glob(".*.tmp"))  # no temp files left behind
    other = tmp_path / "figures"
    plot_run(run_dir, out=other)
    assert sorted(path.name for path in other.iterdir()) == ["needle_heatmap.pdf", "needle_heatmap.png",
                                                             "needle_retrieval.pdf", "needle_retrieval.png"]


def test_labels_come_from_run_json_or_folder_names(tmp_path):
    records = _records([1000], [0], lambda l, d: 1.0)
    run = load_needle_run(_write_run(tmp_path / "a", records, method="pyramidkv", budget=128))
    assert (run.model, run.label) == ("SmolLM2-135M-Instruct", "PyramidKV, KV size 128")
    full = load_needle_run(_write_run(tmp_path / "b", records, method="fullkv", budget=None))
    assert full.label == "FullKV"
    unfinished_dir = _write_run(tmp_path / "llama" / "needle" / "h2o_64", records, run_json=False)
    unfinished = load_needle_run(unfinished_dir)
    assert (unfinished.model, unfinished.label) == ("llama", "h2o_64")


def test_stacked_figure_has_one_lettered_panel_per_run(tmp_path):
    scores = [0.2, 0.8, 1.0]
    dirs = [_write_run(tmp_path / f"run{i}", _records(range(1000, 8001, 100), range(0, 101, 11),
                                                      lambda l, d, s=score: s), method=method)
            for i, (score, method) in enumerate(zip(scores, ["streamingllm", "pyramidkv", "dynamickv"]))]
    fig = stacked_figure(dirs)
    panels = [ax for ax in fig.axes if ax.get_ylabel() == "Depth Percent"]
    assert len(panels) == 3 and len(fig.axes) == 4  # plus one shared colour bar
    # As the papers: the average above each panel, a bold lettered caption below it.
    assert [ax.get_title() for ax in panels] == ["Average Score 0.20, Retrieval 0.00", "Average Score 0.80, Retrieval 0.00",
                                                 "Average Score 1.00, Retrieval 0.00"]
    captions = [[t.get_text() for t in ax.texts] for ax in panels]
    assert captions == [["(a) StreamingLLM, KV size 64"], ["(b) PyramidKV, KV size 64"], ["(c) DynamicKV, KV size 64"]]
    assert all(t.get_fontweight() == "bold" for ax in panels for t in ax.texts)
    assert fig.get_figwidth() == 16
    assert 2.2 < fig.get_figheight() / 3 < 3.6
    written = plot_stacked(dirs, tmp_path / "stack.png")
    assert [path.name for path in written] == ["stack.png", "stack.pdf", "stack_retrieval.png", "stack_retrieval.pdf"]
    assert written[0].read_bytes()[:8] == PNG_MAGIC


def test_figures_name_the_query_mode(tmp_path):
    records = _records([1000, 2000], [0, 100], lambda l, d: 1.0)
    aware = _write_run(tmp_path / "snapkv_128", records, query="aware")
    agnostic = _write_run(tmp_path / "snapkv_128_agnostic", records, query="agnostic")
    old = _write_run(tmp_path / "old" / "h2o_64_agnostic", records)  # no query in run.json: the folder name says
    assert (load_needle_run(aware).query, load_needle_run(agnostic).query, load_needle_run(old).query) == \
        ("aware", "agnostic", "agnostic")
    shared = stacked_figure([agnostic, old])  # one mode: in the figure title
    assert shared._suptitle.get_text() == "Needle-in-a-Haystack — SmolLM2-135M-Instruct, query-agnostic, prefill"
    mixed = stacked_figure([aware, agnostic])  # both: in each panel's caption
    captions = [t.get_text() for ax in mixed.axes for t in ax.texts]
    assert captions == ["(a) SnapKV, KV size 64, query-aware", "(b) SnapKV, KV size 64, query-agnostic"]
    assert mixed._suptitle.get_text() == "Needle-in-a-Haystack — SmolLM2-135M-Instruct, prefill"
    single = stacked_figure([agnostic])
    assert single.axes[0].texts[0].get_text() == \
        "(a) SmolLM2-135M-Instruct, SnapKV, KV size 64, query-agnostic, prefill"


def test_figures_name_the_decode_schedule(tmp_path):
    """Prefill-only runs say `prefill`; a decoding-time run `every N` (in its caption where the runs differ)."""
    records = _records([1000, 2000], [0, 100], lambda l, d: 1.0)
    prefill = _write_run(tmp_path / "snapkv_64", records, query="aware")
    decode = _write_run(tmp_path / "snapkv_64_decode16", records, query="aware", decode=16)
    assert (load_needle_run(prefill).decode, load_needle_run(decode).decode) == ("prefill", "every 16")
    mixed = stacked_figure([prefill, decode])
    captions = [t.get_text() for ax in mixed.axes for t in ax.texts]
    assert captions == ["(a) SnapKV, KV size 64, prefill", "(b) SnapKV, KV size 64, every 16"]
    assert mixed._suptitle.get_text() == "Needle-in-a-Haystack — SmolLM2-135M-Instruct, query-aware"


def test_bad_jsonl_line_names_the_line(tmp_path):
    run_dir = _write_run(tmp_path / "r", _records([1000], [0], lambda l, d: 1.0))
    with open(run_dir / "predictions" / "needle.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(KvbenchError, match=r"needle.jsonl, line 2: not valid JSON"):
        load_needle_run(run_dir)


def test_cli_redraws_and_reports_bad_folders(tmp_path, capsys):
    run_dir = _write_run(tmp_path / "r", _records([1000, 2000], [0, 100], lambda l, d: 0.5))
    assert main([str(run_dir)]) == 0
    assert (run_dir / "needle_heatmap.png").is_file()
    assert main([str(run_dir), str(run_dir), "--stacked", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.pdf").is_file()
    assert main([str(tmp_path / "missing")]) == 2
    assert "No needle predictions" in capsys.readouterr().err
