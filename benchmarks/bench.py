#!/usr/bin/env python
"""Performance benchmarks: what KV compression costs (prefill time, scorer time) and what it saves (decode time,
KV bytes, memory).

    python benchmarks/bench.py            # full CPU run on SmolLM2 (2k/4k/8k tokens, 3 repeats; ~25 min idle)
    python benchmarks/bench.py --quick    # smoke run: 2k tokens, 1 repeat, short decode
    python benchmarks/bench.py --gpu      # Llama-3-8B-shaped random bf16 model at 8k/32k (needs a GPU)

Writes `results/bench/<cpu|gpu>_<timestamp>.json` and `results/bench/latest_<cpu|gpu>.json` (atomically) and
prints a summary table. Ratios come from one run with the methods interleaved (for each repeat: for each method,
in an order rotated each repeat) after a warm-up, as the median of the per-repeat paired ratios, so load that
drifts during the run affects numerator and denominator alike.

With kvpress installed in its own environment (`--peer-python PATH` or KVBENCH_PEER_PYTHON), the CPU run also
times kvpress's presses beside kvbench's on the same weights and token ids (`benchmarks/peer.py`): the `peer`
section and table give kvbench_s, kvpress_s and ratio_vs_kvpress per pair; without it, a note and no column.

Peak memory during prefill is sampled: a thread reads the process RSS (/proc/self/statm) every 2 ms while the
prefill runs (CPU); on a GPU it is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvbench.engine import decode_step, num_layers_of, prefill
from kvbench.atomic import write_json_atomic
from kvbench.errors import KvbenchError
from kvbench.memory import PeakMemory
from kvbench.pipeline import git_commit, package_versions
from kvbench.methods import Method, StreamingLLM, registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's benchmarks package
from benchmarks import peer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Every registered configuration with its papers' settings (registry `paper_defaults`), in report order; the
# per-KV-head configurations (adakv_gqa, ...) are covered by the GQA-mode rows of the KV-bytes check instead.
METHOD_ORDER = tuple(name for name in registry.names(builtin_only=True)
                     if "cache_heads" not in registry.get(name).preset)
# The GPU run builds a random-weight model with no tokenizer: KVzip's repeat prompt needs one.
GPU_NOT_BENCHED = {name: "needs a tokenizer for its repeat prompt; the GPU model is random weights without one"
                   for name in ("kvzip", "kvzip_plus")}
TARGETS = {"prefill_ratio_max": 1.05, "h2o_prefill_ratio_max": 2.2, "h2o_peak_memory_ratio_max": 1.2,
           "decode_speedup_min": 1.5, "gpu_overhead_max": 0.03,
           # Ada-SnapKV against SnapKV at the same budget (issue 14)
           "adaptive_prefill_ratio_max": 1.05, "adaptive_decode_ratio_max": 1.2}


@dataclass
class Settings:
    """What one run measures. `prefill_lengths` also give the prefill memory; `decode_lengths` the decode."""
    model: str = "smollm2_135m"
    device: str = "cpu"
    prefill_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    decode_lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    decode_budgets: list[int] = field(default_factory=lambda: [64, 128, 512])
    prefill_budget: int = 128
    repeats: int = 3
    decode_steps: int = 16  # tokens per timed decode chunk
    kv_check_length: int = 1024
    kv_check_budgets: list[int] = field(default_factory=lambda: [64, 128, 512])
    adaptive_budget: int = 128  # Ada-SnapKV vs SnapKV decode, real prefills at each decode length
    scorer_seconds: float = 1.0
    methods: list[str] | None = None  # a subset of METHOD_ORDER (FullKV, the reference, is always run); None: all
    attn_implementations: list[str] = field(default_factory=lambda: ["sdpa"])
    seed: int = 0
    peer_python: str | None = None  # the python of an environment with kvpress (benchmarks/peer.py); None: none
    peer_lengths: list[int] | None = None  # prompt lengths of the peer table; None: the prefill lengths

    @classmethod
    def quick(cls, **overrides) -> "Settings":
        base = dict(prefill_lengths=[2048], decode_lengths=[2048], repeats=1, decode_steps=8, kv_check_length=512,
                    scorer_seconds=0.2)
        return cls(**{**base, **overrides})


# ---- building blocks --------------------------------------------------------------------------------------------
def paper_method(name: str, budget: int, cache_heads: str | None = None, model=None, tokenizer=None) -> Method:
    """A method with its papers' settings from the registry (FullKV ignores budget and GQA mode), bound to the
    model (and tokenizer) when given, as the pipeline binds it (Expected Attention, KVzip need them)."""
    if name == "fullkv":
        method = registry.build("fullkv")
    else:
        overrides = {} if cache_heads is None else {"cache_heads": cache_heads}
        method = registry.paper_method(name, budget, **overrides)
    if model is not None:
        method.bind(model, tokenizer)
    return method


def bench_methods(settings: "Settings", exclude: dict | None = None) -> list[str]:
    """The methods one run measures, in report order: FullKV first, then `settings.methods` (default: all)."""
    chosen = METHOD_ORDER if settings.methods is None else settings.methods
    unknown = [name for name in chosen if name not in METHOD_ORDER]
    if unknown:
        raise KvbenchError(f"--methods {' '.join(unknown)}: not a benchmarked method; choose from "
                           f"{', '.join(METHOD_ORDER)}")
    return [name for name in METHOD_ORDER if (name == "fullkv" or name in chosen) and name not in (exclude or {})]


def prompt_ids(length: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    """Random token ids [1, length]: speed does not depend on the text."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen).to(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rotated(items: list, shift: int) -> list:
    """`items` starting at position `shift`: each repeat runs the methods in a different order."""
    shift %= len(items)
    return items[shift:] + items[:shift]


# ---- prefill: time, KV bytes, memory --------------------------------------------------------------------------
def bench_prefill(model, settings: Settings, vocab: int, tokenizer=None, exclude: dict | None = None) -> dict:
    """Prefill wall time and peak memory per method and length, interleaved; ratios against FullKV."""
    results = {}
    names = bench_methods(settings, exclude)
    for length in settings.prefill_lengths:
        ids = prompt_ids(length, vocab, settings.device, settings.seed)
        prefill(model, ids, paper_method("fullkv", 0))  # warm-up at this length (allocator, page faults)
        raw = {name: {"prefill_s": [], "peak_bytes": [], "peak_delta_bytes": []} for name in names}
        kv = {}
        for rep in range(settings.repeats):
            for name in rotated(list(names), rep):
                method = paper_method(name, settings.prefill_budget, model=model, tokenizer=tokenizer)
                with PeakMemory(settings.device) as memory:
                    state = prefill(model, ids, method)
                raw[name]["prefill_s"].append(state.prefill_s)
                raw[name]["peak_bytes"].append(memory.peak)
                raw[name]["peak_delta_bytes"].append(memory.peak - memory.before)
                kv[name] = kv_record(model, method, state.cache, length)
                del state
        results[str(length)] = summarize_prefill(raw, kv)
        print(f"prefill {length}: " + ", ".join(
            f"{name} {results[str(length)][name]['median_s']:.2f}s" for name in names), flush=True)
    return results


def base_of(name: str) -> str | None:
    """The scorer a configuration is built on (`adakv` -> `snapkv`), or None for a plain method."""
    base = registry.get(name).cls.name if registry.is_registered(name) else name
    return base if base != name else None


def summarize_prefill(raw: dict, kv: dict) -> dict:
    """Medians, and ratios to FullKV as the median of per-repeat paired ratios (robust to drifting load); a
    configuration of another method (Ada-SnapKV) also gets its paired ratio to that method (SnapKV)."""
    full = raw["fullkv"]
    out = {}
    for name, runs in raw.items():
        base = base_of(name)
        against_base = {}
        if base in raw:
            against_base = {"base": base, "ratio_to_base": median(
                [t / b for t, b in zip(runs["prefill_s"], raw[base]["prefill_s"])])}
        paired = [t / f for t, f in zip(runs["prefill_s"], full["prefill_s"])]
        mem_paired = [m / f for m, f in zip(runs["peak_bytes"], full["peak_bytes"])]
        out[name] = {
            "raw_s": [round(t, 4) for t in runs["prefill_s"]],
            "median_s": median(runs["prefill_s"]),
            "ratio_to_fullkv": median(paired),
            "ratio_of_medians": median(runs["prefill_s"]) / median(full["prefill_s"]),
            "overhead_s": median(runs["prefill_s"]) - median(full["prefill_s"]),
            "peak_bytes": int(median(runs["peak_bytes"])),
            "peak_delta_bytes": int(median(runs["peak_delta_bytes"])),
            "peak_ratio_to_fullkv": median(mem_paired),
            "kv": kv[name],
            **against_base,
        }
    return out


# ---- KV bytes: measured against the formula --------------------------------------------------------------------
def model_shape(model) -> dict:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    return {"layers": num_layers_of(model), "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", heads),
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "elem_bytes": model.dtype.itemsize if hasattr(model.dtype, "itemsize") else 4}


def expected_kv_bytes(method: Method, prompt_len: int, shape: dict) -> int:
    """Bytes of keys + values after prefill from the method's own budget rules (`Method.expected_kv_tokens`:
    tokens summed over layers and stored heads) x head_dim x element size x 2. A compressed layer stores one row
    per query head (per_query_head, the official layout) or per KV head (per_kv_head); a head-adaptive layer
    stores each head's own count."""
    return 2 * method.expected_kv_tokens(prompt_len, shape) * shape["head_dim"] * shape["elem_bytes"]


def kept_tokens_bytes(cache, shape: dict) -> tuple[int, int]:
    """(bytes of exactly the tokens the cache says it kept, bytes if every head were padded to the layer's
    longest head): what a ragged layer must hold vs what a dense padded layer would."""
    kept = padded = 0
    for layer in cache.kept_positions():
        kept += sum(len(head) for head in layer)
        padded += max((len(head) for head in layer), default=0) * len(layer)
    unit = 2 * shape["head_dim"] * shape["elem_bytes"]
    return kept * unit, padded * unit


def kv_record(model, method: Method, cache, prompt_len: int) -> dict:
    """Measured and expected KV bytes of one prefilled cache."""
    shape = model_shape(model)
    measured = cache.nbytes()
    expected = expected_kv_bytes(method, prompt_len, shape)
    kept, padded = kept_tokens_bytes(cache, shape)
    return {"budget": getattr(method, "budget", None), "cache_heads": method.cache_heads,
            "measured_bytes": measured, "expected_bytes": expected, "kept_tokens_bytes": kept,
            "padded_bytes": padded, "matches": measured == expected == kept}


def bench_kv_bytes(model, settings: Settings, vocab: int, tokenizer=None) -> list[dict]:
    """KV bytes after prefill for every method x budget x GQA mode at `kv_check_length` tokens."""
    ids = prompt_ids(settings.kv_check_length, vocab, settings.device, settings.seed + 1)
    rows = []
    for name in bench_methods(settings):
        budgets = [None] if name == "fullkv" else settings.kv_check_budgets
        modes = ["per_query_head"] if name == "fullkv" else ["per_query_head", "per_kv_head"]
        for budget in budgets:
            for mode in modes:
                method = paper_method(name, budget, mode, model=model, tokenizer=tokenizer)
                state = prefill(model, ids, method)
                rows.append({"method": name, "prompt_tokens": settings.kv_check_length,
                             **kv_record(model, method, state.cache, settings.kv_check_length)})
    bad = [r for r in rows if not r["matches"]]
    print(f"kv bytes: {len(rows) - len(bad)}/{len(rows)} match the formula", flush=True)
    return rows


# ---- decode ----------------------------------------------------------------------------------------------------
def compressed_copy(full_cache, budget: int, num_heads: int, head_dim: int, window: int = 32):
    """A cache holding what a StreamingLLM prefill at `budget` would keep, cut from a FullKV cache.
    Decode speed depends only on the cache's shape (tokens per head, heads stored), which is the same for every
    uniform-budget method, so one FullKV prefill serves every budget."""
    from kvbench.cache import CompressedCache

    layers = len(full_cache.layers)
    cache = CompressedCache(layers)
    method = StreamingLLM(budget=budget, window_size=window)
    n = full_cache.layers[0].keys.shape[2]
    method.begin(n, layers)
    shape_only = torch.empty(1, num_heads, 1, head_dim, device=full_cache.layers[0].keys.device)
    for idx, layer in enumerate(full_cache.layers):
        cache.update(layer.keys, layer.values, idx)
        method.compress_layer(idx, shape_only, layer.keys, layer.values, cache)
    return cache


def bench_decode(model, settings: Settings, vocab: int) -> dict:
    """Milliseconds per generated token: FullKV against compressed caches of each budget, chunks interleaved."""
    shape = model_shape(model)
    results = {}
    for length in settings.decode_lengths:
        ids = prompt_ids(length, vocab, settings.device, settings.seed + 2)
        full = prefill(model, ids, paper_method("fullkv", 0))
        caches = {"fullkv": full.cache}
        caches.update({f"budget_{b}": compressed_copy(full.cache, b, shape["heads"], shape["head_dim"])
                       for b in settings.decode_budgets if b < length})
        if settings.adaptive_budget and settings.adaptive_budget < length:
            # Head-adaptive caches have per-head lengths (ragged layers): real prefills, SnapKV as the pair.
            for name in ("snapkv", "adakv"):
                method = paper_method(name, settings.adaptive_budget)
                caches[f"{name}_{settings.adaptive_budget}"] = prefill(model, ids, method).cache
        positions = {name: length for name in caches}
        token = full.logits.argmax(dim=-1, keepdim=True)
        for name in caches:  # warm-up step for every cache
            decode_step(model, token, positions[name], caches[name])
            positions[name] += 1
        raw = {name: [] for name in caches}
        for rep in range(max(settings.repeats, 3)):
            for name in rotated(list(caches), rep):
                raw[name].append(time_decode_chunk(model, token, positions[name], caches[name],
                                                   settings.decode_steps, settings.device))
                positions[name] += settings.decode_steps
        results[str(length)] = summarize_decode(raw)
        print(f"decode {length}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms/token"
                                               for k, v in results[str(length)].items()), flush=True)
        del caches, full
    return results


def time_decode_chunk(model, token: torch.Tensor, position: int, cache, steps: int, device: str) -> float:
    """Milliseconds per token over `steps` greedy decoding steps."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        token = decode_step(model, token, position + step, cache).argmax(dim=-1, keepdim=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def summarize_decode(raw: dict) -> dict:
    """Medians and speed-ups against FullKV; `adakv_<b>` also gets its paired ratio to `snapkv_<b>`."""
    full = raw["fullkv"]
    out = {name: {"raw_ms": [round(t, 3) for t in times], "median_ms": median(times),
                  "speedup_vs_fullkv": median([f / t for f, t in zip(full, times)])}
           for name, times in raw.items()}
    for name, times in raw.items():
        pair = "snapkv_" + name.split("_", 1)[1] if name.startswith("adakv_") else None
        if pair in raw:
            out[name]["ratio_to_snapkv"] = median([t / b for t, b in zip(times, raw[pair])])
    return out


# ---- scorers ---------------------------------------------------------------------------------------------------
EN_WORDS = ("the report states that federal agencies should improve oversight of contracts and program costs while "
            "officials reviewed data from several states during the fiscal year").split()
ZH_CHARS = "会议讨论了项目进展情况以及下一步工作计划我们需要加强管理提高效率确保按时完成任务"


def scorer_samples(metric: str, count: int, seed: int = 0) -> list[tuple[str, str, dict]]:
    """(prediction, ground truth, kwargs) of realistic lengths for each LongBench metric."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(EN_WORDS) for _ in range(k))

    def hanzi(k):
        return "".join(rng.choice(ZH_CHARS) for _ in range(k))

    classes = [f"class {i}" for i in range(50)]
    makers = {
        "qa_f1_score": lambda: (words(12), words(4), {}),
        "qa_f1_zh_score": lambda: (hanzi(30), hanzi(10), {}),
        "rouge_score": lambda: (words(200), words(200), {}),
        "rouge_zh_score": lambda: (hanzi(300), hanzi(300), {}),
        "classification_score": lambda: (f"{rng.choice(classes)}", rng.choice(classes), {"all_classes": classes}),
        "retrieval_score": lambda: (f"Paragraph {rng.randint(1, 30)}", f"Paragraph {rng.randint(1, 30)}", {}),
        "retrieval_zh_score": lambda: (f"段落{rng.randint(1, 30)}", f"段落{rng.randint(1, 30)}", {}),
        "count_score": lambda: (f"There are {rng.randint(1, 30)} unique paragraphs", str(rng.randint(1, 30)), {}),
        "code_sim_score": lambda: ("\n".join(words(10) for _ in range(3)), words(10), {}),
    }
    if metric not in makers:
        raise KvbenchError(f"no synthetic samples for metric {metric!r}; add a maker to scorer_samples")
    return [makers[metric]() for _ in range(count)]


def bench_scorers(seconds: float) -> dict:
    """Predictions scored per second for every metric of kvbench.longbench.metrics.METRICS."""
    from kvbench.longbench.metrics import METRICS

    results = {}
    for name, metric in METRICS.items():
        samples = scorer_samples(name, 50)
        for pred, truth, kwargs in samples[:2]:  # warm-up: jieba loads its dictionary on first use
            metric(pred, truth, **kwargs)
        scored, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for pred, truth, kwargs in samples:
                metric(pred, truth, **kwargs)
            scored += len(samples)
        elapsed = time.perf_counter() - start
        results[name] = {"predictions_per_s": scored / elapsed, "scored": scored, "seconds": elapsed}
    return results


# ---- targets, records, output ----------------------------------------------------------------------------------
def evaluate_targets(prefill_res: dict, decode_res: dict, kv_rows: list[dict], gpu: bool = False) -> list[dict]:
    """Each target with the measured value and pass/fail; measured at the largest length run (8k in a full run)."""
    targets = []
    if prefill_res:
        length = max(prefill_res, key=int)
        at = prefill_res[length]
        limit = TARGETS["gpu_overhead_max"] + 1 if gpu else TARGETS["prefill_ratio_max"]
        for name in [n for n in ("streamingllm", "snapkv", "pyramidkv", "dynamickv") + (("h2o",) if gpu else ())
                     if n in at]:
            targets.append(_target(f"{name} prefill <= {limit:g}x FullKV", at[name]["ratio_to_fullkv"], limit,
                                   "max", length))
        if not gpu and "h2o" in at:
            targets.append(_target(f"h2o prefill <= {TARGETS['h2o_prefill_ratio_max']:g}x FullKV",
                                   at["h2o"]["ratio_to_fullkv"],
                                   TARGETS["h2o_prefill_ratio_max"], "max", length) | {"note": H2O_NOTE})
            targets.append(_target("h2o peak process memory <= 1.2x FullKV", at["h2o"]["peak_ratio_to_fullkv"],
                                   TARGETS["h2o_peak_memory_ratio_max"], "max", length))
    if prefill_res:
        at = prefill_res[max(prefill_res, key=int)]
        for name, row in at.items():
            if row.get("base") and registry.get(name).preset.get("allocation") == "adaptive":
                targets.append(_target(f"{name} prefill <= {TARGETS['adaptive_prefill_ratio_max']:g}x {row['base']}",
                                       row["ratio_to_base"], TARGETS["adaptive_prefill_ratio_max"], "max",
                                       max(prefill_res, key=int)))
                kv = row["kv"]
                targets.append({"target": f"{name} KV bytes equal the kept tokens' bytes (not the padded size)",
                                "measured": kv["measured_bytes"], "limit": kv["kept_tokens_bytes"],
                                "passed": kv["measured_bytes"] == kv["kept_tokens_bytes"],
                                "padded_bytes": kv["padded_bytes"], "at_tokens": int(max(prefill_res, key=int))})
    if decode_res:
        length = max(decode_res, key=int)
        for name, row in decode_res[length].items():
            if "ratio_to_snapkv" in row:
                targets.append(_target(f"{name} decode <= {TARGETS['adaptive_decode_ratio_max']:g}x snapkv ms/token",
                                       row["ratio_to_snapkv"], TARGETS["adaptive_decode_ratio_max"], "max", length))
        if "budget_128" in decode_res[length]:
            targets.append(_target("decode budget 128 >= 1.5x faster per token than FullKV",
                                   decode_res[length]["budget_128"]["speedup_vs_fullkv"],
                                   TARGETS["decode_speedup_min"], "min", length))
    if kv_rows:
        matched = sum(r["matches"] for r in kv_rows)
        targets.append({"target": "KV bytes after prefill equal the formula (every method, budget, GQA mode)",
                        "measured": f"{matched}/{len(kv_rows)}", "limit": f"{len(kv_rows)}/{len(kv_rows)}",
                        "passed": matched == len(kv_rows), "at_tokens": kv_rows[0]["prompt_tokens"]})
    return targets


H2O_NOTE = ("exact official H2O scores need every query row's softmax normaliser over all keys (non-causal) and "
            "then column sums; one extra pass over the logits (a GEMM per KV head and one exp over all n x n "
            "entries, no value product) costs about 1.5x the model's own causal attention, so at 8k, where "
            "attention is most of SmolLM2's prefill, about 2x FullKV is the floor without a custom kernel")


def _target(label: str, value: float, limit: float, kind: str, length: str) -> dict:
    passed = value <= limit if kind == "max" else value >= limit
    return {"target": label, "measured": round(value, 4), "limit": limit, "passed": bool(passed),
            "at_tokens": int(length)}


def machine_info(device: str) -> dict:
    import transformers

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "load_average_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["flash_attn"] = package_versions()["flash-attn"]
    return info


def save_results(record: dict, out_dir: Path, kind: str) -> Path:
    """`<kind>_<timestamp>.json` plus `latest_<kind>.json` under `out_dir`."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{kind}_{stamp}.json"
    write_json_atomic(path, record)
    write_json_atomic(out_dir / f"latest_{kind}.json", record)
    return path


def summary_table(record: dict) -> str:
    """Readable summary: prefill ratios, decode speed, memory, scorers, targets."""
    lines = []
    for impl, prefill_res in record["prefill"].items():
        lengths = sorted(prefill_res, key=int)
        lines.append(f"Prefill ({impl}): median seconds (ratio to FullKV) | peak memory MiB (ratio)")
        names = list(prefill_res[lengths[0]])
        lines.append(f"{'method':<19}" + "".join(f"{n + ' tok':>26}" for n in lengths))
        for name in names:
            cells = "".join(f"{prefill_res[n][name]['median_s']:>15.2f}s "
                            f"({prefill_res[n][name]['ratio_to_fullkv']:.3f}x)" for n in lengths)
            lines.append(f"{name:<19}{cells}")
        for name in names:
            at = prefill_res[lengths[-1]][name]
            lines.append(f"  {name:<12} at {lengths[-1]}: peak {at['peak_bytes'] / 2**20:8.0f} MiB "
                         f"(+{at['peak_delta_bytes'] / 2**20:.0f} during prefill; {at['peak_ratio_to_fullkv']:.3f}x), "
                         f"KV {at['kv']['measured_bytes'] / 2**20:.1f} MiB"
                         + (f" (padded would be {at['kv']['padded_bytes'] / 2**20:.1f} MiB)"
                            if at['kv'].get('padded_bytes', 0) > at['kv']['measured_bytes'] else ""))
    for impl, decode_res in record["decode"].items():
        lines.append(f"Decode ({impl}): ms per token (speed-up vs FullKV)")
        for length, row in sorted(decode_res.items(), key=lambda kv: int(kv[0])):
            lines.append(f"  {length:>6} tok: " + ", ".join(
                f"{name} {v['median_ms']:.1f} ({v['speedup_vs_fullkv']:.2f}x)" for name, v in row.items()))
    lines += peer.table_lines(record.get("peer"))
    if record.get("scorers"):
        lines.append("Scorers: predictions per second")
        lines += [f"  {name:<22}{v['predictions_per_s']:>12.0f}" for name, v in record["scorers"].items()]
    busy = max(record["machine"]["load_average_start"][0], record["machine"]["load_average_end"][0])
    if busy > (record["machine"]["cpu_count"] or 1) * 0.75:
        lines.append(f"WARNING: the machine was busy (load average {busy:.1f} on {record['machine']['cpu_count']} "
                     f"cores): threads wait on each other, small ops slow down, and timings are not reliable")
    lines.append("Targets:")
    lines += [f"  [{'PASS' if t['passed'] else 'FAIL'}] {t['target']}: {t['measured']} (limit {t['limit']}, "
              f"at {t['at_tokens']} tokens)" for t in record["targets"]]
    return "\n".join(lines)


# ---- runs ------------------------------------------------------------------------------------------------------
def load_bench_model(name: str, device: str):
    from omegaconf import OmegaConf

    from kvbench.config import compose
    from kvbench.models import ModelSpec, load_model

    spec = ModelSpec.from_config(OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True))
    return load_model(spec, device)


def run_cpu(settings: Settings, skip_scorers: bool = False) -> dict:
    """Every CPU benchmark of `settings`; returns the record written to JSON."""
    machine = machine_info(settings.device)
    bench_methods(settings)  # an unknown --methods name fails before the model loads
    peer_python = peer.resolve_python(settings.peer_python)  # so does a peer python that is not there
    model, tokenizer = load_bench_model(settings.model, settings.device)
    vocab = len(tokenizer)
    started = time.perf_counter()
    prefill_res = bench_prefill(model, settings, vocab, tokenizer)
    peer_res = peer.bench_peer(model, tokenizer, settings, peer_python,
                               lambda n: prompt_ids(n, vocab, settings.device, settings.seed))
    decode_res = bench_decode(model, settings, vocab)
    kv_rows = bench_kv_bytes(model, settings, vocab, tokenizer)
    scorers = {} if skip_scorers else bench_scorers(settings.scorer_seconds)
    record = build_record(settings, machine, model, {"sdpa": prefill_res}, {"sdpa": decode_res}, kv_rows, scorers,
                          evaluate_targets(prefill_res, decode_res, kv_rows) + peer.targets(peer_res),
                          time.perf_counter() - started)
    return record | {"peer": peer_res}


def build_record(settings, machine, model, prefill_res, decode_res, kv_rows, scorers, targets, elapsed) -> dict:
    """The JSON record of one run (`machine` taken at the start; the load average at the end is added)."""
    machine = {**machine, "load_average_end": list(os.getloadavg())}
    gpu = settings.device.startswith("cuda")
    return {
        "kind": "gpu" if settings.device.startswith("cuda") else "cpu",
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine, "git": {"commit": git_commit()}, "settings": asdict(settings),
        "model": {"name": settings.model, **model_shape(model), "dtype": str(model.dtype)},
        "method_params": {name: paper_method(name, settings.prefill_budget).params()
                          for name in bench_methods(settings, GPU_NOT_BENCHED if gpu else None)},
        **({"not_benched": GPU_NOT_BENCHED} if gpu else {}),
        "notes": NOTES, "elapsed_s": round(elapsed, 1),
        "prefill": prefill_res, "decode": decode_res, "kv_bytes": kv_rows, "scorers": scorers, "targets": targets,
    }


NOTES = {
    "ratios": "median over repeats of the paired ratio method/FullKV within a repeat; methods interleaved, "
              "order rotated each repeat, after a warm-up FullKV prefill at each length",
    "peak_memory": "CPU: process RSS sampled every 2 ms by a thread during prefill, after gc and glibc "
                   "malloc_trim (peak_bytes: absolute; peak_delta_bytes: above the RSS before the prefill). "
                   "GPU: torch.cuda.max_memory_allocated",
    "decode": "FullKV decodes with transformers' DynamicLayer.update, which torch.cat-copies the whole cache every "
              "token (what HF does); compressed caches are StreamingLLM selections cut from the FullKV cache "
              "(every uniform-budget method has the same cache shape, so the same decode cost)",
    "kv_bytes_formula": "2 x tokens x head_dim x element size, tokens summed over layers and stored heads from "
                        "each method's expected_kv_tokens (stored heads = query heads for per_query_head, KV heads "
                        "for per_kv_head and uncompressed layers; head-adaptive methods: the per-head counts they "
                        "recorded); a row matches when measured = formula = bytes of the kept positions",
    "layer_adaptive": "CAKE and KVzip decide each layer's count from the prompt (CAKE's cascade, KVzip's global "
                      "ranking): their formula reads the counts they recorded for that prefill (CAKE's sum to at most "
                      "(budget - window) x layers, KVzip's to exactly that before the per-head floor). KVzip's "
                      "prefill time includes its reconstruction passes (the context fed again, in chunks). Decode "
                      "cost depends only on the cache's shape: budget_<b> stands for every uniform method",
    "adaptive": "Ada-SnapKV caches are ragged (kvbench.ragged): each head holds its own count, bytes = kept tokens; "
                "padded_bytes is what padding every head to the layer's longest would hold. Decode ms/token of "
                "adakv_<b> vs snapkv_<b> come from real prefills at the decode length, interleaved",
}


LLAMA3_8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=40960, rope_theta=500000.0)


def build_llama8b_shaped(device: str = "cuda", **shape_overrides):
    """Llama-3-8B's shape with random bf16 weights, built directly on the GPU (speed does not depend on weights).
    `shape_overrides` shrink it for a smoke test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B_SHAPE, **shape_overrides})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config.vocab_size


def run_gpu(settings: Settings, **shape_overrides) -> dict:
    """Prefill and decode on the Llama-3-8B-shaped model with each attention implementation available."""
    from kvbench.attention import register

    machine = machine_info(settings.device)
    started = time.perf_counter()
    model, vocab = build_llama8b_shaped(settings.device, **shape_overrides)
    prefill_res, decode_res = {}, {}
    for impl in settings.attn_implementations:
        model.set_attn_implementation(register(impl))
        prefill_res[impl] = bench_prefill(model, settings, vocab, exclude=GPU_NOT_BENCHED)
        decode_res[impl] = bench_decode(model, settings, vocab)
        for length, row in prefill_res[impl].items():
            full_s = row["fullkv"]["median_s"]
            row["fullkv"]["tokens_per_s"] = int(length) / full_s
    first = settings.attn_implementations[0]
    targets = evaluate_targets(prefill_res[first], decode_res[first], [], gpu=True)
    return build_record(settings, machine, model, prefill_res, decode_res, [], {}, targets,
                        time.perf_counter() - started)


def gpu_attention_implementations() -> list[str]:
    import importlib.util

    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2k tokens, 1 repeat")
    parser.add_argument("--gpu", action="store_true", help="Llama-3-8B-shaped random bf16 model on the GPU")
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default 3; quick 1)")
    parser.add_argument("--lengths", type=int, nargs="+", help="prefill lengths in tokens")
    parser.add_argument("--decode-lengths", type=int, nargs="+", help="context lengths for decode timing")
    parser.add_argument("--model", default="smollm2_135m", help="model config name for the CPU run")
    parser.add_argument("--methods", nargs="+", help=f"only these methods (FullKV always runs): {' '.join(METHOD_ORDER)}")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench", help="folder for the JSON files")
    parser.add_argument("--skip-scorers", action="store_true", help="leave out the scorer throughput benchmark")
    parser.add_argument("--peer-python", help=f"python of an environment with kvpress: its presses are timed beside "
                                              f"kvbench's (default: ${peer.PEER_ENV}; unset: no peer column)")
    parser.add_argument("--peer-lengths", type=int, nargs="+", help="prompt lengths of the peer table "
                                                                     "(default: the prefill lengths)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {"model": args.model}
    if args.gpu:
        overrides.update(device="cuda", model="llama3_8b_shaped_random", prefill_lengths=[8192, 32768],
                         decode_lengths=[8192, 32768], attn_implementations=gpu_attention_implementations())
    if args.repeats is not None:
        if args.repeats < 1:
            raise KvbenchError(f"--repeats {args.repeats}: use at least 1 (3 or more for ratios worth reporting)")
        overrides["repeats"] = args.repeats
    if args.lengths:
        overrides["prefill_lengths"] = args.lengths
    if args.decode_lengths:
        overrides["decode_lengths"] = args.decode_lengths
    if args.methods:
        overrides["methods"] = args.methods
    if args.peer_python:
        overrides["peer_python"] = args.peer_python
    if args.peer_lengths:
        short = [n for n in args.peer_lengths if n <= Settings.prefill_budget]
        if short:
            raise KvbenchError(f"--peer-lengths {short[0]}: a prompt must be longer than the budget "
                               f"({Settings.prefill_budget} tokens) for a press to compress it")
        overrides["peer_lengths"] = args.peer_lengths
    return Settings.quick(**overrides) if args.quick else Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.gpu and not torch.cuda.is_available():
            print("--gpu: no CUDA GPU is visible (torch.cuda.is_available() is False); skipping the GPU benchmarks. "
                  "Run it on a machine with a GPU and a CUDA build of torch.")
            return 0
        record = run_gpu(settings) if args.gpu else run_cpu(settings, args.skip_scorers)
    except KvbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = save_results(record, args.out, record["kind"])
    print(summary_table(record))
    print(f"wrote {path} and {args.out / ('latest_' + record['kind'] + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
