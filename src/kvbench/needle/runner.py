"""Needle-in-a-Haystack runs: one prediction line per (context length, depth) cell, resumable."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from kvbench.errors import KvbenchError
from kvbench.needle.haystack import Haystack, haystack_token_ids, load_haystack
from kvbench.needle.prompt import (NEEDLE, PROMPT_PRESETS, _validate_cell, build_context_ids,
                                   build_multi_context_ids, build_prompt_ids, build_session_ids,
                                   build_split_prompt_ids, context_lengths,
                                   depth_percents, needle_facts, needle_question, stop_token_ids)
from kvbench.needle.scoring import (cell_retrieval, heatmap_score, needle_sample_scores, retrieval_score,
                                    rouge_score_x10)
from kvbench.progress import progress
from kvbench.query import check_query_mode
from kvbench.sessions import check_session_answers, resume_answers, turn_scores

TASK = "needle"


def cell_key(length: int, depth: int) -> str:
    return f"{length}_{depth}"


@dataclass
class NeedlePlan:
    lengths: list[int]
    depths: list[int]
    haystack: Haystack
    prompt: str
    buffer: int
    max_new_tokens: int
    query: str = "aware"
    multi_needle: bool = False
    session: bool = False  # one conversation per length: needle i asked at turn i + 1 (multi_needle)
    session_answers: str = "gold"

    def protocol_name(self) -> str:
        return (f"needle_{self.prompt}" + ("_agnostic" if self.query == "agnostic" else "")
                + ("_multineedle" if self.multi_needle else "")
                + (f"_session{'' if self.session_answers == 'gold' else 'model'}" if self.session else ""))

    def cells(self) -> list[str]:
        return [cell_key(length, depth) for length in self.lengths for depth in self.depths]

    def selection(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths)}

    def check_tokenizer(self, tokenizer) -> None:
        """Checks that need the tokenizer, run before the model weights load: every length has room for the
        needle, and the chat preset has a chat template."""
        _validate_cell(min(self.lengths), 0, len(tokenizer.encode(NEEDLE, add_special_tokens=False)), self.buffer)
        if self.prompt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise KvbenchError("benchmark.prompt=chat needs a tokenizer with a chat template, and this one has "
                               "none; use benchmark.prompt=raw for base models")

    def settings(self) -> dict:
        # The grid is not a setting: a larger grid continues the same run, cells already done are kept.
        return {"name": "needle", "prompt": self.prompt, "buffer": self.buffer, "max_new_tokens": self.max_new_tokens,
                "haystack_files": len(self.haystack.files), "haystack_order_sha256": self.haystack.order_sha256,
                **({"query": self.query} if self.query != "aware" else {}),  # aware: the fingerprint of old runs
                **({"multi_needle": True, "depths": self.depths} if self.multi_needle else {}),
                **({"session": True, "session_answers": self.session_answers,
                    "turn_order": list(range(len(self.depths)))} if self.session else {})}  # needle per turn

    def run(self, store, model, tokenizer, run_one, show_progress: bool, on_sample=None) -> dict:
        if self.session:
            return self.run_sessions(store, tokenizer, run_one, show_progress, on_sample)
        done = store.done(TASK, key="cell")
        cells = [(length, depth) for length in self.lengths for depth in self.depths
                 if cell_key(length, depth) not in done]
        haystack_ids = haystack_token_ids(tokenizer, self.haystack, max(self.lengths)) if cells else []
        stops = stop_token_ids(tokenizer)
        multi: dict[int, tuple[list[int], list[int]]] = {}  # length -> the K-needle haystack and needle starts
        for length, depth in progress(cells, len(cells), f"needle ({len(done)} done)" if done else "needle",
                                      show_progress):
            needle = self.depths.index(depth) if self.multi_needle else 0
            if self.multi_needle:
                if length not in multi:
                    multi.clear()
                    multi[length] = build_multi_context_ids(tokenizer, haystack_ids, length, self.depths, self.buffer)
                context_ids, needle_index = multi[length][0], multi[length][1][needle]
            else:
                context_ids, needle_index = build_context_ids(tokenizer, haystack_ids, length, depth,
                                                              buffer=self.buffer)
            if self.query == "agnostic":  # the cells of one multi-needle haystack share its compressed cache
                split = build_split_prompt_ids(tokenizer, context_ids, self.prompt, needle=needle)
                input_ids = split.input_ids
                out, text = run_one(split.context_ids, self.max_new_tokens, stops, question_ids=split.question_ids)
            else:
                input_ids = build_prompt_ids(tokenizer, context_ids, self.prompt, needle=needle)
                out, text = run_one(input_ids, self.max_new_tokens, stops)
            response = text.strip()
            needle_text, _, _, expected = needle_question(needle)
            record = {"cell": cell_key(length, depth), "context_length": length, "depth_percent": depth,
                      "input_tokens": len(input_ids), "context_tokens": len(context_ids),
                      "needle_index": needle_index, "response": response,
                      "score_rouge": rouge_score_x10(response, needle_text),
                      "score": heatmap_score(response, expected=expected),
                      "retrieval": retrieval_score(response, needle_facts(needle)), **out.log_fields(),
                      **({"needle": needle} if self.multi_needle else {})}
            store.append(TASK, record)
            if on_sample:
                on_sample(TASK, record)
        return self.score(store)

    def run_sessions(self, store, tokenizer, run_one, show_progress: bool, on_sample=None) -> dict:
        """One session per length over its K-needle haystack: turn i + 1 asks needle i (at the i-th grid depth).
        Each turn is written as it ends; a killed session resumes at its first unanswered turn, replaying the
        recorded answers of the earlier ones (engine.generate_session)."""
        records = store.records(TASK, key="cell")
        todo = []
        for length in self.lengths:
            cells = {cell_key(length, depth) for depth in self.depths}
            recorded = [r for r in records if r["cell"] in cells]
            if len(recorded) < len(self.depths):
                todo.append((length, resume_answers(recorded, len(self.depths))))
        haystack_ids = haystack_token_ids(tokenizer, self.haystack, max(self.lengths)) if todo else []
        stops = stop_token_ids(tokenizer)
        for length, answered in progress(todo, len(todo), "needle sessions", show_progress):
            context_ids, starts = build_multi_context_ids(tokenizer, haystack_ids, length, self.depths, self.buffer)
            session_context, turns = build_session_ids(tokenizer, context_ids, len(self.depths), self.prompt)

            def on_turn(i, out, text, length=length, starts=starts, answered=answered):
                if i < len(answered):  # recorded before the session was killed
                    return
                response = text.strip()
                needle_text, _, _, expected = needle_question(i)
                record = {"cell": cell_key(length, self.depths[i]), "context_length": length,
                          "depth_percent": self.depths[i], "turn": i + 1, "session": str(length),
                          "context_tokens": len(context_ids), "needle_index": starts[i], "needle": i,
                          "response": response, "answer_ids": list(out.token_ids),
                          "score_rouge": rouge_score_x10(response, needle_text),
                          "score": heatmap_score(response, expected=expected),
                          "retrieval": retrieval_score(response, needle_facts(i)), **out.log_fields()}
                store.append(TASK, record)
                if on_sample:
                    on_sample(TASK, record)

            run_one(session_context, self.max_new_tokens, stops, turns=turns, answered=answered, on_turn=on_turn)
        return self.score(store)

    def score(self, store) -> dict:
        """The summary of exactly this grid's cells; cells of other grids in the folder are counted as also on
        disk."""
        wanted = set(self.cells())
        records = store.records(TASK, key="cell")  # each cell once
        chosen = [r for r in records if r["cell"] in wanted]
        summary = summarize_needle(chosen)
        summary["selection"] = self.selection()
        summary["also_on_disk"] = {TASK: len(records) - len(chosen)} if len(records) > len(chosen) else {}
        return summary


def summarize_needle(records: list[dict]) -> dict:
    """The run's summary: the mean heatmap score is what the papers report as accuracy / average score; the mean
    retrieval score is the share of cells whose answer names the needle's key facts (what measures retrieval)."""
    n = len(records)
    mean = sum(r["score"] for r in records) / n if n else None
    mean_rouge = sum(r["score_rouge"] for r in records) / n if n else None
    cells = [cell_retrieval(r) for r in records]
    retrieval = sum(cells) / n if n and None not in cells else None
    turns = {}
    if records and all("turn" in r for r in records):  # a session run: the scores per turn (turn 1 .. K)
        turns = {"turn_scores": turn_scores(records, lambda r: r["score"]),
                 "turn_retrieval": turn_scores(records, cell_retrieval)}
    return {"benchmark": "needle", "mean_score": mean, "mean_retrieval": retrieval, "mean_score_rouge": mean_rouge,
            "n": n, **turns,
            "sample_scores": needle_sample_scores(records)}


def plan_needle(cfg: DictConfig, spec=None) -> NeedlePlan:
    bench = cfg.benchmark
    if bench.prompt not in PROMPT_PRESETS:
        raise KvbenchError(f"benchmark.prompt={bench.prompt!r}: choose one of {', '.join(PROMPT_PRESETS)}")
    grid = bench.grid
    lengths = context_lengths(int(grid.start), int(grid.end), int(grid.step))
    if not lengths:
        raise KvbenchError(f"the needle grid {grid.start}..{grid.end} step {grid.step} has no context length")
    if int(grid.depths) > 101:  # rounded percents repeat beyond 101 depths: cells would run twice
        raise KvbenchError(f"benchmark.grid.depths={grid.depths}: at most 101 (one per whole percent)")
    depths = depth_percents(int(grid.depths))
    multi_needle = bool(bench.get("multi_needle", False))
    if bench.max_new_tokens is None:
        raise KvbenchError("benchmark.max_new_tokens is null; the needle test needs a number, e.g. 30 (its default)")
    if multi_needle:
        needle_question(len(depths) - 1)  # a clear error when the grid has more depths than distinct needles
    session = bool(bench.get("session", False))
    if session and not multi_needle:
        raise KvbenchError("benchmark.session=true needs questions that share a context: on needle, set "
                           "benchmark.multi_needle=true (one haystack per length, one needle asked per turn)")
    return NeedlePlan(lengths, depths, load_haystack(bench.haystack_dir), bench.prompt,
                      int(bench.buffer), int(bench.max_new_tokens), check_query_mode(bench.get("query", "aware")),
                      multi_needle, session, check_session_answers(bench.get("session_answers", "gold")))
