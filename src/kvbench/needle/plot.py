"""Needle-in-a-Haystack heatmaps in the format of the PyramidKV / DynamicKV figures.

Rows are needle depths (0 % at the top), columns are context lengths, cells are the mean heatmap
score on a red-yellow-green scale from 0 to 1, and the title carries the average score. A second figure
(``needle_retrieval``, ``<stacked>_retrieval``) colours the cells by the retrieval score (1 when the answer
names the needle's key facts: what measures retrieval); every title carries both averages. Figures
are drawn from saved results only, so they can be redrawn without running a model::

    python -m kvbench.needle.plot results/smollm2/needle/snapkv_64
    python -m kvbench.needle.plot results/smollm2/needle/*_64 --stacked needle_64.png
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from kvbench.atomic import atomic_write
from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl
from kvbench.needle.scoring import cell_retrieval
from kvbench.labels import decode_label, display_method

# The papers' colours (KVCache-Factory scripts/scripts_needle/visualize.py).
CMAP = LinearSegmentedColormap.from_list("custom_cmap", ["#F0496E", "#EBB839", "#0CD79F"])
REQUIRED_FIELDS = ("context_length", "depth_percent", "score")
FIGURE_NAME = "needle_heatmap"
# The two cell scores a figure can show: field -> (title label, file name suffix). "score": the papers' heatmap
# score (word overlap); "retrieval": 1 when the answer names the needle's key facts.
SCORE_FIELDS = {"score": ("Average Score", ""), "retrieval": ("Retrieval", "_retrieval")}
DPI = 150

# Figure geometry in inches: a wide figure with ~2.6 in per panel, like the papers' stacked figures.
FIG_WIDTH = 16.0
LEFT, RIGHT = 0.95, 1.25  # room for "Depth Percent" and for the colour bar
PANEL_TITLE, PANEL_AXES, PANEL_BELOW = 0.35, 1.45, 0.85  # title / cells / tick labels + xlabel
PANEL_CAPTION = 0.4  # the papers' bold "(a) Method" caption under each stacked panel
SINGLE_PANEL_AXES = 2.0  # a lone heatmap can afford taller cells
TOP_EXTRA = 0.45  # figure title line
BOTTOM_EXTRA = 0.1
MIN_TICK_SPACING_IN = 0.7  # horizontal room per x label, rotated 45 degrees
NICE_TICK_STRIDES = (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000)


# --------------------------------------------------------------------------- single heatmap


def _as_frame(df_or_records, score_field: str = "score") -> pd.DataFrame:
    frame = df_or_records if isinstance(df_or_records, pd.DataFrame) else pd.DataFrame(list(df_or_records))
    if frame.empty:
        raise KvbenchError("No needle results to plot. Fix: run the needle benchmark first.")
    fields = ("context_length", "depth_percent", score_field)
    missing = [name for name in fields if name not in frame.columns]
    if missing:
        raise KvbenchError(f"Needle results lack the fields {missing}; each line needs {list(fields)}.")
    return frame


def score_grid(df_or_records, score_field: str = "score") -> pd.DataFrame:
    """Mean score per cell: rows = depth percent (ascending), columns = context length (ascending)."""
    frame = _as_frame(df_or_records, score_field)
    return frame.pivot_table(
        values=score_field, index="depth_percent", columns="context_length", aggfunc="mean"
    ).sort_index(axis=0).sort_index(axis=1)


def average_score(df_or_records, score_field: str = "score") -> float:
    """Mean over all results, as the papers report it (``df["Score"].mean()``)."""
    return float(_as_frame(df_or_records, score_field)[score_field].mean())


def _tick_stride(n_columns: int, max_labels: int) -> int:
    for stride in NICE_TICK_STRIDES:
        if math.ceil(n_columns / stride) <= max_labels:
            return stride
    return math.ceil(n_columns / max_labels)


def _tick_indices(lengths: list[int], max_labels: int) -> list[int]:
    """Evenly thinned column indices, shifted so the labels land on round numbers when possible."""
    stride = _tick_stride(len(lengths), max(1, max_labels))
    if stride == 1 or len(lengths) < 2:
        return list(range(len(lengths)))
    round_to = (lengths[1] - lengths[0]) * stride
    offset = next((i for i in range(stride) if round_to and lengths[i] % round_to == 0), 0)
    return list(range(offset, len(lengths), stride))


def trained_len_line_x(lengths: list[int], trained_len: int) -> float:
    """x of the training-length line, as ``visualize.py``: first length above it, + 0.8.

    If no length exceeds ``trained_len`` the whole grid is within the training length: the line marks the right
    edge (``visualize.py`` puts it at last column + 0.8, which on a small grid would fall inside a cell).
    """
    index = next((i for i, length in enumerate(lengths) if length > trained_len), None)
    return float(len(lengths)) - 0.03 if index is None else index + 0.8


def _axes_width_inches(ax) -> float:
    return ax.get_position().width * ax.figure.get_figwidth()


def _draw_axes_labels(ax, grid: pd.DataFrame, fontsize: float) -> None:
    lengths = [int(length) for length in grid.columns]
    depths = [int(depth) for depth in grid.index]
    ax.set_yticks(np.arange(len(depths)) + 0.5, [str(depth) for depth in depths], fontsize=fontsize - 1)
    shown = _tick_indices(lengths, int(_axes_width_inches(ax) / MIN_TICK_SPACING_IN))
    ax.set_xticks(
        np.array(shown) + 0.5, [str(lengths[i]) for i in shown],
        rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize - 1,
    )
    ax.tick_params(length=3)
    ax.set_xlabel("Token Limit", fontsize=fontsize)
    ax.set_ylabel("Depth Percent", fontsize=fontsize)


def heatmap(
    df_or_records,
    ax,
    title: str = "",
    trained_len: int | None = None,
    *,
    score_field: str = "score",
    colorbar: bool = True,
    fontsize: float = 12,
):
    """Draw one needle heatmap into ``ax`` and return the colour mesh (for a shared colour bar).

    ``df_or_records``: a DataFrame or an iterable of dicts with ``context_length``,
    ``depth_percent`` and ``score_field``. The title gets " — Average Score 0.83" appended (and the other
    score's average when the records have it: " — Average Score 0.83, Retrieval 0.50").
    ``trained_len`` draws the papers' white dashed line at the model's training length.
    """
    frame = _as_frame(df_or_records, score_field)  # once: a generator can only be read once
    grid = score_grid(frame, score_field)
    n_rows, n_cols = grid.shape
    mesh = ax.pcolormesh(
        np.arange(n_cols + 1), np.arange(n_rows + 1), np.ma.masked_invalid(grid.to_numpy(dtype=float)),
        cmap=CMAP, vmin=0.0, vmax=1.0, edgecolors="grey", linewidth=0.5,
    )
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)  # depth 0 on top, as in the papers
    _draw_axes_labels(ax, grid, fontsize)
    shown = [score_field] + [f for f in SCORE_FIELDS if f != score_field and f in frame.columns]
    average = ", ".join(f"{SCORE_FIELDS.get(f, (f,))[0]} {average_score(frame, f):.2f}" for f in shown)
    ax.set_title(f"{title} — {average}" if title else average, fontsize=fontsize)
    if trained_len is not None:
        x = trained_len_line_x([int(length) for length in grid.columns], trained_len)
        ax.axvline(x=x, color="white", linestyle="--", linewidth=2)
    if colorbar:
        ax.figure.colorbar(mesh, ax=ax, label=SCORE_FIELDS.get(score_field, (score_field,))[0])
    return mesh


# --------------------------------------------------------------------------- result folders


@dataclass
class NeedleRun:
    """One run's needle results and the labels for its panel."""

    records: pd.DataFrame
    model: str
    label: str
    trained_len: int | None
    query: str = "aware"  # benchmark.query of the run: every figure names it
    decode: str = "prefill"  # when the method compressed (`prefill`, `every N`): every figure names it


def read_needle_records(path: str | Path) -> pd.DataFrame:
    """Read a ``needle.jsonl`` file into a DataFrame, with line numbers in any error; a ``retrieval`` column (older
    lines scored from their response) when every line has a response."""
    path = Path(path)
    if not path.is_file():
        raise KvbenchError(f"No needle predictions at {path}. Fix: pass a needle result folder "
                           f"(results/<model>/needle/<run>) whose run has finished at least one cell.")
    records = read_jsonl(path, "delete that line and rerun to redo the cell", bom=True)
    frame = _as_frame(records)
    retrieval = [cell_retrieval(record) if isinstance(record, dict) else None for record in records]
    if None not in retrieval:
        frame["retrieval"] = retrieval
    return frame


def method_label(method: dict) -> str:
    """"SnapKV, KV size 64" from a run.json ``method`` entry ("FullKV" has no size)."""
    name = str(method.get("name", "?"))
    pretty = display_method(name)  # the report's one source of method display names
    budget = method.get("budget")
    if budget is None or name.lower() == "fullkv":
        return pretty
    return f"{pretty}, KV size {budget}"


def _read_run_info(result_dir: Path) -> dict:
    path = result_dir / "run.json"
    if not path.is_file():
        return {}  # an unfinished run: fall back to the folder names for labels
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise KvbenchError(f"{path} is not valid JSON ({error.msg}). Fix: rerun or repair it.") from None


def load_needle_run(result_dir: str | Path, trained_len: int | None = None) -> NeedleRun:
    """Load ``predictions/needle.jsonl`` and the labels from ``run.json`` of one result folder.

    Without run.json (a run still going), labels come from ``results/<model>/needle/<run_name>``.
    The training-length line comes from ``trained_len``, else run.json ``model.trained_len``.
    """
    result_dir = Path(result_dir)
    records = read_needle_records(result_dir / "predictions" / "needle.jsonl")
    run = _read_run_info(result_dir)
    model_info = run.get("model", {})
    model = str(model_info.get("name", result_dir.resolve().parent.parent.name))
    label = method_label(run["method"]) if "method" in run else result_dir.name
    if trained_len is None:
        trained_len = model_info.get("trained_len", model_info.get("pretrained_len"))
    query = str(((run.get("config") or {}).get("benchmark") or {}).get("query")
                or ("agnostic" if result_dir.name.endswith("_agnostic") else "aware"))
    decode = decode_label((run.get("method") or {}).get("decode_interval"))
    return NeedleRun(records=records, model=model, label=label, trained_len=trained_len, query=query, decode=decode)


# --------------------------------------------------------------------------- figures


def _panel_figure(n_panels: int, with_suptitle: bool, axes_height: float = PANEL_AXES) -> tuple[Figure, list]:
    """A 16-inch-wide figure with ``n_panels`` heatmap axes stacked, each ``axes_height`` tall."""
    panel = PANEL_TITLE + axes_height + PANEL_BELOW + (PANEL_CAPTION if n_panels > 1 else 0.0)
    top = TOP_EXTRA if with_suptitle else 0.05
    height = top + n_panels * panel + BOTTOM_EXTRA
    fig = Figure(figsize=(FIG_WIDTH, height))
    axes_width = FIG_WIDTH - LEFT - RIGHT
    axes = []
    for index in range(n_panels):
        bottom = height - top - index * panel - PANEL_TITLE - axes_height
        rect = (LEFT / FIG_WIDTH, bottom / height, axes_width / FIG_WIDTH, axes_height / height)
        axes.append(fig.add_axes(rect))
    return fig, axes


def _add_shared_colorbar(fig: Figure, axes: list, mesh, score_field: str = "score") -> None:
    top_box, bottom_box = axes[0].get_position(), axes[-1].get_position()
    rect = (top_box.x1 + 0.25 / FIG_WIDTH, bottom_box.y0, 0.18 / FIG_WIDTH, top_box.y1 - bottom_box.y0)
    colorbar = fig.colorbar(mesh, cax=fig.add_axes(rect))
    colorbar.set_label("Score" if score_field == "score" else SCORE_FIELDS[score_field][0], fontsize=12)


def _save_atomic(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), dpi=DPI)
    return atomic_write(path, buffer.getvalue())


def _save_png_and_pdf(fig: Figure, out_path: Path) -> list[Path]:
    if out_path.suffix.lower() not in (".png", ".pdf"):
        raise KvbenchError(f"Figure path {out_path} must end in .png or .pdf.")
    return [_save_atomic(fig, out_path.with_suffix(suffix)) for suffix in (".png", ".pdf")]


def _draw_runs(runs: list[NeedleRun], lettered: bool, score_field: str = "score") -> Figure:
    """Stacked panels; the model, the query mode and the decode schedule go in a figure title when all runs share
    them, else in each panel's title."""
    models = {run.model for run in runs}
    shared_model = models.pop() if len(models) == 1 and len(runs) > 1 else None
    modes = {run.query for run in runs}
    shared_mode = modes.pop() if len(modes) == 1 and shared_model else None
    schedules = {run.decode for run in runs}
    shared_decode = schedules.pop() if len(schedules) == 1 and shared_model else None
    axes_height = PANEL_AXES if len(runs) > 1 else SINGLE_PANEL_AXES
    fig, axes = _panel_figure(len(runs), shared_model is not None, axes_height)
    mesh = None
    for index, (run, ax) in enumerate(zip(runs, axes)):
        label = run.label if shared_model else f"{run.model}, {run.label}"
        label = label if shared_mode else f"{label}, query-{run.query}"
        label = label if shared_decode else f"{label}, {run.decode}"
        if lettered:
            # As the papers: the average score above the panel, a bold "(a) Method" caption below it.
            mesh = heatmap(run.records, ax, "", run.trained_len, score_field=score_field, colorbar=False)
            ax.text(0.5, -PANEL_BELOW / axes_height, f"({chr(ord('a') + index)}) {label}", transform=ax.transAxes,
                    ha="center", va="top", fontsize=14, fontweight="bold")
        else:
            mesh = heatmap(run.records, ax, label, run.trained_len, score_field=score_field, colorbar=False)
    _add_shared_colorbar(fig, axes, mesh, score_field)
    if shared_model:
        mode = (f", query-{shared_mode}" if shared_mode else "") + (f", {shared_decode}" if shared_decode else "")
        kind = "" if score_field == "score" else f" ({SCORE_FIELDS[score_field][0].lower()})"
        fig.suptitle(f"Needle-in-a-Haystack{kind} — {shared_model}{mode}", fontsize=14, fontweight="bold",
                     y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def _fields(runs: list[NeedleRun]) -> list[str]:
    """The papers' score, and the retrieval score when every run has it (lines with responses)."""
    return ["score"] + (["retrieval"] if all("retrieval" in run.records.columns for run in runs) else [])


def plot_run(result_dir: str | Path, out: str | Path | None = None,
             trained_len: int | None = None) -> list[Path]:
    """Draw one run's heatmap to ``needle_heatmap.png`` and ``.pdf`` in ``out`` (default: the run folder), and its
    retrieval heatmap to ``needle_retrieval.png`` and ``.pdf``."""
    run = load_needle_run(result_dir, trained_len)
    folder = Path(out) if out is not None else Path(result_dir)
    names = {"score": FIGURE_NAME, "retrieval": "needle_retrieval"}
    return [path for field in _fields([run])
            for path in _save_png_and_pdf(_draw_runs([run], False, field), folder / f"{names[field]}.png")]


def plot_stacked(result_dirs: list[str | Path], out_path: str | Path,
                 trained_len: int | None = None) -> list[Path]:
    """Stack one heatmap per run, labelled (a), (b), ..., on one colour scale; write PNG and PDF (and the retrieval
    figure as ``<out>_retrieval.png`` / ``.pdf``)."""
    out_path = Path(out_path)
    runs = _load_runs(result_dirs, trained_len)
    return [path for field in _fields(runs) for path in _save_png_and_pdf(
        _draw_runs(runs, True, field), out_path.with_name(f"{out_path.stem}{SCORE_FIELDS[field][1]}{out_path.suffix}"))]


def _load_runs(result_dirs: list[str | Path], trained_len: int | None) -> list[NeedleRun]:
    if not result_dirs:
        raise KvbenchError("A stacked needle figure needs at least one result folder.")
    if len(result_dirs) > 26:
        raise KvbenchError(f"{len(result_dirs)} runs is too many for one figure; pass at most 26.")
    return [load_needle_run(result_dir, trained_len) for result_dir in result_dirs]


def stacked_figure(result_dirs: list[str | Path], trained_len: int | None = None,
                   score_field: str = "score") -> Figure:
    """The figure ``plot_stacked`` saves: one lettered heatmap per run, one shared colour bar."""
    return _draw_runs(_load_runs(result_dirs, trained_len), lettered=True, score_field=score_field)


# --------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.needle.plot",
        description="Redraw Needle-in-a-Haystack heatmaps from saved result folders (runs nothing).",
    )
    parser.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR",
                        help="needle result folder(s): results/<model>/needle/<run_name>")
    parser.add_argument("--stacked", metavar="OUT.png",
                        help="draw all runs into one stacked figure (PNG + PDF) instead of one per run")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for the per-run figure (default: the run's own folder)")
    parser.add_argument("--trained-len", type=int, metavar="TOKENS",
                        help="model training length (e.g. 8150 for Llama-3): draws the white dashed line "
                             "at the first longer context; default: run.json model.trained_len")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input)."""
    args = _parse_args(argv)
    try:
        if args.out and not args.stacked and len(args.result_dirs) > 1:
            raise KvbenchError("--out with several result folders would write every figure to the "
                               "same file. Fix: drop --out (each figure goes into its run folder) "
                               "or use --stacked.")
        if args.stacked:
            written = plot_stacked(args.result_dirs, args.stacked, args.trained_len)
        else:
            written = [path for result_dir in args.result_dirs
                       for path in plot_run(result_dir, args.out, args.trained_len)]
    except KvbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
