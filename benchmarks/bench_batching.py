#!/usr/bin/env python
"""Batched evaluation throughput (`batch_size`, kvbench.batching): samples per second and peak memory at batch 1, 2,
4 and 8 for FullKV, SnapKV-128 and Ada-SnapKV-128 on SmolLM2, through `scheduler.generate_requests`.

    python benchmarks/bench_batching.py            # decode-heavy + prefill-heavy, 8 samples each
    python benchmarks/bench_batching.py --quick    # smoke run: 4 samples, short prompts
    python benchmarks/bench_batching.py --gpu      # Llama-3-8B-shaped random bf16 model at 8k, batch 1 vs 16

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

`--gpu` (the issue's GPU goal: SnapKV-128 at batch 16 at least 8x batch 1's samples/s): the bench's
Llama-3-8B-shaped model with random bf16 weights, `--samples` (16) random-token prompts of `--gpu-length` (8192)
tokens decoding `--gpu-new-tokens` (256) tokens each (no stop token: a random model's EOS is noise), one repeat.
It also runs the FlashAttention varlen path of the ragged cache (Ada-SnapKV-128) against its PyTorch path on every
layer, where flash-attn is installed. -> `batching_gpu_<timestamp>.json`, `latest_batching_gpu.json`.
`--gpu-smoke` runs the same code on CPU with a tiny shape (the tests).
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
from kvbench.memory import PeakMemory  # noqa: E402
from kvbench.methods import build_method  # noqa: E402
from kvbench.pipeline import git_commit  # noqa: E402
from kvbench.requests import Request  # noqa: E402

METHODS = {"fullkv": {}, "snapkv_128": {"budget": 128}, "adakv_128": {"budget": 128}}
BATCH_SIZES = (1, 2, 4, 8)
GOAL = {"workload": "multi_news", "batch_size": 8, "speedup_min": 1.5}
GPU_GOAL = {"workload": "random", "method": "snapkv_128", "batch_size": 16, "speedup_min": 8.0}
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=1000, max_position_embeddings=4096)


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


def random_requests(vocab: int, n: int, length: int, new_tokens: int, seed: int = 0) -> list[Request]:
    generator = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(0, vocab, (length,), generator=generator).tolist(), new_tokens, (),
                    key=f"random{length}/{i}") for i in range(n)]


def run_one(model, requests, label: str, batch_size: int) -> dict:
    method = method_of(label)
    device = str(next(model.parameters()).device)
    report = {}
    with PeakMemory(device, interval_s=0.02) as memory:  # its `before`: RSS (CPU) or allocated bytes (GPU) at entry
        start = time.perf_counter()
        outs = list(generate_requests(model, requests, method, batch_size=batch_size, report=report))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "samples": len(outs), "samples_per_s": len(outs) / wall,
            "packed_prefills": report.get("packed_prefills", 0),
            "new_tokens": sum(len(o.token_ids) for _, o in outs),
            "prefill_s": sum(o.prefill_s for _, o in outs), "peak_rss_bytes": int(memory.peak),
            "peak_rise_bytes": int(memory.peak - memory.before),
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
                        "packed_prefills": runs[bs][0]["packed_prefills"],
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


def varlen_check(model, vocab: int, length: int) -> dict:
    """The ragged cache's FlashAttention varlen path against its PyTorch path: Ada-SnapKV-128 compresses one random
    prompt of `length` tokens, then a decoding query attends every ragged layer both ways."""
    from kvbench.engine import prefill
    from kvbench.ragged import _HAS_FLASH, RaggedLayer, ragged_attention

    device = next(model.parameters()).device
    if not (_HAS_FLASH and device.type == "cuda"):
        return {"ran": False, "why": "flash-attn is not installed" if device.type == "cuda" else "no GPU"}
    prompt = random_requests(vocab, 1, length, 1, seed=1)[0]
    state = prefill(model, torch.tensor([prompt.input_ids], device=device), method_of("adakv_128"))
    layers = [layer for layer in state.cache.layers if isinstance(layer, RaggedLayer)]
    heads = model.config.num_attention_heads
    generator = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    for layer in layers:
        layer.update(*(torch.randn(1, layer.tail_keys.shape[1], 1, layer.prefix_keys.shape[-1], device=device,
                                   dtype=layer.prefix_keys.dtype, generator=generator) for _ in range(2)))
        query = torch.randn(1, heads, 1, layer.prefix_keys.shape[-1], device=device, dtype=layer.prefix_keys.dtype,
                            generator=generator)
        args = (layer.prefix_keys, layer.prefix_values)
        rest = (layer.cu_seqlens, layer.max_length, layer.tail_keys, layer.tail_values)
        flash = ragged_attention(query, *args, None, *rest).float()
        torch_path = ragged_attention(query, *args, layer.foreign(), *rest).float()
        worst = max(worst, (flash - torch_path).abs().max().item())
    return {"ran": True, "layers": len(layers), "prompt_tokens": length, "max_abs_diff": worst,
            "agree": worst < 2e-2}  # bf16 outputs: a few units in the last place of values of order 1


def main_gpu(args) -> int:
    from bench import build_llama8b_shaped

    smoke = args.gpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        print("--gpu needs a CUDA device; --gpu-smoke runs the same code on CPU with a tiny model")
        return 2
    torch.manual_seed(0)
    model, vocab = build_llama8b_shaped(device, **(SMOKE_SHAPE if smoke else {}))
    if smoke:
        model = model.float()
    from kvbench.attention import register

    model.set_attn_implementation(register("sdpa"))
    log = lambda text: print(text, flush=True)  # noqa: E731
    length, new = (300, 8) if smoke else (args.gpu_length, args.gpu_new_tokens)
    samples = 4 if smoke else args.samples
    batch_sizes = [1, samples] if smoke else args.batch_sizes
    requests = random_requests(vocab, samples, length, new)
    started = time.perf_counter()
    with torch.inference_mode():
        list(generate_requests(model, [Request(requests[0].input_ids[:256], 4, key="warm")], method_of("fullkv")))
        results = {"random": bench_workload(model, "random", requests, args.methods, batch_sizes, 1, log)}
        varlen = varlen_check(model, vocab, length)
    record = {"what": "batched evaluation throughput on a GPU (engine.generate_requests batch_size)",
              "model": "llama3_8b_shaped_random" + ("_smoke" if smoke else ""), "device": device,
              "batch_sizes": batch_sizes, "machine": machine_info(device), "git_commit": git_commit(),
              "settings": {"samples": samples, "prompt_tokens": length, "max_new_tokens": new, "stop": "none",
                           "methods": args.methods, "dtype": str(next(model.parameters()).dtype)},
              "elapsed_s": round(time.perf_counter() - started, 1), "workloads": results, "varlen": varlen}
    rows = results["random"]["methods"].get(GPU_GOAL["method"])
    if rows and GPU_GOAL["batch_size"] in batch_sizes:
        got = {r["batch_size"]: r["speedup"] for r in rows}[GPU_GOAL["batch_size"]]
        record["goal"] = {**GPU_GOAL, "speedup": got, "met": got >= GPU_GOAL["speedup_min"]}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "gpu_smoke" if smoke else "gpu"
    write_json_atomic(args.out / f"batching_{kind}_{stamp}.json", record)
    write_json_atomic(args.out / f"latest_batching_{kind}.json", record)
    print(table(record))
    print(json.dumps({"goal": record.get("goal", {}), "varlen": varlen}))
    return 0


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
    parser.add_argument("--gpu", action="store_true", help="Llama-3-8B-shaped random bf16 model on the GPU")
    parser.add_argument("--gpu-smoke", action="store_true", help="the --gpu code on CPU with a tiny shape")
    parser.add_argument("--gpu-length", type=int, default=8192)
    parser.add_argument("--gpu-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if args.gpu or args.gpu_smoke:
        if args.samples == 8:
            args.samples = 16
        if args.batch_sizes == list(BATCH_SIZES):
            args.batch_sizes = [1, 16]
        if args.methods == list(METHODS):
            args.methods = ["snapkv_128"]
        return main_gpu(args)
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
