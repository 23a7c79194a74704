"""Progress bars with rate and ETA."""
from __future__ import annotations

from typing import Iterable

from tqdm import tqdm


def progress(items: Iterable, total: int, desc: str, enabled: bool = True) -> Iterable:
    return tqdm(items, total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)
