#!/usr/bin/env python
"""Batched evaluation throughput (`batch_size`, kvbench.batching): samples per second and peak memory at batch 1, 2,
4 and 8 for FullKV, SnapKV-128 and Ada-SnapKV-128 on SmolLM2, through `scheduler.generate_requests`.

    python benchmarks/bench_batching.py            # decode-heavy + prefill-heavy, 8 samples each
    python benchmarks/bench_batching.py --quick    # smoke run: 4 samples, short prompts

Workloads:
- decode-heavy: LongBench multi_news (the real task file under shared/data/longbench, the dynamickv protocol's
  prompt, middle-truncated to --prompt-tokens), max_new_tokens capped at 128, stopping on the EOS;
- prefill-heavy: RULER niah_single_1 generated at 1k and 2k tokens (RULER's own max_new_tokens, EOS stop).
Every (method, batch size) runs the same requests in one process, `--repeats` times in an order rotated per repeat;
the speedup is the median of the per-repeat paired ratios to batch 1 (the table's point); absolute samples/s move
with the machine's load. Peak memory is the process
RSS sampled every 20 ms during the run (model weights included) and its rise over the RSS before the run. Each
batched run's predictions are compared with batch 1's (identical token ids, per sample).

Writes `results/bench/batching_cpu_<timestamp>.json` and `results/bench/latest_batching_cpu.json`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import load_bench_model, machine_info  # noqa: E402

from kvbench.atomic import write_json_atomic  # noqa: E402
from kvbench.scheduler import generate_requests  # noqa: E402
from kvbench.memory import PeakMemory, release_free_memory, rss_bytes  # noqa: E402
from kvbench.methods import build_method  # noqa: E402
from kvbench.pipeline import git_commit  # noqa: E402
from kvbench.requests import Request  # noqa: E402

METHODS = {"fullkv": {}, "snapkv_128": {"budget": 128}, "adakv_128": {"budget": 128}}
BATCH_SIZES = (1, 2, 4, 8)
GOAL = {"workload": "multi_news", "batch_size": 8, "speedup_min": 1.5}


def method_of(label: str):
    name = label.split("_")[0]
    return build_method(name, **METHODS[label])


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    from kvbench.ruler.runner import stop_token_ids

    return tuple(stop_token_ids(model, tokenizer))


def multi_news_requests(tokenizer, stops, n: int, prompt_tokens: int, new_tokens: int) -> list[Request]:
    from omegaconf import OmegaConf

    from kvbench.config import compose
    from kvbench.longbench.data import read_jsonl
    from kvbench.longbench.protocol import Protocol, build_prompt

    path = next(p for p in (REPO.parent / "shared" / "data" / "longbench" / "multi_news.jsonl",
                            Path("/work/shared/data/longbench/multi_news.jsonl")) if p.exists())
    protocol_cfg = OmegaConf.to_container(compose(["protocol=dynamickv"]).protocol, resolve=True)
    protocol_cfg.pop("methods"), protocol_cfg.pop("per_model", None)
    protocol = Protocol.from_dict(protocol_cfg)
    rows = read_jsonl(path, limit=n)
    return [Request(build_prompt("multi_news", row, tokenizer, protocol, prompt_tokens).input_ids, new_tokens,
                    stops, key=f"multi_news/{i}") for i, row in enumerate(rows)]


def ruler_requests(tokenizer, stops, n: int, length: int) -> list[Request]:
    from kvbench.ruler.data import Generator, render
    from kvbench.ruler.template import model_template

    template = model_template(tokenizer, "auto")
    samples = Generator(tokenizer, template, 42).samples("niah_single_1", length, n, None)
    return [Request(render(s, tokenizer, template).input_ids, int(s["max_new_tokens"]), stops,
                    key=f"ruler{length}/{i}") for i, s in enumerate(samples)]


def run_one(model, requests, label: str, batch_size: int) -> dict:
    method = method_of(label)
    release_free_memory()
    before = rss_bytes()
    with PeakMemory("cpu", interval_s=0.02) as memory:
        start = time.perf_counter()
        outs = list(generate_requests(model, requests, method, batch_size=batch_size))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "samples": len(outs), "samples_per_s": len(outs) / wall,
            "new_tokens": sum(len(o.token_ids) for _, o in outs),
            "prefill_s": sum(o.prefill_s for _, o in outs), "peak_rss_bytes": int(memory.peak),
            "peak_rise_bytes": int(memory.peak - before),
            "tokens": {r.key: o.token_ids for r, o in outs}}


def bench_workload(model, name: str, requests: list[Request], labels, batch_sizes, repeats: int, log) -> dict:
    """Every (method, batch size) `repeats` times, batch sizes in an order rotated per repeat and method; the speedup
    is the median over repeats of the paired ratio samples/s(batch) / samples/s(batch 1) of the same repeat."""
    rows = {}
    for i, label in enumerate(labels):
        runs: dict[int, list[dict]] = {bs: [] for bs in batch_sizes}
        for r in range(repeats):
            shift = (i + r) % len(batch_sizes)
            for bs in list(batch_sizes[shift:]) + list(batch_sizes[:shift]):
                runs[bs].append(run_one(model, requests, label, bs))
                log(f"{name:>12} {label:>10} batch {bs} (repeat {r + 1}): {runs[bs][-1]['samples_per_s']:.3f} "
                    f"samples/s ({runs[bs][-1]['wall_s']:.1f} s)")
        base = runs[batch_sizes[0]]
        rows[label] = [{"batch_size": bs, "samples_per_s": round(statistics.median(x["samples_per_s"] for x in runs[bs]), 4),
                        "speedup": round(statistics.median(x["samples_per_s"] / b["samples_per_s"]
                                                           for x, b in zip(runs[bs], base)), 3),
                        "speedups": [round(x["samples_per_s"] / b["samples_per_s"], 3) for x, b in zip(runs[bs], base)],
                        "wall_s": [round(x["wall_s"], 2) for x in runs[bs]],
                        "prefill_s": [round(x["prefill_s"], 2) for x in runs[bs]],
                        "new_tokens": runs[bs][0]["new_tokens"],
                        "peak_rss_mib": round(max(x["peak_rss_bytes"] for x in runs[bs]) / 2 ** 20, 1),
                        "peak_rise_mib": round(max(x["peak_rise_bytes"] for x in runs[bs]) / 2 ** 20, 1),
                        "same_tokens_as_batch_1": min(sum(x["tokens"][k] == base[0]["tokens"][k] for k in x["tokens"])
                                                      for x in runs[bs]),
                        "samples": runs[bs][0]["samples"]} for bs in batch_sizes]
    lengths = [len(r.input_ids) for r in requests]
    return {"samples": len(requests), "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
            "prompt_tokens_max": max(lengths), "max_new_tokens": max(r.max_new_tokens for r in requests),
            "repeats": repeats, "methods": rows}


def table(record: dict) -> str:
    lines = ["| workload | method | " + " | ".join(f"batch {b}" for b in record["batch_sizes"]) + " |",
             "|---|---|" + "---|" * len(record["batch_sizes"])]
    for workload, res in record["workloads"].items():
        for label, rows in res["methods"].items():
            cells = [f"{r['samples_per_s']:.3f}/s ({r['speedup']:.2f}x, {r['peak_rss_mib']:.0f} MiB)" for r in rows]
            lines.append(f"| {workload} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 samples, 512-token prompts, RULER at 1k only")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="multi_news middle truncation")
    parser.add_argument("--ruler-lengths", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--workloads", nargs="+", default=["multi_news", "ruler"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.prompt_tokens, args.ruler_lengths, args.repeats = 4, 512, [1024], 1
    torch.set_num_threads(1)
    machine = machine_info("cpu")
    model, tokenizer = load_bench_model("smollm2_135m", "cpu")
    stops = eos_ids(model, tokenizer)
    log = lambda text: print(text, flush=True)  # noqa: E731
    workloads = {}
    if "multi_news" in args.workloads:
        workloads["multi_news"] = multi_news_requests(tokenizer, stops, args.samples, args.prompt_tokens, 128)
    if "ruler" in args.workloads:
        for length in args.ruler_lengths:
            workloads[f"ruler_{length}"] = ruler_requests(tokenizer, stops, args.samples, length)
    for name, reqs in workloads.items():
        log(f"{name}: {len(reqs)} samples, prompt tokens {[len(r.input_ids) for r in reqs]}")
    started = time.perf_counter()
    with torch.inference_mode():
        generate_requests(model, [], None)  # nothing: imports and registration done before timing
        warm = workloads[next(iter(workloads))][:1]
        list(generate_requests(model, [Request(warm[0].input_ids[:256], 4, key="warm")], method_of("fullkv")))
    results = {name: bench_workload(model, name, reqs, args.methods, args.batch_sizes, args.repeats, log)
               for name, reqs in workloads.items()}
    record = {"what": "batched evaluation throughput (engine.generate_requests batch_size)", "model": "smollm2_135m",
              "device": "cpu", "threads": 1, "batch_sizes": args.batch_sizes, "machine": machine,
              "load_average_end": list(os.getloadavg()), "git_commit": git_commit(),
              "settings": {"samples": args.samples, "repeats": args.repeats, "methods": args.methods, "multi_news_prompt_tokens": args.prompt_tokens,
                           "multi_news_max_new_tokens": 128, "ruler_task": "niah_single_1",
                           "ruler_lengths": args.ruler_lengths, "stop": "eos"},
              "elapsed_s": round(time.perf_counter() - started, 1), "workloads": results}
    if "multi_news" in results and GOAL["batch_size"] in args.batch_sizes:
        got = {label: {r["batch_size"]: r["speedup"] for r in rows}[GOAL["batch_size"]]
               for label, rows in results["multi_news"]["methods"].items()}
        record["goal"] = {**GOAL, "speedup": got, "met": all(v >= GOAL["speedup_min"] for v in got.values())}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"batching_cpu_{stamp}.json", record)
    write_json_atomic(args.out / "latest_batching_cpu.json", record)
    print(table(record))
    print(json.dumps(record.get("goal", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
