"""The LongBench prompt and decoding protocol. Its presets, configs/protocol/*.yaml, reproduce specific published
pipelines (see the protocol reference, sections 4-5 and 11):
- `dynamickv`: the DynamicKV paper's `pred.py`: raw prompt (no chat template); only samsum gets min 1 new token and
  stops at [eos, "\\n"]; every other task stops on the model's generation_config EOS ids.
- `kvcache_factory`: PyramidKV / KVCache-Factory (Jul 2024 - Jan 2025): raw prompt; min 1 new token on all tasks;
  `eos_token_id=[tokenizer.eos_token_id]` on all tasks (no newline stop, not even for samsum).
- `official`: LongBench v1 `pred.py` generalised to any chat model: the model's own chat template wraps the 15 chat
  tasks; samsum rule as in `dynamickv`.

Predictions are stored raw (the decoded new tokens, unstripped); the first-line cut of trec/triviaqa/samsum/lsht
belongs to scoring, not here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvbench.errors import KvbenchError
from kvbench.longbench.tasks import task_spec

# LongBench v1 `config/dataset2prompt.json`, verbatim: typos ("asconcisely"), the space in "all news. \n\nNews", the
# leading space of "\n\n Answer" (qasper) and the trailing spaces of "is: " are part of the protocol.
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
        "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\n"
        "Question: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
        "不要输出任何其他字词。\n\n问题：{input}\n回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n"
        "{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# sha256 of THUDM LongBench v1 `config/dataset2prompt.json`; equals sha256(json.dumps(PROMPTS, indent=4,
# ensure_ascii=False)), which the tests check so that no character of a template can drift.
OFFICIAL_PROMPTS_SHA256 = "56d22ad4f382169c2b8a11ff4c982a4a1bea096c8152b0f0b85b64686b157c30"

_CHAT_TEMPLATES = ("none", "model")
_MIN_NEW_TOKENS_TASKS = ("all", "samsum", "none")
_EOS_MODES = ("generation_config", "tokenizer")
_TRUNCATIONS = ("middle",)


class ProtocolError(KvbenchError):
    """A protocol preset or setting is invalid, or the model/tokenizer cannot serve it."""


@dataclass(frozen=True)
class Protocol:
    """How prompts are built and decoding is configured (the presets: configs/protocol/*.yaml).

    chat_template: "none" = raw templated prompt (the KV papers); "model" = the chat tasks are wrapped in the
        tokenizer's chat template as one user message (the six no-chat tasks stay raw).
    min_new_tokens_tasks: where at least 1 new token is forced (`min_length=context+1`): "all", "samsum", "none".
    eos: "generation_config" = the model's generation_config EOS ids plus the tokenizer's; "tokenizer" = only
        `[tokenizer.eos_token_id]` (KVCache-Factory).
    samsum_newline_stop: samsum stops at `[tokenizer.eos_token_id, "\\n"-id]` (official/DynamicKV).
    truncation: "middle" (keep the first and last max_len/2 tokens of the templated prompt).
    add_special_tokens: tokenise the raw prompt with the tokenizer's special tokens (BOS).
    """

    name: str
    chat_template: str
    min_new_tokens_tasks: str
    eos: str
    samsum_newline_stop: bool
    truncation: str
    add_special_tokens: bool

    def __post_init__(self) -> None:
        _check_choice("chat_template", self.chat_template, _CHAT_TEMPLATES)
        _check_choice("min_new_tokens_tasks", self.min_new_tokens_tasks, _MIN_NEW_TOKENS_TASKS)
        _check_choice("eos", self.eos, _EOS_MODES)
        _check_choice("truncation", self.truncation, _TRUNCATIONS)
        for flag in ("samsum_newline_stop", "add_special_tokens"):
            if not isinstance(getattr(self, flag), bool):
                raise ProtocolError(f"protocol.{flag} must be true or false, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for the run record (same as dataclasses.asdict)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Protocol":
        """Build from a plain dict / Hydra config: every setting given (the presets are configs/protocol/*.yaml)."""
        values = dict(config)
        _check_known_keys(values)
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ProtocolError(f"protocol {values.get('name')!r} misses setting(s) {', '.join(missing)}; give every "
                                f"setting, or start from a preset (protocol=dynamickv|kvcache_factory|official)")
        return cls(**values)


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ProtocolError(f"protocol.{field_name} must be one of {', '.join(choices)}; got {value!r}")


def _check_known_keys(values: Mapping[str, Any]) -> None:
    known = {f.name for f in fields(Protocol)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProtocolError(f"unknown protocol setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class PromptResult:
    """The model input for one sample. `original_tokens` counts the templated prompt before truncation."""

    input_ids: list[int]
    truncated: bool
    original_tokens: int
    text: str


def format_prompt(task: str, example: Mapping[str, Any]) -> str:
    """The official template of `task` filled with the sample's fields (str.format, so braces in context are safe)."""
    template = PROMPTS[task_spec(task).name]
    try:
        return template.format(**example)
    except KeyError as error:
        raise ProtocolError(
            f"LongBench sample for {task!r} has no field {error}; samples need 'context' and 'input' "
            f"(is this a LongBench jsonl file?)"
        ) from None


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False)["input_ids"])


def truncate_middle(tokenizer: Any, ids: list[int], max_len: int) -> str:
    """LongBench's middle truncation: decode the first and last int(max_len/2) tokens and join the strings.

    The BOS in the head is dropped by skip_special_tokens and re-added when the text is tokenised again, so the
    final length is about max_len, not exactly (tokens can merge at the junction).
    """
    half = int(max_len / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail


def _wrap_in_chat(tokenizer: Any, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ProtocolError(
            "protocol chat_template=model needs a tokenizer with a chat template, and this one has none; "
            "use protocol=dynamickv or protocol=kvcache_factory (raw prompts) for a base model"
        )
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_max_input_len(max_input_len: Any) -> None:
    if max_input_len is None:
        return
    if isinstance(max_input_len, bool) or not isinstance(max_input_len, int) or max_input_len < 2:
        raise ProtocolError(
            f"max_input_len must be an integer >= 2 (tokens, BOS included) or null for no truncation; "
            f"got {max_input_len!r}"
        )


def build_prompt(
    task: str, example: Mapping[str, Any], tokenizer: Any, protocol: Protocol, max_input_len: int | None
) -> PromptResult:
    """Template, tokenise, middle-truncate (strictly longer than max_input_len), chat-wrap, tokenise again.

    Chat wrapping happens after truncation, as in the official pred.py, and only for chat tasks under
    chat_template="model". The wrapped text is tokenised without adding special tokens, because the chat template
    already writes them (adding them again would double the BOS).
    """
    _check_max_input_len(max_input_len)
    spec = task_spec(task)
    text = format_prompt(task, example)
    ids = _tokenize(tokenizer, text, protocol.add_special_tokens)
    original_tokens = len(ids)
    truncated = max_input_len is not None and original_tokens > max_input_len
    if truncated:
        text = truncate_middle(tokenizer, ids, max_input_len)
    if protocol.chat_template == "model" and spec.chat:
        text = _wrap_in_chat(tokenizer, text)
        ids = _tokenize(tokenizer, text, add_special_tokens=False)
    elif truncated:
        ids = _tokenize(tokenizer, text, protocol.add_special_tokens)
    return PromptResult(input_ids=ids, truncated=truncated, original_tokens=original_tokens, text=text)


# ---- query-agnostic split (benchmark.query=agnostic) -------------------------------------------------------------
# Where the question part of each official template starts (reference Part C, kvpress's rule): the context part is
# the template up to and including the fixed instruction after {context}; the question part is the question marker,
# {input} and the answer cue. Templates without {input} get their fixed trailing instruction (gov_report,
# multi_news, passage_count) or only their answer cue (vcsum, lcc) as the question part. In every template
# {context} precedes {input}; trec/triviaqa/samsum/lsht/repobench-p have no text between them.
QUESTION_STARTS: dict[str, str] = {
    "narrativeqa": "Question: {input}", "qasper": "Question: {input}", "multifieldqa_en": "Question: {input}",
    "multifieldqa_zh": "问题：{input}", "hotpotqa": "Question: {input}", "2wikimqa": "Question: {input}",
    "musique": "Question: {input}", "dureader": "问题：{input}",
    "gov_report": "Now, write a one-page summary of the report.", "qmsum": "Query: {input}",
    "multi_news": "Now, write a one-page summary of all the news.", "vcsum": "会议总结：",
    "trec": "{input}", "triviaqa": "{input}", "samsum": "{input}", "lsht": "{input}",
    "passage_count": "Please enter the final count", "passage_retrieval_en": "{input}",
    "passage_retrieval_zh": "{input}", "lcc": "Next line of code:\n", "repobench-p": "{input}",
}


def question_kind(task: str) -> str:
    """How the task's question part is made: "input" (the sample's question), "fixed_instruction" (no {input}: the
    trailing instruction) or "answer_cue_only" (no {input} and no instruction after the context)."""
    name = task_spec(task).name
    if "{input}" in QUESTION_STARTS[name]:
        return "input"
    return "answer_cue_only" if name in ("vcsum", "lcc") else "fixed_instruction"


def split_template(task: str) -> tuple[str, str]:
    """The official template cut into its context part and its question part (their concatenation is the template)."""
    name = task_spec(task).name
    template, marker = PROMPTS[name], QUESTION_STARTS[name]
    at = template.find(marker)
    if at < 0 or template.rfind(marker) != at:
        raise ProtocolError(f"the question marker of {name!r} is not found exactly once in its template")
    return template[:at], template[at:]


def build_split_prompt(
    task: str, example: Mapping[str, Any], tokenizer: Any, protocol: Protocol, max_input_len: int | None
):
    """The prompt of `build_prompt`, cut into context ids (compressed before the question is known) and question
    ids (fed afterwards). Unless the question itself would be truncated, context + question ids are exactly
    `build_prompt(...).input_ids`: the same text is truncated, rendered and tokenised once, then cut where the
    question part starts. If middle truncation would cut into the question (a question longer than half of
    max_input_len), only the context part is middle-truncated, to max_input_len minus the question's tokens
    (recorded as split_truncation="context_only"). A question part that alone fills max_input_len is truncated as
    in aware mode: the ids are the aware ones, cut where the kept tail starts (the context part is the kept head;
    split_truncation="question_cut")."""
    from kvbench.query import question_start, split_ids

    spec = task_spec(task)
    context_template, question_template = split_template(task)
    try:
        context_text, question_text = context_template.format(**example), question_template.format(**example)
    except KeyError as error:
        raise ProtocolError(f"LongBench sample for {task!r} has no field {error}; samples need 'context' and "
                            f"'input' (is this a LongBench jsonl file?)") from None
    chat = protocol.chat_template == "model" and spec.chat
    aware = build_prompt(task, example, tokenizer, protocol, max_input_len)
    info = {"question_kind": question_kind(task), "split_truncation": None}
    text, ids = aware.text, aware.input_ids
    boundary = None
    if aware.truncated:
        whole = _tokenize(tokenizer, context_text + question_text, protocol.add_special_tokens)
        cut = truncate_middle(tokenizer, whole, max_input_len)
        info["split_truncation"] = "whole_prompt"
        question_len = 0 if cut.endswith(question_text) else len(_tokenize(tokenizer, question_text, False))
        if max_input_len - question_len < 2:  # the question alone fills max_input_len: the aware ids, cut after
            head = tokenizer.decode(whole[: int(max_input_len / 2)], skip_special_tokens=True)  # the kept head
            start = text.find(cut.strip())
            if start < 0:
                raise ProtocolError(f"{task}: the truncated prompt is not in the rendered one; cannot split it")
            boundary = start + len(head) - (len(cut) - len(cut.lstrip()))
            info["split_truncation"] = "question_cut"
        elif question_len:  # the question would be cut: truncate the context part only
            budget = max_input_len - question_len
            context_ids = _tokenize(tokenizer, context_text, protocol.add_special_tokens)
            if len(context_ids) > budget:
                context_text = truncate_middle(tokenizer, context_ids, budget)
            text = context_text + question_text
            if chat:
                text = _wrap_in_chat(tokenizer, text)
            ids = _tokenize(tokenizer, text, False if chat else protocol.add_special_tokens)
            info["split_truncation"] = "context_only"
    if boundary is None and chat:
        boundary = question_start(text, question_text, task)
    elif boundary is None:
        if not text.endswith(question_text):
            raise ProtocolError(f"{task}: the prompt does not end with its question part; cannot split it")
        boundary = len(text) - len(question_text)
    prefix = _tokenize(tokenizer, text[:boundary], False if chat else protocol.add_special_tokens)
    split = split_ids(ids, prefix, task)
    split.info.update(info)
    return split, aware


@dataclass(frozen=True)
class GenSettings:
    """Decoding settings for one task: greedy, at most max_new_tokens, at least min_new_tokens (0 = no minimum)."""

    max_new_tokens: int
    min_new_tokens: int
    stop_token_ids: list[int]


def newline_token_id(tokenizer: Any) -> int:
    """The id the references use for the "\\n" stop: the last token of encode("\\n") (SentencePiece adds "▁")."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _tokenizer_eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ProtocolError(
            "the tokenizer has no eos_token_id, so generation could never stop early; set the tokenizer's "
            "eos_token or use a model whose tokenizer defines one"
        )
    return int(eos)


def _model_eos_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """generation_config EOS ids (in their order) followed by the tokenizer's EOS if not already there."""
    ids = _as_id_list(getattr(generation_config, "eos_token_id", None))
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None and int(tokenizer_eos) not in ids:
        ids.append(int(tokenizer_eos))
    if not ids:
        raise ProtocolError(
            "neither the generation_config nor the tokenizer defines an EOS token; set protocol.eos=tokenizer "
            "with a tokenizer that has an eos_token"
        )
    return ids


def _forces_first_token(task: str, protocol: Protocol) -> bool:
    if protocol.min_new_tokens_tasks == "all":
        return True
    return protocol.min_new_tokens_tasks == "samsum" and task == "samsum"


def generation_settings(task: str, tokenizer: Any, generation_config: Any, protocol: Protocol) -> GenSettings:
    """max/min new tokens and stop ids for `task` under `protocol` (generation_config may be None).

    samsum with samsum_newline_stop passes exactly [tokenizer.eos_token_id, "\\n"-id], as the references do (this
    replaces the generation_config ids for that task).
    """
    spec = task_spec(task)
    if protocol.samsum_newline_stop and spec.name == "samsum":
        stop_ids = [_tokenizer_eos(tokenizer), newline_token_id(tokenizer)]
    elif protocol.eos == "tokenizer":
        stop_ids = [_tokenizer_eos(tokenizer)]
    else:
        stop_ids = _model_eos_ids(tokenizer, generation_config)
    min_new = 1 if _forces_first_token(spec.name, protocol) else 0
    return GenSettings(max_new_tokens=spec.max_new_tokens, min_new_tokens=min_new, stop_token_ids=stop_ids)
