"""RULER's 13 generators (NVIDIA/RULER c3f5e3b, `scripts/data/synthetic/*.py`), re-written around an explicit RNG.

Each RULER generator is a separate process that seeds Python's and NumPy's global RNGs with the seed (42) and then
draws everything (binary-search probes included) from them in one fixed order. Here one `random.Random(seed)` and
one `np.random.RandomState(seed)` per (task, length) play those global RNGs, drawn in the same order, so for a given
tokenizer, template and word lists the samples are RULER's. Sample i depends only on the draws before it: the first
k of n samples are the k-sample set (the cache relies on this).

Lengths count tokens as RULER does (`tokenizer.tokenize`: no BOS), template and answer prefix included, and a sample
is accepted when `prompt tokens + tokens_to_generate <= length`.
"""
from __future__ import annotations

import bisect
import json
import random
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.ruler.constants import (DOCUMENT_PROMPT, FAMILIES, NEEDLE, NOISE, QA_FILES, QA_HINT, TASKS, family_of,
                                     tokens_to_generate)
from kvbench.ruler.resources import essay_words, sent_tokenize, word_list
from kvbench.ruler.template import ModelTemplate, split_prompt

MAX_FLOOR_TRIES = 100
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


class PairWords(Sequence):
    """`sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))` (6.2M strings for wonderwords) without
    building it: indexable, as `random.choice` needs. Strings of adjectives whose "adj-" is not a prefix of another
    adjective's "adj-" form contiguous runs in sorted order; only such prefix families are merged explicitly."""

    def __init__(self, adjs: Sequence[str], nouns: Sequence[str]) -> None:
        self.nouns = sorted(set(nouns))
        heads = sorted({a + "-" for a in adjs})
        self.blocks: list = []  # per cluster: a head string (one adjective) or the merged list of its strings
        sizes = []
        i = 0
        while i < len(heads):
            j = i + 1
            while j < len(heads) and heads[j].startswith(heads[i]):
                j += 1
            if j == i + 1:
                self.blocks.append(heads[i])
                sizes.append(len(self.nouns))
            else:
                merged = sorted({h + n for h in heads[i:j] for n in self.nouns})
                self.blocks.append(merged)
                sizes.append(len(merged))
            i = j
        self.starts = list(np.cumsum([0] + sizes))
        self.size = int(self.starts[-1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self.size:
            raise IndexError(index)
        block = bisect.bisect_right(self.starts, index) - 1
        offset = index - int(self.starts[block])
        head = self.blocks[block]
        return head + self.nouns[offset] if isinstance(head, str) else head[offset]


_PAIRS: dict = {}


def niah_words() -> PairWords:
    if "words" not in _PAIRS:
        _PAIRS["words"] = PairWords(word_list("adjectivelist.txt"), word_list("nounlist.txt"))
    return _PAIRS["words"]


@dataclass
class Context:
    """What every generator needs: RNGs, the token counter, the full template, the target length."""
    task: str
    seed: int
    max_seq_length: int
    count: Callable[[str], int]          # tokens of a text, no special tokens added (RULER's `text_to_tokens`)
    model_template: ModelTemplate
    essay_folder: str | None = None
    qa_dir: str | None = None
    py: random.Random = field(init=False)
    np: np.random.RandomState = field(init=False)

    def __post_init__(self) -> None:
        self.py = random.Random(self.seed)
        self.np = np.random.RandomState(self.seed)

    @property
    def args(self) -> dict:
        return TASKS[self.task]["args"]

    @property
    def family(self) -> str:
        return family_of(self.task)

    @property
    def tokens_to_generate(self) -> int:
        return tokens_to_generate(self.task)

    def template(self) -> str:
        fam = FAMILIES[self.family]
        return self.model_template.wrap(fam["template"], fam["answer_prefix"])


def _binary_search(probe: Callable[[int], int], incremental: int, estimate_tokens: int, max_len: int) -> int:
    """RULER's haystack-size search (HEAD): bounds from one probe, then the largest size that fits."""
    tokens_per_unit = estimate_tokens / incremental
    lower, upper = incremental, max(int((max_len / tokens_per_unit) * 3), incremental * 2)
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        if probe(mid) <= max_len:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best if best is not None else incremental


def _fit(make: Callable[[int], tuple[str, list]], size: int, incremental: int, ctx: Context,
         extra_tokens: int = 0) -> tuple[str, list, int]:
    """Generate at `size`; shrink by `incremental` while the sample overflows (RULER's retry loop). RULER retries
    forever at the lower bound; a sample that cannot fit at all is an error here."""
    floor_tries = 0
    while True:
        text, answer = make(size)
        length = ctx.count(text) + ctx.tokens_to_generate + extra_tokens
        if length <= ctx.max_seq_length:
            return text, answer, length
        if size > incremental:
            size -= incremental
            continue
        floor_tries += 1  # RULER redraws at the smallest size for ever; give up after a while
        if floor_tries >= MAX_FLOOR_TRIES:
            raise KvbenchError(f"RULER {ctx.task}: even the smallest haystack ({size}) gives {length} tokens > length "
                               f"{ctx.max_seq_length}. Fix: use a larger benchmark.lengths value")


# ----------------------------------------------------------------------------------------------------- niah
def _random_value(ctx: Context, kind: str) -> str:
    if kind == "numbers":
        return str(ctx.py.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return ctx.py.choice(niah_words())
    if kind == "uuids":
        return str(uuid.UUID(int=ctx.py.getrandbits(128), version=4))
    raise KvbenchError(f"unknown needle type {kind!r}")


def _niah_singular(text: str) -> str:
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _niah_make(ctx: Context, num_haystack: int) -> tuple[str, list]:
    a = ctx.args
    num_k = max(a["num_needle_k"], a["num_needle_q"])
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(ctx, a["type_needle_k"]))
        value = []
        for _ in range(a["num_needle_v"]):
            value.append(_random_value(ctx, a["type_needle_v"]))
            needles.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=value[-1]))
        values.append(value)
    random.Random(ctx.seed).shuffle(needles)

    if a["type_haystack"] == "essay":
        words, _ = essay_words(ctx.essay_folder)
        if num_haystack <= len(words):
            text = " ".join(words[:num_haystack])
        else:
            repeats = (num_haystack + len(words) - 1) // len(words)
            text = " ".join((list(words) * repeats)[:num_haystack])
        sents = sent_tokenize(text.strip())
        positions = [0] + sorted(int(len(sents) * (d / 100)) for d in ctx.py.sample(DEPTHS, len(needles))) \
            + [len(sents)]
        pieces = []
        for i in range(1, len(positions)):
            pieces.append(" ".join(sents[positions[i - 1]:positions[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        if a["type_haystack"] == "noise":
            sentences = [NOISE] * num_haystack
        else:  # needle: a haystack of distractor needles
            sentences = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=_random_value(ctx, a["type_needle_k"]),
                                       value=_random_value(ctx, a["type_needle_v"])) for _ in range(num_haystack)]
        indexes = sorted(ctx.py.sample(range(num_haystack), len(needles)), reverse=True)
        for index, element in zip(indexes, needles):
            sentences.insert(index, element)
        context = "\n".join(sentences)

    picked = ctx.py.sample(range(num_k), a["num_needle_q"])
    queries = [keys[i] for i in picked]
    answers = [v for i in picked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

    fam = FAMILIES["niah"]
    task_template, answer_prefix, type_v = fam["template"], fam["answer_prefix"], a["type_needle_v"]
    if a["num_needle_q"] * a["num_needle_v"] == 1:
        # RULER rewrites its whole template string; here the task text only (see template.py / README).
        task_template, answer_prefix, type_v = _niah_singular(task_template), _niah_singular(answer_prefix), type_v[:-1]
    template = ctx.model_template.wrap(task_template, answer_prefix)
    return template.format(type_needle_v=type_v, context=context, query=query), answers


def _niah(ctx: Context, num_samples: int) -> list[tuple[str, list, int]]:
    kind = ctx.args["type_haystack"]
    incremental = 500 if kind == "essay" else 25
    if kind != "essay" and ctx.max_seq_length < 4096:
        incremental = 5
    make = lambda n: _niah_make(ctx, n)  # noqa: E731
    estimate = ctx.count(make(incremental)[0])
    size = _binary_search(lambda n: ctx.count(make(n)[0]) + ctx.tokens_to_generate, incremental, estimate,
                          ctx.max_seq_length)
    return [_fit(make, size, incremental, ctx) for _ in range(num_samples)]


# ------------------------------------------------------------------------------------------ variable tracking
def _vt_chains(ctx: Context, num_chains: int, num_hops: int, is_icl: bool) -> tuple[list, list]:
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    names = ["".join(ctx.py.choices(string.ascii_uppercase, k=k)).upper() for _ in range((num_hops + 1) * num_chains)]
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append("".join(ctx.py.choices(string.ascii_uppercase, k=k)).upper())
    var_groups, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        group = names[i:i + num_hops + 1]
        var_groups.append(group)
        chain = [f"VAR {group[0]} = 12345"] if is_icl else [f"VAR {group[0]} = {str(ctx.np.randint(10000, 99999))}"]
        for j in range(num_hops):
            chain.append(f"VAR {group[j + 1]} = VAR {group[j]} ")
        chains.append(chain)
    return var_groups, chains


def _vt_make(ctx: Context, num_noises: int, is_icl: bool) -> tuple[str, list]:
    a = ctx.args
    if a["type_haystack"] != "noise":
        raise KvbenchError("kvbench implements RULER's standard vt task (noise haystack) only")
    var_groups, chains = _vt_chains(ctx, a["num_chains"], a["num_hops"], is_icl)
    value = chains[0][0].split("=")[-1].strip()
    sentences = [NOISE] * num_noises
    for chain in chains:
        positions = sorted(ctx.py.sample(range(len(sentences)), len(chain)))
        for pos, j in zip(positions, range(len(chain))):
            sentences.insert(pos + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    fam = FAMILIES["variable_tracking"]
    template = ctx.template()
    if is_icl and template != fam["template"] + fam["answer_prefix"]:
        template = fam["template"] + fam["answer_prefix"]  # the ICL example never has the model template
    return template.format(context=context, query=value, num_v=a["num_hops"] + 1), var_groups[0]


def _vt_randomize_icl(ctx: Context, example: str) -> str:
    targets = example.strip().split()[-ctx.args["num_hops"] - 1:]
    for item in targets:
        example = example.replace(item, "".join(ctx.py.choices(string.ascii_uppercase, k=len(item))).upper())
    return example.replace("12345", str(ctx.np.randint(10000, 99999)))


def _vt_run(ctx: Context, num_samples: int, max_len: int, icl_example: str | None) -> list[tuple[str, list, int]]:
    add_fewshot = True  # sys_vartrack_w_noise_random's default; RULER's main() never overrides it
    is_icl = add_fewshot and icl_example is None
    ttg = ctx.tokens_to_generate if icl_example is not None else 0
    if icl_example is not None:
        incremental = 5 if ctx.max_seq_length < 4096 else 10
    else:
        incremental = 5
    example_tokens = ctx.count(icl_example) if icl_example is not None else 0
    make = lambda n: _vt_make(ctx, n, is_icl)  # noqa: E731
    estimate = ctx.count(make(incremental)[0])
    size = _binary_search(lambda n: ctx.count(make(n)[0]) + example_tokens + ttg, incremental, estimate, max_len)
    marker = FAMILIES["variable_tracking"]["template"][:20]
    out = []
    for _ in range(num_samples):
        used, floor_tries = size, 0
        while True:
            text, answer = make(used)
            if icl_example is not None:
                cut = text.index(marker)
                text = text[:cut] + _vt_randomize_icl(ctx, icl_example) + "\n" + text[cut:]
            length = ctx.count(text) + ttg
            if length <= max_len:
                break
            if used > incremental:
                used -= incremental
                continue
            floor_tries += 1
            if floor_tries >= MAX_FLOOR_TRIES:
                raise KvbenchError(f"RULER vt: even {used} noise lines give {length} tokens > length {max_len}. "
                                   f"Fix: use a larger benchmark.lengths value")
        out.append((text, answer, length))
    return out


def _vt(ctx: Context, num_samples: int) -> list[tuple[str, list, int]]:
    text, answer, _ = _vt_run(ctx, 1, 500, None)[0]
    icl_example = text + " " + " ".join(answer) + "\n"
    return _vt_run(ctx, num_samples, ctx.max_seq_length, icl_example)


# -------------------------------------------------------------------------------------- common words (cwe)
def _cwe_words(seed: int) -> list[str]:
    words = sorted(set(word_list("nounlist.txt") + word_list("adjectivelist.txt") + word_list("verblist.txt")))
    random.Random(seed).shuffle(words)
    return words


def _cwe_example(ctx: Context, words: list[str], num_words: int, common_repeats: int, uncommon_repeats: int,
                 common_nums: int) -> tuple[str, list]:
    if num_words > len(words):
        raise KvbenchError(f"RULER cwe at length {ctx.max_seq_length} needs {num_words} distinct words, more than "
                           f"wonderwords' {len(words)}; RULER then draws from its english_words.json, which kvbench "
                           f"does not ship. Fix: use cwe at lengths up to 32k")
    chosen = ctx.py.sample(words, num_words)
    common, uncommon = chosen[:common_nums], chosen[common_nums:]
    listed = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    random.Random(ctx.seed).shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def _cwe_make(ctx: Context, words: list[str], num_words: int) -> tuple[str, list]:
    a = ctx.args
    shots = []
    if ctx.max_seq_length < 4096:
        for _ in range(a["num_fewshot"]):
            shots.append(_cwe_example(ctx, words, 20, 3, 1, a["num_cw"]))
        context, answer = _cwe_example(ctx, words, num_words, 6, 1, a["num_cw"])
    else:
        for _ in range(a["num_fewshot"]):
            shots.append(_cwe_example(ctx, words, 40, 10, 3, a["num_cw"]))
        context, answer = _cwe_example(ctx, words, num_words, a["freq_cw"], a["freq_ucw"], a["num_cw"])
    template = ctx.template()
    rendered = [template.format(num_cw=a["num_cw"], context=c, query="") + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans)) for c, ans in shots]
    return "\n".join(rendered) + "\n" + template.format(num_cw=a["num_cw"], context=context, query=""), answer


def _cwe(ctx: Context, num_samples: int) -> list[tuple[str, list, int]]:
    words = _cwe_words(ctx.seed)
    incremental = 10
    make = lambda n: _cwe_make(ctx, words, n)  # noqa: E731
    tokens_per_word = ctx.count(make(4096)[0]) / 4096
    lower, upper = incremental, max(int(ctx.max_seq_length // tokens_per_word) * 2, incremental * 2)
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        if ctx.count(make(mid)[0]) + ctx.tokens_to_generate <= ctx.max_seq_length:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    size = best if best is not None else incremental
    return [_fit(make, size, incremental, ctx) for _ in range(num_samples)]


# ----------------------------------------------------------------------------------------- freq words (fwe)
def _fwe_make(ctx: Context, max_len: int, num_words: int, vocab_size: int, incremental: int) -> tuple[str, list, int]:
    a = ctx.args
    coded_wordlen, alpha = a["coded_wordlen"], a["alpha"]
    vocab = ["".join(ctx.py.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(ctx.py.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(set(vocab))
    random.Random(ctx.seed).shuffle(vocab)
    vocab[0] = "..."
    template = ctx.template()
    ranks = np.arange(1, len(vocab) + 1)

    def gen_text(n: int) -> tuple[str, list]:
        counts = n * (ranks ** -alpha) / _zeta(alpha)
        flat = [w for w, c in zip(vocab, counts.astype(int)) for _ in range(c)]
        random.Random(ctx.seed).shuffle(flat)
        return template.format(context=" ".join(flat), query=""), vocab[1:4]

    if num_words > 0:
        text, answer = gen_text(num_words)
        while ctx.count(text) > max_len:
            num_words -= incremental
            text, answer = gen_text(num_words)
    else:
        num_words = max_len // coded_wordlen
        text, answer = gen_text(num_words)
        while ctx.count(text) < max_len:
            num_words += incremental
            text, answer = gen_text(num_words)
        num_words -= incremental
    text, answer = gen_text(num_words)
    return text, answer, num_words


def _zeta(alpha: float) -> float:
    """scipy.special.zeta(alpha) (Hurwitz zeta at q=1) for alpha = 2, the only value RULER uses: pi^2/6."""
    try:
        from scipy.special import zeta
        return float(zeta(alpha))
    except ImportError:
        if alpha != 2.0:
            raise KvbenchError("fwe with alpha != 2 needs scipy; pip install scipy") from None
        return float(np.pi ** 2 / 6)


def _fwe(ctx: Context, num_samples: int) -> list[tuple[str, list, int]]:
    max_len = ctx.max_seq_length - ctx.tokens_to_generate
    vocab_size = max_len // 50 if ctx.args["vocab_size"] == -1 else ctx.args["vocab_size"]
    _, _, num_words = _fwe_make(ctx, max_len, -1, vocab_size, max_len // 32)
    out = []
    for _ in range(num_samples):
        text, answer, _ = _fwe_make(ctx, max_len, num_words, vocab_size, max_len // 32)
        out.append((text, answer, ctx.count(text) + ctx.tokens_to_generate))
    return out


# ------------------------------------------------------------------------------------------------------ qa
def _read_squad(path: Path) -> tuple[list, list]:
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    qas.append({"query": qa["question"], "outputs": [x["text"] for x in qa["answers"]],
                                "context": [index[p["context"]]],
                                "more_context": [i for i in more if i != index[p["context"]]]})
    return qas, docs


def _read_hotpotqa(path: Path) -> tuple[list, list]:
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


def qa_file(qa_dir: str | None, dataset: str) -> Path | None:
    if not qa_dir:
        return None
    path = Path(qa_dir) / QA_FILES[dataset]
    return path if path.is_file() else None


def _qa(ctx: Context, num_samples: int) -> list[tuple[str, list, int]]:
    dataset = ctx.args["dataset"]
    path = qa_file(ctx.qa_dir, dataset)
    if path is None:
        raise KvbenchError(f"RULER {ctx.task} needs {QA_FILES[dataset]}: {QA_HINT}")
    qas, docs = (_read_squad if dataset == "squad" else _read_hotpotqa)(path)
    if num_samples > len(qas):
        raise KvbenchError(f"{path} has {len(qas)} usable questions, fewer than benchmark.samples={num_samples}")
    template = ctx.template()

    def make(index: int, num_docs: int) -> tuple[str, list]:
        item = qas[index]
        gold, more = item["context"], item.get("more_context", [])
        if num_docs < len(docs):
            if num_docs - len(gold) > len(more):
                extra = [i for i, _ in enumerate(docs) if i not in gold + more]
                chosen = gold + more + ctx.py.sample(extra, max(0, num_docs - len(gold) - len(more)))
            else:
                chosen = gold + ctx.py.sample(more, num_docs - len(gold))
            chosen_docs = [docs[i] for i in chosen]
        else:
            repeats = (num_docs + len(docs) - 1) // len(docs)
            chosen_docs = (docs * repeats)[:num_docs]
        random.Random(ctx.seed).shuffle(chosen_docs)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(chosen_docs))
        return template.format(context=context, query=item["query"]), item["outputs"]

    incremental = 10
    estimate = ctx.count(make(0, incremental)[0])
    size = _binary_search(lambda n: ctx.count(make(0, n)[0]) + ctx.tokens_to_generate, incremental, estimate,
                          ctx.max_seq_length)
    return [_fit(lambda n, i=i: make(i, n), size, incremental, ctx) for i in range(num_samples)]


GENERATORS = {"niah": _niah, "variable_tracking": _vt, "common_words_extraction": _cwe,
              "freq_words_extraction": _fwe, "qa": _qa}


def generate_task(ctx: Context, num_samples: int) -> list[dict]:
    """`num_samples` RULER samples of one task at one length, each split into context | question | answer prefix."""
    family = ctx.family
    prefix_head = FAMILIES[family]["answer_prefix"][:10]
    samples = []
    for index, (text, outputs, length) in enumerate(GENERATORS[family](ctx, num_samples)):
        context, question, answer_prefix = split_prompt(family, text, text.rfind(prefix_head))
        samples.append({"index": index, "task": ctx.task, "length": ctx.max_seq_length, "context": context,
                        "question": question, "answer_prefix": answer_prefix, "outputs": list(outputs),
                        "max_new_tokens": ctx.tokens_to_generate, "ruler_tokens": length})
    return samples
