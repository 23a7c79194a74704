"""The `copy_list` generator: read a numbered list hidden in filler text, then write it out again, line by line.

A sample is a numbered list of distinct essay sentences (added until the list is at least `output_tokens` tokens,
so the answer is that long), placed at a random depth of filler that fills the prompt to `length` tokens (chat
template and question included): RULER's repeated noise sentences (`noise`, the default) or consecutive essay text
without the list's sentences (`essay`; harder: SmolLM2 drifts from a list line into the essay text). The reference
answer is the list's lines. Sample i is drawn from its own RNG, seeded with (seed, task, length, output_tokens, i):
it depends on nothing else, so any n samples are the first n of a larger set. Sets are cached as JSONL under the
sha256 of everything that determines them. Sentences: the essays of RULER's haystack (kvbench.needle.haystack),
split with NLTK's English Punkt.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from kvbench.atomic import atomic_write
from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl
from kvbench.ruler.constants import NOISE
from kvbench.ruler.data import canonical, sha256_text, tokenizer_sha256
from kvbench.ruler.resources import essay_words, punkt_record, sent_tokenize
from kvbench.ruler.template import ModelTemplate

GENERATOR_VERSION = "kvbench-longgen-2"
TASKS = ("copy_list",)
FILLERS = ("noise", "essay")  # noise: RULER's repeated noise sentences; essay: consecutive essay text
# List items: plain one-line sentences of 8-20 words (letters, digits, , ; : ' - and one final period).
_ITEM = re.compile(r"[A-Z][A-Za-z0-9 ,;:'\-]*[a-z]\.")
HEADER = "Read the text below. Somewhere in it is a numbered list of {n} sentences.\n\n"
LIST_OPEN, LIST_CLOSE = "\n\nThe numbered list:\n", "\nEnd of the numbered list.\n\n"
QUESTION = ("\n\nNow copy the numbered list from the text above, line by line, in the same order, with its "
            "numbers. Write nothing else.")
ANSWER_PREFIX = "The numbered list:\n1."  # opens the answer as the list opens in the context (its first number)


@functools.lru_cache(maxsize=2)
def sentences(folder: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all essay sentences in order, the sentences that can be list items)."""
    from kvbench.needle.haystack import load_haystack

    text = " ".join(load_haystack(folder).text.split())
    every = tuple(sent_tokenize(text))
    items = tuple(sorted({s for s in every if 8 <= len(s.split()) <= 20 and _ITEM.fullmatch(s)}))
    return every, items


def max_new_tokens(answer_tokens: int) -> int:
    """Room to write the reference answer plus 10 % and 16 tokens (a different tokenisation, a closing remark)."""
    return answer_tokens + answer_tokens // 10 + 16


@dataclass
class Generator:
    tokenizer: object
    template: ModelTemplate
    seed: int
    filler: str = "noise"
    essay_folder: str | None = None

    def identity(self) -> dict:
        _, essays = essay_words(self.essay_folder)
        return {"version": GENERATOR_VERSION, "seed": self.seed, "filler": self.filler,
                "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
                "template": self.template.record(), "punkt": punkt_record(), "essays": essays}

    def key(self, task: str, length: int, output_tokens: int) -> str:
        blob = canonical({**self.identity(), "task": task, "length": length, "output_tokens": output_tokens})
        return sha256_text(blob)[:16]

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def sample(self, task: str, length: int, output_tokens: int, index: int) -> dict:
        if task not in TASKS:
            raise KvbenchError(f"unknown long-output task {task!r}; choose from {', '.join(TASKS)}")
        rng = random.Random(f"{self.seed}:{task}:{length}:{output_tokens}:{index}")
        every, pool = sentences(self.essay_folder)
        lines: list[str] = []
        chosen: set[str] = set()
        while self._count("\n".join(lines)) < output_tokens:
            sentence = rng.choice(pool)
            if sentence not in chosen:
                chosen.add(sentence)
                lines.append(f"{len(lines) + 1}. {sentence}")
        block = "\n".join(lines)
        start = rng.randrange(len(every))
        if self.filler == "essay":
            filler = [s for s in every[start:] + every[:start] if s not in chosen]
        else:  # each noise sentence is at least 3 tokens: enough of them to fill any length
            filler = sent_tokenize(NOISE) * (length // 15 + 1)
        depth = rng.random()

        def texts(m: int) -> tuple[str, str]:
            k = round(depth * m)
            context = (self.template.prefix + HEADER.format(n=len(lines)) + " ".join(filler[:k]) + LIST_OPEN + block
                       + LIST_CLOSE + " ".join(filler[k:m]))
            return context, QUESTION + self.template.suffix  # the answer prefix follows (rendering adds it)

        size = lambda m: self._count("".join(texts(m)) + ANSWER_PREFIX)  # noqa: E731
        if size(0) > length:
            raise KvbenchError(f"benchmark.lengths: {length} tokens cannot hold a list of {output_tokens} tokens "
                               f"with its instructions ({size(0)} tokens). Fix: larger benchmark.lengths or smaller "
                               f"benchmark.output_tokens")
        low, high = 0, len(filler)  # the most filler sentences that fit (binary search; a result always fits)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if size(mid) <= length else (low, mid - 1)
        context, question = texts(low)
        answer_tokens = self._count(block)
        return {"index": index, "task": task, "length": length, "context": context, "question": question,
                "answer_prefix": ANSWER_PREFIX, "outputs": lines, "items": len(lines), "depth": round(depth, 4),
                "answer_tokens": answer_tokens, "max_new_tokens": max_new_tokens(answer_tokens),
                "prompt_tokens": self._count(context + question + ANSWER_PREFIX)}

    def samples(self, task: str, length: int, output_tokens: int, n: int, cache_dir: Path | None) -> list[dict]:
        path = cache_dir / f"{task}_{length}_{output_tokens}_{self.key(task, length, output_tokens)}.jsonl" \
            if cache_dir else None
        cached = []
        if path is not None and path.exists():
            cached = read_jsonl(path, f"delete {path} (a generated set, cached): it is generated again")
            if len(cached) >= n:
                return cached[:n]
        out = cached + [self.sample(task, length, output_tokens, i) for i in range(len(cached), n)]
        if path is not None:
            atomic_write(path, "".join(canonical(s) + "\n" for s in out))
        return out
