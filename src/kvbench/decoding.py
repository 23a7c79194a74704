"""Compression during decoding: a schedule of cuts after the prefill (`method.decode_interval`).

The reference is kvpress 0.5.5's `DecodingPress` (../shared/reference/decoding-and-sessions.md, section 1):
- every forward after the prefill (a generated token, or the query-agnostic question chunk) is one step; at the
  step that makes `decode_interval` steps since the last cut, every compressed layer is cut back to its budget,
  right after that layer's attention (so the step's own output used the uncut cache);
- the scorer sees the post-RoPE queries of the tokens appended since the last cut (kvpress buffers their hidden
  states and projects them; kvbench's attention wrapper hands the queries over directly), the current token
  included, and every key the layer holds; the buffer is emptied at each cut;
- the cut is the method's own score -> allocate -> select -> store (`Method.decode_compress_layer`), with the
  layer budgets a prefill of the sequence so far would get (uniform: `budget`; PyramidKV: its schedule); as at
  prefill, nothing is cut while the whole sequence fits the budget; selected rows are stored in the method's order (top-k order, as kvpress), new
  tokens are appended after them, and tokens keep their true absolute positions (their keys were rotated once,
  at their own position, and never again);
- a head-adaptive (ragged) layer is scored head by head over the tokens that head holds, allocated across heads
  with the same rule as at prefill, and stored ragged again.

Documented semantics (not options): the buffer holds every query since the last cut (kvpress with
`hidden_states_buffer_size >= compression_interval`); a window scorer (SnapKV) whose window is longer than the
buffer observes the buffered queries only (kvpress refuses that case), and the last `window_size` tokens are kept.
`method.decode_style` names the two places where kvpress 0.5.5 is odd (reference doc, "Inference" notes):
- `kvbench` (default): each buffered query keeps its own rotary phase; a cut stores the selected rows (descending
  score) and then the window in position order.
- `kvpress`: every buffered query gets the current token's rotary phase (kvpress's `compute_window_attention`
  slices the current forward's cos/sin), and a cut stores rows in kvpress's order, one top-k over all rows with the
  window padded at max + 1 (window first). Row order matters at later cuts for scorers that read row neighbours
  (SnapKV's pooling). Not reproduced in either style: kvpress's StreamingLLMPress keeps the first `n_sink` *rows*,
  which after its first cut are no longer the first tokens (top-k order of tied scores); kvbench's StreamingLLM
  always keeps the first positions (the paper's sinks).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from kvbench.cache import CompressedCache
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method
from kvbench.methods.fullkv import FullKV
from kvbench.ragged import RaggedLayer

def head_peak(layer) -> int:
    """The most tokens any head of `layer` holds."""
    if isinstance(layer, RaggedLayer):
        return layer.get_seq_length()
    return int(layer.held())


@dataclass
class KvPeak:
    """The most tokens any head held and the most KV bytes the cache held, over the states it went through."""
    tokens: int = 0
    bytes: int = 0

    def observe(self, cache: CompressedCache, extra_bytes: int = 0, tokens: int = 0) -> None:
        self.tokens = max(self.tokens, tokens, max((head_peak(layer) for layer in cache.layers), default=0))
        self.bytes = max(self.bytes, cache.nbytes() + extra_bytes)


@dataclass
class DecodeSchedule:
    """The state of one sample's decoding-time compression (see the module docstring)."""
    method: Method
    interval: int  # 0: no interval cuts (a session's turn boundaries only)
    rotary: object | None = None  # the model's rotary embedding (decode_style=kvpress only)
    record_kept: bool = False  # keep each cut's kept positions (tests, golden checks)
    steps: int = 0  # forwards since the last cut
    cuts: int = 0
    position: int = 0  # absolute position of the current forward's last token
    cutting: bool = False
    buffers: dict = field(default_factory=dict)  # layer -> list of [1, H, m, d] queries since the last cut
    positions: dict = field(default_factory=dict)  # layer -> list of the buffered queries' positions
    peak: KvPeak = field(default_factory=KvPeak)
    history: list = field(default_factory=list)  # per cut that removed tokens: {layer: kept positions per head}
    _pre_bytes: int = 0  # this forward: bytes the cuts removed (the peak is the state before them)
    _pre_tokens: int = 0  # this forward: the most tokens a head held before a cut
    _kept: dict = field(default_factory=dict)  # this forward: {layer: kept positions} (record_kept)

    # ---- what the engine calls around each forward after the prefill -------------------------------------------
    def begin_forward(self, first_position: int, count: int, cut: bool = False) -> None:
        """`cut`: this forward ends with a cut whatever the interval (a session's turn boundary)."""
        self.steps += 1
        self.position = first_position + count - 1
        self.cutting = cut or (self.interval > 0 and self.steps >= self.interval)
        self._pre_bytes, self._pre_tokens = 0, 0
        self._kept = {}

    def end_forward(self, cache: CompressedCache) -> None:
        self.peak.observe(cache, self._pre_bytes, self._pre_tokens)
        if self.cutting:
            self.steps, self.cuts = 0, self.cuts + 1
            if self.record_kept and self._kept:
                self.history.append(self._kept)

    def save(self) -> tuple:
        """The query buffer and step count, to go back to (a session's gold-answer mode drops the model's answer)."""
        return self.steps, {k: list(v) for k, v in self.buffers.items()}, {k: list(v) for k, v in self.positions.items()}

    def load(self, state: tuple) -> None:
        steps, buffers, positions = state
        self.steps, self.buffers, self.positions = steps, {k: list(v) for k, v in buffers.items()}, {
            k: list(v) for k, v in positions.items()}

    # ---- what the attention wrapper calls after each compressed layer's attention -----------------------------
    def after_attention(self, cache: CompressedCache, layer_idx: int, query: torch.Tensor, kwargs: dict) -> None:
        rank = cache.rank(layer_idx)
        if rank is None:  # a local layer left as the model defines it
            return
        scaling = kwargs.get("scaling")
        dim = query.shape[-1]
        if scaling is not None and not math.isclose(scaling * math.sqrt(dim), 1.0, rel_tol=1e-6):
            query = query * (scaling * math.sqrt(dim))  # the scores' 1/sqrt(d) then gives the model's logits
        observe = getattr(self.method, "decode_observe", None)
        if observe is not None:  # a method that accumulates over every forward (H2O)
            observe(rank, query, cache.layers[layer_idx].keys)
        first = self.position - query.shape[2] + 1
        self.buffers.setdefault(layer_idx, []).append(query)
        self.positions.setdefault(layer_idx, []).extend(range(first, self.position + 1))
        if not self.cutting:
            return
        queries = torch.cat(self.buffers.pop(layer_idx), dim=2)
        positions = self.positions.pop(layer_idx)
        if self.position + 1 <= self.method.tokens_budget:  # the whole sequence fits the budget (as at prefill)
            return
        if self.rotary is not None:
            queries = self._current_phase(queries, positions)
        layer = cache.layers[layer_idx]
        before, peak, keys = layer.nbytes(), head_peak(layer), layer.keys
        with torch.no_grad():
            if isinstance(layer, RaggedLayer):
                cut_ragged(self.method, rank, queries, layer, cache, layer_idx, self.position)
            else:
                cut_dense(self.method, rank, queries, layer, cache, layer_idx, self.position)
        self._pre_bytes += before - cache.layers[layer_idx].nbytes()
        self._pre_tokens = max(self._pre_tokens, peak)
        after = cache.layers[layer_idx]
        if self.record_kept and (after is not layer or after.keys is not keys):  # the layer was over its budget
            self._kept[layer_idx] = after.kept_positions()

    def _current_phase(self, queries: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """kvpress's phase: rotate each buffered query on by (current - own) positions, so that all of them carry
        the current token's rotary phase (RoPE rotations compose: R(p) R(c - p) = R(c))."""
        shift = torch.tensor([[self.position - p for p in positions]], device=queries.device)
        cos, sin = self.rotary(queries, shift)
        cos, sin = cos[:, None].to(queries.dtype), sin[:, None].to(queries.dtype)
        half = queries.shape[-1] // 2
        rotated = torch.cat([-queries[..., half:], queries[..., :half]], dim=-1)
        return queries * cos + rotated * sin


def held_positions(layer, last_position: int) -> torch.Tensor:
    """[S or 1, L] absolute positions of the tokens a dense layer holds, in row order. Tokens appended after a
    compression are the newest ones, ending at `last_position`."""
    held = int(layer.held())
    if getattr(layer, "abs_positions", None) is not None:  # a compressed local layer tracks them itself
        return layer.abs_positions
    if layer.positions is None:  # never compressed: the last `held` positions
        return torch.arange(last_position - held + 1, last_position + 1, device=layer.keys.device)[None]
    kept = layer.positions + layer.offset
    appended = held - kept.shape[1]
    new = torch.arange(last_position - appended + 1, last_position + 1, device=kept.device)
    return torch.cat([kept, new.expand(kept.shape[0], -1)], dim=1)


def positions_held(layer, last_position: int) -> list[list[int]]:
    """Per stored head, the absolute positions of every token `layer` holds (appended ones included)."""
    if isinstance(layer, RaggedLayer):
        tail = layer.tail_keys.shape[-2]
        new = list(range(last_position - tail + 1, last_position + 1))
        return [[p + layer.offset for p in head] + new for head in layer.positions]
    held = held_positions(layer, last_position)
    heads = layer.keys.shape[1]
    return (held.expand(heads, -1) if held.shape[0] == 1 else held).tolist()


def cut_dense(method: Method, rank: int, queries, layer, cache: CompressedCache, layer_idx: int,
              last_position: int) -> None:
    keys, values = layer.keys, layer.values
    absolute = held_positions(layer, last_position)
    method.decode_compress_layer(rank, queries, keys, values, cache.compressed, last_position + 1)
    new = cache.layers[layer_idx]
    if new is layer and new.keys is keys:  # the layer was within its budget: untouched
        return
    relabel(new, absolute)


def relabel(layer, absolute: torch.Tensor) -> None:
    """The method stored positions among the rows it was given; make them absolute (offset 0)."""
    if isinstance(layer, RaggedLayer):
        heads = len(layer.positions)
        per_head = absolute.expand(heads, -1) if absolute.shape[0] == 1 else absolute
        layer.positions = [per_head[h // (heads // per_head.shape[0])][torch.as_tensor(p, dtype=torch.long)].tolist()
                           for h, p in enumerate(layer.positions)]
        layer.offset = 0
        return
    rows = layer.positions
    if absolute.shape[0] == 1:
        absolute = absolute.expand(rows.shape[0], -1)
    source = torch.arange(rows.shape[0], device=rows.device) // (rows.shape[0] // absolute.shape[0])
    layer.positions = absolute[source[:, None], rows]
    layer.offset = 0
    if hasattr(layer, "abs_positions"):
        layer.abs_positions = layer.positions


def cut_ragged(method: Method, rank: int, queries, layer: RaggedLayer, cache: CompressedCache, layer_idx: int,
               last_position: int) -> None:
    """Score each stored head over the tokens it holds, allocate across heads as at prefill (budgets of the
    prefill), keep each head's top tokens plus its last `window_size`, store ragged again."""
    heads = layer.heads_stored
    group = queries.shape[1] // heads
    tail = layer.tail_keys.shape[-2]
    new = torch.arange(last_position - tail + 1, last_position + 1, device=layer.device)
    keys, values, absolute, scores = [], [], [], []
    for s in range(heads):
        start, end = int(layer.cu_seqlens[s]), int(layer.cu_seqlens[s + 1])
        keys.append(torch.cat([layer.prefix_keys[start:end], layer.tail_keys[0, s]]))
        values.append(torch.cat([layer.prefix_values[start:end], layer.tail_values[0, s]]))
        own = torch.as_tensor(layer.positions[s], dtype=torch.long, device=layer.device) + layer.offset
        absolute.append(torch.cat([own, new]))
        scores.append(method.head_scores(rank, queries[:, s * group:(s + 1) * group], keys[s][None, None])[0])
    prefix = [sc.shape[0] for sc in scores]
    padded = scores[0].new_full((heads, max(prefix)), float("-inf"))
    for s, sc in enumerate(scores):
        padded[s, :sc.shape[0]] = sc
    counts = method.allocate(rank, padded, last_position + 1)
    counts = [int(counts) if isinstance(counts, int) else int(counts[s]) for s in range(heads)]
    kept_k, kept_v, kept_pos = [], [], []
    for s in range(heads):
        top = padded[s, :prefix[s]].topk(min(counts[s], prefix[s])).indices if prefix[s] else padded.new_zeros(
            0, dtype=torch.long)
        rows = torch.cat([top, torch.arange(prefix[s], keys[s].shape[0], device=top.device)])
        kept_k.append(keys[s][rows])
        kept_v.append(values[s][rows])
        kept_pos.append(absolute[s][rows])
    cache.layers[layer_idx] = RaggedLayer(kept_k, kept_v, kept_pos)


def schedule_for(method: Method, model=None, record_kept: bool = False) -> DecodeSchedule | None:
    """The decode schedule of `method` (None: prefill-only)."""
    interval = getattr(method, "decode_interval", None)
    if not interval:
        return None
    rotary = None
    if getattr(method, "decode_style", "kvbench") == "kvpress":
        rotary = rotary_of(model)
    return DecodeSchedule(method, int(interval), rotary=rotary, record_kept=record_kept)


def session_schedule(method: Method, model=None) -> DecodeSchedule | None:
    """A multi-turn session's schedule: cuts at every turn boundary, and every `decode_interval` forwards when set
    (None: a method that keeps everything, FullKV, has nothing to cut)."""
    if isinstance(method, FullKV):
        return None
    rotary = rotary_of(model) if getattr(method, "decode_style", "kvbench") == "kvpress" else None
    return DecodeSchedule(method, int(method.decode_interval or 0), rotary=rotary)


def session_refusal(method: Method) -> str | None:
    """Why `method` cannot cut its cache back to the budget at a session's turn boundary (None: it can). A turn
    boundary is a decoding-time cut, so the method needs what `decode_interval` needs; FullKV needs nothing."""
    if isinstance(method, FullKV):
        return None
    if method.decode_refusal:
        return method.decode_refusal
    probe = copy.copy(method)
    probe.decode_interval = probe.decode_interval or 1
    try:
        probe.validate_decoding()
    except KvbenchError as err:
        return str(err)
    return None


def rotary_of(model):
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")] if model is not None else []
    if len(found) != 1:
        raise KvbenchError("method.decode_style=kvpress needs the model's one rotary embedding module; use "
                           "decode_style=kvbench")
    return found[0]


def snapshot(cache: CompressedCache, method: Method) -> tuple:
    """Shallow copies of every layer (appending and cutting replace tensors, never write into them) and of a
    method's per-layer decoding state (H2O's accumulated scores)."""
    state = getattr(method, "accumulated", None)
    return [copy.copy(layer) for layer in cache.layers], (dict(state) if state is not None else None)


def restore(cache: CompressedCache, method: Method, saved: tuple) -> None:
    layers, state = saved
    if state is not None:
        method.accumulated = dict(state)
    for i, layer in enumerate(layers):
        cache.layers[i] = copy.copy(layer)
