"""The bench's peer column: kvpress's presses timed beside kvbench's methods in the same run, on the same model
weights and token ids, with the same thread count, so "ahead of the peer" is measured in every bench run.

kvpress pins its own transformers, so it runs in its own environment: `--peer-python PATH` or `KVBENCH_PEER_PYTHON`
names that environment's python (default: this python when it has kvpress; otherwise the column is skipped with a
note). The bench starts `benchmarks/kvpress_peer.py` there once and sends it one request per prefill; the two
processes never compute at the same time. Each pair below is one kvbench configuration and the press it mirrors,
with kvpress's settings on both sides (kvbench's built by the same translation its golden cases are checked with,
`kvbench.golden.method_for_case`), so both keep the same positions; a first untimed run of each side (the
warm-up) compares them. Timed: for each repeat, for each pair (order rotated each repeat), kvbench's prefill and
kvpress's (which side first alternates each repeat); the ratio is the median of the per-repeat kvbench/kvpress
ratios.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kvbench.engine import prefill
from kvbench.errors import KvbenchError
from kvbench.golden import method_for_case, weights_digest

PEER_ENV = "KVBENCH_PEER_PYTHON"
SCRIPT = Path(__file__).with_name("kvpress_peer.py")
RATIO_MAX = 1.05  # target: kvbench's prefill at most 1.05x kvpress's on the same press
EA = {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True, "epsilon": 0.0}


@dataclass(frozen=True)
class Pair:
    name: str  # the kvbench configuration (registered name)
    row: str  # the bench method it stands beside (`--methods` selects by it)
    params: Callable[[float], dict]  # compression ratio -> kvbench settings, in kvpress's names (golden-case params)
    press: Callable[[float], dict]  # compression ratio -> the kvpress press (kvpress_peer.py SPEC)


def _scorer(press: str, **extra) -> Callable[[float], dict]:
    return lambda r: {"press": press, "params": {"compression_ratio": r, **extra}}


PAIRS = (
    Pair("knorm", "knorm", lambda r: {"compression_ratio": r}, _scorer("KnormPress")),
    Pair("tova", "tova", lambda r: {"compression_ratio": r}, _scorer("TOVAPress")),
    Pair("expected_attention", "expected_attention", lambda r: {"compression_ratio": r, **EA},
         _scorer("ExpectedAttentionPress", **EA)),
    Pair("adakv_gqa", "adakv",
         lambda r: {"compression_ratio": r, "window_size": 64, "kernel_size": 5, "alpha_safeguard": 0.2},
         lambda r: {"press": "AdaKVPress", "params": {"alpha_safeguard": 0.2},
                    "inner": _scorer("SnapKVPress", window_size=64, kernel_size=5)(r)}),
    Pair("kvzip", "kvzip",
         lambda r: {"compression_ratio": r, "n_sink": 4, "chunk_size": 2048, "preamble": "chat_template"},
         _scorer("KVzipPress", n_sink=4, chunk_size=2048)),
    Pair("keydiff", "keydiff", lambda r: {"compression_ratio": r}, _scorer("KeyDiffPress")),
    Pair("lagkv", "lagkv", lambda r: {"compression_ratio": r, "n_sink": 4, "lag_size": 128, "cross_scoring": False},
         _scorer("LagKVPress", n_sink=4, lag_size=128, cross_scoring=False)),
    Pair("criticalkv", "criticalkv",
         lambda r: {"compression_ratio": r, "scorer": "knorm", "scorer_params": {}, "epsilon": 1e-4,
                    "first_stage_ratio": 0.5},
         lambda r: {"press": "CriticalKVPress", "params": {"epsilon": 1e-4, "first_stage_ratio": 0.5},
                    "inner": _scorer("KnormPress")(r)}),
    Pair("chunkkv", "chunkkv",
         lambda r: {"compression_ratio": r, "scorer": "knorm", "scorer_params": {}, "chunk_length": 20},
         lambda r: {"press": "ChunkKVPress", "params": {"chunk_length": 20}, "inner": _scorer("KnormPress")(r)}),
)


def compression_ratio(n: int, budget: int) -> float:
    """kvpress's `compression_ratio` keeping `budget` of `n` tokens per KV head (`int(n * (1 - r))`; lowered by
    1e-12 steps where float rounding would keep one less, as the golden cases)."""
    r = 1 - budget / n
    while int(n * (1 - r)) < budget:
        r -= 1e-12
    return r


def chosen_pairs(methods: list[str] | None) -> list[Pair]:
    return [p for p in PAIRS if methods is None or p.row in methods]


def kvpress_here() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def resolve_python(configured: str | None) -> str | None:
    """The peer's python: `configured` (--peer-python), else $KVBENCH_PEER_PYTHON, else this python when kvpress
    is installed here, else None (no peer column). A python named but not found is a clear error."""
    path = configured or os.environ.get(PEER_ENV) or None
    if path is None:
        return sys.executable if kvpress_here() else None
    found = shutil.which(path)
    if found is None:
        raise KvbenchError(f"--peer-python {path} (or ${PEER_ENV}): no such executable; name the python of an "
                           f"environment with kvpress installed, or leave both unset to skip the kvpress column")
    return found


class PeerError(Exception):
    pass


class Peer:
    """kvpress_peer.py running under `python`: one JSON request a line, one reply a line."""

    def __init__(self, python: str, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)

    def request(self, op: str, **fields) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.seek(0)
            tail = [ln for ln in self.log.read().splitlines() if ln.strip()][-1:] or ["no output"]
            raise PeerError(f"the peer process exited ({tail[0]})")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(reply["error"])
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def model_folder(model, tokenizer, scratch: Path) -> Path:
    """A transformers folder holding `model` for the peer to load: the one it was loaded from (the embedded
    model's converted copy), else the model and tokenizer written under `scratch` (tiny models)."""
    source = model.config.name_or_path
    if source and (Path(source) / "config.json").is_file():
        return Path(source)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return scratch


def same_positions(ours: list, theirs: list) -> dict:
    """How many (layer, KV head) lists of kept positions are equal, and how many positions differ in all."""
    pairs = [(set(a), set(b)) for la, lb in zip(ours, theirs) for a, b in zip(la, lb)]
    count = sum(len(la) for la in ours)
    return {"layer_heads_equal": sum(a == b for a, b in pairs), "layer_heads": count,
            "positions_differing": sum(len(a ^ b) for a, b in pairs),
            "shape_matches": count == sum(len(lb) for lb in theirs) and len(ours) == len(theirs)}


def bench_peer(model, tokenizer, settings, python: str | None, ids_for: Callable[[int], torch.Tensor]) -> dict:
    """The peer section of the bench record: {"skipped": reason} when there is no peer (or it failed; the bench
    goes on, the reason printed), else the versions, the model check and per length and pair the paired timings."""
    section = _bench_peer(model, tokenizer, settings, python, ids_for)
    if "skipped" in section:
        print(f"peer: kvpress column skipped: {section['skipped']}", flush=True)
    return section


def _bench_peer(model, tokenizer, settings, python, ids_for) -> dict:
    if python is None:
        return {"skipped": f"kvpress not found: set --peer-python or ${PEER_ENV} to the python of an environment "
                           f"with kvpress (e.g. its own venv) to time its presses beside kvbench's"}
    pairs = chosen_pairs(settings.methods)
    if not pairs:
        return {"skipped": "none of the chosen methods has a kvpress press to pair with"}
    threads = torch.get_num_threads()
    peer = Peer(python, threads)
    scratch = Path(tempfile.mkdtemp(prefix="kvbench-peer-"))
    try:
        versions = peer.request("load", model_dir=str(model_folder(model, tokenizer, scratch)),
                                dtype=str(model.dtype).removeprefix("torch."), threads=threads)
        if versions["weights_sha256"] != weights_digest(model):
            return {"skipped": "the peer loaded other weights than kvbench's model (sha256 differs)",
                    "peer": versions}
        lengths = {str(n): time_pairs(model, tokenizer, peer, pairs, ids_for(n), settings)
                   for n in (settings.peer_lengths or settings.prefill_lengths)}
    except PeerError as err:
        return {"skipped": f"the peer failed: {err}"}
    finally:
        peer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"python": python, "peer": versions, "threads": threads, "budget": settings.prefill_budget,
            "same_weights": True, "repeats": settings.repeats, "lengths": lengths, "note": NOTE}


NOTE = ("each pair: a kvbench configuration and the kvpress press it mirrors, with kvpress's settings on both sides "
        "(compression_ratio keeping `budget` per KV head; KVzip: on average); kvbench_s times kvbench.engine.prefill "
        "(the forward with one token's logits, the method's compression and extra passes), kvpress_s what kvpress's "
        "pipeline runs on the context (`with press(model): model.model(input_ids=ids, past_key_values=cache)`, "
        "no_grad; KVzipPress loads its tokenizer inside that block: kvpress_tokenizer_s, with the ratio without it); "
        "medians over repeats, ratio_vs_kvpress the median of per-repeat kvbench/kvpress ratios; same_positions "
        "from the first (warm-up) run of each side")


def time_pairs(model, tokenizer, peer: Peer, pairs: list[Pair], ids: torch.Tensor, settings) -> dict:
    n = ids.shape[1]
    r = compression_ratio(n, settings.prefill_budget)
    id_list = ids[0].tolist()

    def ours(pair: Pair, kept: bool = False):
        case = {"method": pair.name, "budget": settings.prefill_budget, "cache_heads": "per_kv_head",
                "params": pair.params(r)}
        method = method_for_case(case)
        method.bind(model, tokenizer)
        state = prefill(model, ids, method)
        return state.prefill_s, (state.cache.kept_positions() if kept else None), 0.0

    def theirs(pair: Pair, kept: bool = False):
        reply = peer.request("prefill", ids=id_list, press=pair.press(r), kept=kept)
        return reply["seconds"], reply.get("kept"), reply.get("tokenizer_s", 0.0)

    rows = {}
    for pair in pairs:  # warm-up and the positions check
        _, kept_ours, _ = ours(pair, kept=True)
        _, kept_theirs, _ = theirs(pair, kept=True)
        rows[pair.name] = {"row": pair.row, "params": pair.params(r), "press": pair.press(r),
                           "kvbench_raw_s": [], "kvpress_raw_s": [], "kvpress_tokenizer_raw_s": [],
                           "same_positions": same_positions(kept_ours, kept_theirs) if kept_theirs else None}
    for rep in range(settings.repeats):
        shift = rep % len(pairs)
        for pair in pairs[shift:] + pairs[:shift]:
            sides = [("kvbench", ours), ("kvpress", theirs)]
            for side, run in sides if rep % 2 == 0 else sides[::-1]:
                seconds, _, tokenizer_s = run(pair)
                rows[pair.name][f"{side}_raw_s"].append(seconds)
                if side == "kvpress":
                    rows[pair.name]["kvpress_tokenizer_raw_s"].append(tokenizer_s)
    for row in rows.values():
        row["kvbench_s"] = statistics.median(row["kvbench_raw_s"])
        row["kvpress_s"] = statistics.median(row["kvpress_raw_s"])
        row["ratio_vs_kvpress"] = statistics.median(
            [a / b for a, b in zip(row["kvbench_raw_s"], row["kvpress_raw_s"])])
        tokenizer = row.pop("kvpress_tokenizer_raw_s")
        if any(tokenizer):  # KVzipPress loads its tokenizer inside the timed block: also the ratio without it
            row["kvpress_tokenizer_s"] = statistics.median(tokenizer)
            row["ratio_vs_kvpress_less_tokenizer"] = statistics.median(
                [a / (b - t) for a, b, t in zip(row["kvbench_raw_s"], row["kvpress_raw_s"], tokenizer)])
    print(f"peer {n}: " + ", ".join(f"{name} {row['ratio_vs_kvpress']:.2f}x kvpress" for name, row in rows.items()),
          flush=True)
    return rows


def targets(peer: dict) -> list[dict]:
    """kvbench's prefill at most RATIO_MAX x kvpress's, per pair, at the longest length timed."""
    if "lengths" not in peer:
        return []
    length = max(peer["lengths"], key=int)
    return [{"target": f"{name} prefill <= {RATIO_MAX:g}x kvpress {row['press']['press']}",
             "measured": round(row["ratio_vs_kvpress"], 4), "limit": RATIO_MAX,
             "passed": row["ratio_vs_kvpress"] <= RATIO_MAX, "at_tokens": int(length)}
            for name, row in peer["lengths"][length].items()]


def table_lines(peer: dict | None) -> list[str]:
    """The printed peer table: per pair and length, kvbench and kvpress seconds, the ratio, equal kept lists."""
    if not peer:
        return []
    if "lengths" not in peer:
        return [f"Peer (kvpress): skipped: {peer['skipped']}"]
    v = peer["peer"]
    lines = [f"Peer: kvpress {v['kvpress']} in its own environment (torch {v['torch']}, transformers "
             f"{v['transformers']}), same weights and token ids, {peer['threads']} thread(s) each, budget "
             f"{peer['budget']}: median seconds kvbench | kvpress (ratio_vs_kvpress), equal kept lists"]
    for length, rows in sorted(peer["lengths"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"  {length} tok:")
        for name, row in rows.items():
            same = row["same_positions"]
            kept = "n/a" if same is None else f"{same['layer_heads_equal']}/{same['layer_heads']}"
            less = (f"; {row['ratio_vs_kvpress_less_tokenizer']:.3f}x without kvpress's "
                    f"{row['kvpress_tokenizer_s']:.2f}s tokenizer load" if "kvpress_tokenizer_s" in row else "")
            lines.append(f"    {name:<19}{row['kvbench_s']:>9.2f}s |{row['kvpress_s']:>9.2f}s "
                         f"({row['ratio_vs_kvpress']:.3f}x)  kept {kept}{less}")
    return lines
