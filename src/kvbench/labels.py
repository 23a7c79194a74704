"""Method labels of reports and figures: the papers' spelling of method names, their display order, and the label
suffix of query-agnostic runs. Below the report, the needle plot and the RULER report, which all use them."""
from __future__ import annotations

import re


def method_display_names() -> dict[str, str]:
    """{config name: display name}, in the papers' display order: the one place the report and the needle plot
    learn method names and order (point it at the method registry to add methods)."""
    from kvbench.methods.registry import display_names  # the method registry (imported on first use)

    return display_names()


def display_method(name: str) -> str:
    """The papers' spelling of a method name (`snapkv` -> `SnapKV`); unknown names are kept as given."""
    names = method_display_names()
    key = str(name).lower()
    aliases = {"full": "fullkv", "streaming_llm": "streamingllm", "streaming": "streamingllm"}
    key = aliases.get(key, key)
    if key in names:
        return names[key]
    by_display = {display.lower(): display for display in names.values()}
    return by_display.get(key, str(name))


AGNOSTIC = " (agnostic)"  # the label suffix of query-agnostic runs, so that no table mixes the two modes
DECODE = " (decode {})"  # the label suffix of decoding-time compression runs (every N tokens), never mixed either


def _decode_interval(label: str) -> int:
    """`SnapKV (decode 16)` -> 16; 0 for prefill-only labels."""
    match = re.search(r" \(decode (\d+)\)$", base_method(label))
    return int(match.group(1)) if match else 0


def base_method(label: str) -> str:
    """`SnapKV (agnostic)` -> `SnapKV`."""
    return str(label).removesuffix(AGNOSTIC)


def is_fullkv(label: str) -> bool:
    """FullKV in either query mode (`FullKV`, `FullKV (agnostic)`): the reference rows, never a compressed method."""
    return base_method(label) == "FullKV"


def method_sort_key(name: str) -> tuple[int, str]:
    """Sort key putting the known methods first, in display order, and any others after, alphabetically; a
    query-agnostic run (`SnapKV (agnostic)`) right after its aware sibling."""
    order = list(method_display_names().values())
    interval = _decode_interval(name)
    name, agnostic = base_method(name), str(name).endswith(AGNOSTIC)
    name = name.removesuffix(DECODE.format(interval)) if interval else name
    if name in order:
        return (order.index(name), "", interval, agnostic)
    return (len(order), str(name).lower(), interval, agnostic)
