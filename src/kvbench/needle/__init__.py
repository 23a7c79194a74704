"""Needle-in-a-Haystack: haystack, contexts and prompts, scores, and the papers' heatmaps.

The run loop (model, generation, result files) lives in the pipeline; this package holds the
pieces it calls. Plotting is in ``kvbench.needle.plot`` (not imported here, to keep matplotlib
out of runs that do not draw).
"""

from kvbench.needle.haystack import Haystack, essay_folder, haystack_token_ids, load_haystack
from kvbench.needle.prompt import (
    EXPECTED_ANSWER,
    FINAL_CONTEXT_LENGTH_BUFFER,
    NEEDLE,
    RETRIEVAL_QUESTION,
    build_context_ids,
    build_prompt_ids,
    context_lengths,
    depth_percents,
    stop_token_ids,
)
from kvbench.needle.scoring import heatmap_score, retrieval_score, rouge_score_x10

__all__ = [
    "EXPECTED_ANSWER",
    "FINAL_CONTEXT_LENGTH_BUFFER",
    "NEEDLE",
    "RETRIEVAL_QUESTION",
    "Haystack",
    "build_context_ids",
    "build_prompt_ids",
    "context_lengths",
    "depth_percents",
    "essay_folder",
    "haystack_token_ids",
    "heatmap_score",
    "load_haystack",
    "retrieval_score",
    "rouge_score_x10",
    "stop_token_ids",
]
