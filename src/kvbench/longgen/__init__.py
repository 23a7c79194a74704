"""Long-output benchmark: tasks whose answers are hundreds of tokens long, generated offline from a seed.

- `generate`: the `copy_list` generator (a numbered list of essay sentences inside filler) and its cache;
- `metrics`: the exact line scorer (in-order line recall, plus exact match and correct leading lines);
- `runner`: the benchmark plan (`python run.py benchmark=longgen`).
"""
from kvbench.longgen.metrics import line_scores, sample_score

__all__ = ["line_scores", "sample_score"]
