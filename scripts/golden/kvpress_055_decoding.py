"""Golden cases of kvpress 0.5.5's DecodingPress (decoding-time compression), run unmodified.

Run with kvpress's own environment (kvpress 0.5.5, transformers 5.2.0, CPU torch):

    /work/kvpress-venv/bin/python scripts/golden/kvpress_055_decoding.py tests/golden/decoding

1. Builds a tiny seeded random Llama from a config and saves it (`<out>/tiny_llama/`, save_pretrained), so kvbench's
   test loads the very same weights.
2. For each case: `with DecodingPress(base_press, compression_interval, target_size, buffer)(model):` one prefill
   forward of a fixed random prompt (a DecodingPress does not compress the prefill), then one forward per forced
   token (a fixed random sequence) at its true position (`position_ids` = prompt length + step, as
   `KVPressTextGenerationPipeline.generate_answer` passes them).
3. Records, after every forward where the press cut the cache, the absolute position of every row each layer holds
   per KV head, in row order. Positions are recovered without touching kvpress: a forward pre-hook snapshots the
   layer's keys (rows with known positions) and a forward hook registered after kvpress's own matches the rows
   left after the cut to them (exact equality; the one unmatched row is the step's new token).
See tests/golden/decoding/FORMAT.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from importlib.metadata import version
from kvpress import DecodingPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress

PROMPT, STEPS, SEED = 36, 48, 0
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
              tie_word_embeddings=False)
CASES = [  # name, press, kvbench method and settings
    ("knorm", lambda: KnormPress(), {"method": "knorm"}),
    ("tova", lambda: TOVAPress(), {"method": "tova", "window_size": 1}),
    ("streamingllm", lambda: StreamingLLMPress(n_sink=4), {"method": "streamingllm", "sinks": 4, "cache_heads": "per_kv_head"}),
    ("snapkv", lambda: SnapKVPress(window_size=4, kernel_size=3),
     {"method": "snapkv", "window_size": 4, "kernel_size": 3, "pooling": "avgpool", "cache_heads": "per_kv_head",
      "decode_style": "kvpress"}),
]
SCHEDULES = [(8, 40), (5, 44)]  # (compression_interval, target_size)


def build_model(out: Path) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa")).eval()
    model.save_pretrained(out / "tiny_llama")
    return LlamaForCausalLM.from_pretrained(out / "tiny_llama", attn_implementation="sdpa").eval()


def run_case(model, press_factory, interval: int, target: int, prompt: torch.Tensor, forced: torch.Tensor):
    press = DecodingPress(base_press=press_factory(), compression_interval=interval, target_size=target,
                          hidden_states_buffer_size=interval)
    layers = model.model.layers
    known: dict[int, list] = {}  # layer -> per KV head list of (row tensor, position), the rows held before a forward
    state = {"position": 0, "cut": False, "kept": {}}

    def rows_of(cache, i):
        return cache.layers[i].keys[0]

    def pre_hook(module, args, kwargs):
        cache = kwargs["past_key_values"]
        i = module.layer_idx
        if len(cache.layers) > i and cache.layers[i].is_initialized and cache.layers[i].keys.numel():
            keys = rows_of(cache, i)
            known[i] = (keys.clone(), known[i][1])
        else:
            known[i] = (None, [[] for _ in range(CONFIG["num_key_value_heads"])])

    def post_hook(module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        i = module.layer_idx
        before, before_pos = known[i]
        keys = rows_of(cache, i)
        q_len = kwargs["hidden_states"].shape[1]
        first = state["position"]
        positions = []
        for h in range(keys.shape[0]):
            mine = []
            for row in keys[h]:
                match = None
                if before is not None:
                    equal = (before[h] == row).all(-1).nonzero()
                    if len(equal):
                        match = before_pos[h][int(equal[0])]
                if match is None:  # a row of this forward: its position from its index among the new rows
                    match = -1
                mine.append(match)
            positions.append(mine)
        for mine in positions:  # the rows no earlier row matched are this forward's tokens, in order
            new = [j for j, p in enumerate(mine) if p == -1]
            if len(new) > q_len:
                raise RuntimeError("more unmatched rows than new tokens")
            for k, j in enumerate(new):
                mine[j] = first + k if len(new) == q_len else first + q_len - 1
        held_before = 0 if before is None else before.shape[1]
        if keys.shape[1] < held_before + q_len:
            state["cut"] = True
            state["kept"][i] = positions
        known[i] = (keys.clone(), positions)

    cache = DynamicCache()
    cuts = []
    with press(model), torch.no_grad():
        handles = []
        for layer in layers:
            handles.append(layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(post_hook, with_kwargs=True))
        try:
            state["position"] = 0
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            for step, token in enumerate(forced.tolist()):
                position = PROMPT + step
                state.update(position=position, cut=False, kept={})
                model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                      past_key_values=cache, use_cache=True)
                if state["cut"]:
                    cuts.append({"step": step + 1, "position": position,
                                 "kept_positions": [state["kept"][i] for i in range(len(layers))]})
        finally:
            for handle in handles:
                handle.remove()
    return cuts


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(out)
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, CONFIG["vocab_size"], (1, PROMPT), generator=gen)
    forced = torch.randint(0, CONFIG["vocab_size"], (STEPS,), generator=gen)
    for name, factory, kvbench in CASES:
        for interval, target in SCHEDULES:
            cuts = run_case(model, factory, interval, target, prompt, forced)
            case = {"source": f"kvpress {version('kvpress')} DecodingPress({type(factory()).__name__})",
                    "torch": torch.__version__, "model": "tiny_llama", "prompt": prompt[0].tolist(),
                    "forced_tokens": forced.tolist(), "compression_interval": interval, "target_size": target,
                    "hidden_states_buffer_size": interval, "press": repr(factory()), "kvbench": kvbench,
                    "cuts": cuts}
            path = out / f"{name}_i{interval}_t{target}.json"
            path.write_text(json.dumps(case) + "\n")
            print(path, len(cuts), "cuts")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/decoding"))
