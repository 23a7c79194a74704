"""Method labels of reports and figures: the papers' spelling of method names, their display order, and legend
labels of a row's settings (built from the report's columns, never parsed back). Below the report and the needle
plot, which use them."""
from __future__ import annotations


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


def is_fullkv(method: str) -> bool:
    """FullKV (the reference rows, never a compressed method); the query mode is a column, never a label suffix."""
    return str(method) == "FullKV"


def method_sort_key(name: str) -> tuple[int, str]:
    """Sort key putting the known methods first, in display order, and any others after, alphabetically."""
    order = list(method_display_names().values())
    if name in order:
        return (order.index(name), "")
    return (len(order), str(name).lower())


def decode_label(interval) -> str:
    """When the method compresses (`method.decode_interval`): `prefill` (after the prefill only: unset, 0 or NaN) or
    `every N` (also every N generated tokens). Every table and figure of the report states it."""
    return f"every {int(interval)}" if interval and interval == interval else "prefill"  # NaN != NaN


def setting_label(row) -> str:
    """A display label of a row's settings beyond the method: the query mode (beyond aware), the decode schedule
    (always) and the variant, e.g. "prefill" or "agnostic, every 16, multi-needle". For legends only: code reads
    the report's columns (query, decode_interval, variant), never this label."""
    parts = [] if row.get("query", "aware") in ("aware", "", None) else [str(row["query"])]
    parts.append(decode_label(row.get("decode_interval")))
    return ", ".join(parts + ([str(row["variant"])] if row.get("variant") else []))
