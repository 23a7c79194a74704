"""The needle's retrieval score (issue 25 item 6): 1 when the answer names the needle's key facts, next to the papers'
word-overlap score, in every prediction line, scores.json, sample scores, the report, heatmaps and the query gap."""
from __future__ import annotations

import json

import pytest

from kvbench.config import compose, output_dir
from kvbench.engine import GenerationOutput
from kvbench.needle.prompt import needle_facts
from kvbench.needle.scoring import cell_retrieval, heatmap_score, retrieval_score
from kvbench.pipeline import evaluate
from kvbench.results import read_predictions

FLUENT = "The best thing to do in San Francisco is to prioritize sustainability and act on climate change."
RIGHT = "Eat a SANDWICH and sit in Dolores-Park, on a sunny day!"


def test_fluent_non_answers_score_on_the_papers_scale_but_not_on_retrieval():
    assert heatmap_score(FLUENT) > 0.27 and retrieval_score(FLUENT) == 0.0
    assert retrieval_score(RIGHT) == 1.0  # case and punctuation do not matter
    assert retrieval_score("a sandwich in the park") == 0.0 and retrieval_score("Dolores Park") == 0.0
    assert retrieval_score("dolores\npark ... sandwich.") == 1.0
    # The K-needle variant: each needle declares its own facts; an old line is scored from its response.
    assert needle_facts(0) == ("sandwich", "Dolores Park") and needle_facts(9) == ("bagels", "Saint-Viateur")
    assert cell_retrieval({"needle": 9, "response": "warm bagels on saint viateur street"}) == 1.0
    assert cell_retrieval({"needle": 3, "response": RIGHT}) == 0.0
    assert cell_retrieval({"response": RIGHT, "retrieval": 0.0}) == 0.0  # the stored score is kept
    assert cell_retrieval({"score": 0.5}) is None  # no response: unknown, never a silent 0


def _fake_generate(tokenizer, answers):
    """The engine's generate (as the scheduler calls it), answering the i-th call with answers(i) (no model work)."""
    calls = []

    def generate(model, ids, method, max_new_tokens, **kwargs):
        calls.append(ids.shape[1])
        token_ids = tokenizer.encode(answers(len(calls)), add_special_tokens=False)
        return GenerationOutput(token_ids, ids.shape[1], 0.0, 0.0, 0, [ids.shape[1]], "stop_token")
    return generate


@pytest.fixture
def needle_runs(tmp_path, monkeypatch):
    """An aware and an agnostic needle run (tiny model, 4 cells each) whose first cell names the facts."""
    import kvbench.scheduler
    from kvbench.models import load_tokenizer
    from conftest import model_spec

    tok = load_tokenizer(model_spec("tiny_llama"))
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 60)
    dirs = []
    for query, answers in (("aware", lambda i: RIGHT if i == 1 else FLUENT), ("agnostic", lambda i: FLUENT)):
        monkeypatch.setattr(kvbench.scheduler, "generate", _fake_generate(tok, answers))
        cfg = compose(["model=tiny_llama", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv",
                       "budget=64", f"results_root={tmp_path / 'results'}", "progress=false",
                       "benchmark.grid.start=400", "benchmark.grid.end=600", "benchmark.grid.step=200",
                       "benchmark.grid.depths=2", f"benchmark.query={query}"])
        dirs.append((output_dir(cfg), evaluate(cfg)))
    return tmp_path / "results", dirs


def test_every_prediction_scores_json_and_sample_scores_carry_both(needle_runs):
    _, [(aware, scores), (agnostic, agnostic_scores)] = needle_runs
    lines = read_predictions(aware / "predictions" / "needle.jsonl")
    assert [line["retrieval"] for line in lines] == [1.0, 0.0, 0.0, 0.0]
    assert all(line["score"] > 0.27 for line in lines)  # the papers' score rewards the fluent non-answer
    assert scores["mean_retrieval"] == 0.25 and agnostic_scores["mean_retrieval"] == 0.0
    on_disk = json.loads((aware / "scores.json").read_text())
    assert on_disk["mean_retrieval"] == 0.25 and on_disk["mean_score"] == scores["mean_score"]
    rows = [json.loads(line) for line in (aware / "sample_scores.jsonl").read_text().splitlines()]
    assert [row["retrieval"] for row in rows] == [1.0, 0.0, 0.0, 0.0]


def _make_old(run_dir):
    """What a run scored before the retrieval score existed looks like on disk."""
    pred = run_dir / "predictions" / "needle.jsonl"
    lines = [{k: v for k, v in line.items() if k != "retrieval"} for line in read_predictions(pred)]
    pred.write_text("".join(json.dumps(line) + "\n" for line in lines))
    scores = json.loads((run_dir / "scores.json").read_text())
    del scores["mean_retrieval"]
    (run_dir / "scores.json").write_text(json.dumps(scores))
    (run_dir / "sample_scores.jsonl").unlink()


def test_report_tables_gap_and_heatmaps_show_both_and_old_runs_rescore(needle_runs, tmp_path, capsys):
    from kvbench.needle.plot import plot_run
    from kvbench.report.__main__ import main as report
    from kvbench.report.collect import collect
    from kvbench.report.query_gap import query_gap
    from kvbench.sample_scores import main as sample_scores

    root, [(aware, _), (agnostic, _)] = needle_runs
    for run_dir in (aware, agnostic):
        _make_old(run_dir)
    with pytest.warns(UserWarning, match="no needle retrieval score.*kvbench.sample_scores"):
        old = collect(root)
    assert old["retrieval"].isna().all()
    assert sample_scores([str(aware), str(agnostic)]) == 0  # rebuilt from the predictions' responses
    df = collect(root).set_index("query")
    assert df.at["aware", "retrieval"] == 25.0 and df.at["agnostic", "retrieval"] == 0.0
    assert df.at["aware", "retrieval_ci_low"] == 0.0 and df.at["aware", "retrieval_ci_high"] > 25.0
    assert df.at["aware", "score"] > 27.0  # the papers' score is kept as it was
    gap = query_gap(collect(root)).iloc[0]
    assert (gap["retrieval_aware"], gap["retrieval_agnostic"], gap["retrieval_gap"]) == (25.0, 0.0, 25.0)
    assert report([str(root), "--out", str(tmp_path / "rep")]) == 0
    needle_md = (tmp_path / "rep" / "needle.md").read_text()
    header = [cell.strip() for cell in needle_md.splitlines()[0].strip("|").split("|")]
    start = header.index("Score")
    assert header[start:start + 4] == ["Score", "95% CI", "Retrieval", "Retrieval 95% CI"]
    assert "25.00 | [0.00, " in needle_md and "Query" in header  # aware and agnostic runs: the mode is a column
    assert "measures retrieval" in needle_md and "measures retrieval" in (tmp_path / "rep" / "query_gap.md").read_text()
    assert "| 25.00 | 0.00 | +25.00 |" in (tmp_path / "rep" / "query_gap.md").read_text()
    written = [p.name for p in plot_run(aware, tmp_path / "fig")]
    assert written == ["needle_heatmap.png", "needle_heatmap.pdf", "needle_retrieval.png", "needle_retrieval.pdf"]
