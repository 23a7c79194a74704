"""Reports: collect result folders, render the papers' LongBench tables, draw figures, compare with the paper.

Typical use::

    from kvbench.report import collect, longbench_table, budget_curve
    df = collect(["results/"])
    print(longbench_table(df))                       # Markdown, papers' layout
    print(longbench_table(df, relative=True))        # percent of FullKV
    print(longbench_table(df, ci="pm"))              # score ± 95% CI half-width; † = not significantly best
    budget_curve(df, "results/report/budget_curve")  # .png and .pdf

Command line: ``python -m kvbench.report results/ --out results/report``.
"""
from kvbench.report.collect import ReportWarning, collect, layer_allocations
from kvbench.report.figures import budget_curve, layer_allocation, score_vs_bytes
from kvbench.report.tables import group_table, load_paper_results, longbench_table, paper_comparison

__all__ = [
    "ReportWarning", "collect", "layer_allocations", "longbench_table", "group_table", "paper_comparison", "load_paper_results",
    "budget_curve", "score_vs_bytes", "layer_allocation",
]
