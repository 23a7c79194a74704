"""RULER (NVIDIA): the 13 tasks generated offline for the model's tokenizer, RULER's prompts and scoring.

- `constants`: the tasks, templates, answer prefixes and tokens to generate, verbatim from RULER;
- `generate`: RULER's generators on an explicit RNG (same draws, same samples for a tokenizer);
- `data`: cached generated sets, kvpress-format files, rendering to context | question token ids;
- `metrics`: string_match_all / string_match_part; `runner`: the benchmark plan; `report`: tables and figures.
"""
from kvbench.ruler.constants import ALL_TASKS, QA_TASKS, SYNTHETIC_TASKS
from kvbench.ruler.metrics import sample_score, string_match_all, string_match_part

__all__ = ["ALL_TASKS", "QA_TASKS", "SYNTHETIC_TASKS", "sample_score", "string_match_all", "string_match_part"]
