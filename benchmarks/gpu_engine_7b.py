"""Decode throughput of the early-exit engine on a 7B-shaped LLaMA with random weights, on one GPU.

    python benchmarks/gpu_engine_7b.py --out gpu_engine.json            # H100/H200, bf16, ~3 minutes
    python benchmarks/gpu_engine_7b.py --tiny --device cpu --out x.json  # smoke test of the script itself

Random weights are enough for timing: every configuration runs the same layers and heads whatever the tokens are
(self-speculative acceptance is not meaningful on random weights and is reported, not interpreted). Rows are
ratios against transformers' cached greedy ``generate`` measured in the same process, at batch 1 and 8.
The same engine is what a Serve replica runs per batch (Ray itself is not installed on the lent GPU machine).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.options import ExitConfig, SamplingParams

SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=8, vocab_size=512, max_position_embeddings=2048)


def build(shape: dict, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_hf(model, prompts: torch.Tensor, new: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(device)
    return time.perf_counter() - t0


def time_engine(engine: EarlyExitEngine, prompts: list[list[int]], cfg: ExitConfig, new: int, device: str):
    sync(device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, cfg, SamplingParams(max_new_tokens=new))
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    flops = sum(r.flops for r in results) / max(1, tokens)
    full = sum(r.flops_full for r in results) / max(1, tokens)
    return seconds, tokens, flops / max(1.0, full)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default="gpu_engine.json")
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    shape = TINY if args.tiny else SEVEN_B
    t0 = time.perf_counter()
    model = build(shape, args.device, dtype)
    report: dict = {"shape": shape, "dtype": str(dtype), "build_s": time.perf_counter() - t0, "rows": []}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
        report["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    engine = EarlyExitEngine(model, eos_token_ids={-1}, pad_token_id=0)
    # Compilation is a property of the engine, not of an exit configuration (ExitConfig forbids unknown keys): the
    # compiled row runs on a second engine over the same weights, whose single-column decode steps go through
    # torch.compile'd segments (CUDA graphs, mode reduce-overhead, on a GPU; inductor on a CPU).
    compiled = EarlyExitEngine(model, eos_token_ids={-1}, pad_token_id=0, compile=True)
    L = shape["num_hidden_layers"]
    configs = {  # name -> (early_exit object, engine)
        "final": ({"policy": "final"}, engine),
        f"fixed-{L // 2}": ({"policy": "fixed", "layer": L // 2}, engine),
        f"self-speculative-l{L // 4}": ({"policy": "self-speculative", "layer": L // 4, "num_draft": 4}, engine),
        "compiled-final": ({"policy": "final"}, compiled),
    }
    g = torch.Generator().manual_seed(1)
    for batch in args.batches:
        ids = torch.randint(3, shape["vocab_size"], (batch, args.prompt_len), generator=g)
        prompts = [row.tolist() for row in ids]
        ids = ids.to(args.device)
        time_hf(model, ids, 4, args.device)  # warm-up (kernels, allocator)
        hf_s = time_hf(model, ids, args.new_tokens, args.device)
        hf_tps = batch * args.new_tokens / hf_s
        report["rows"].append({"name": "hf-generate", "batch": batch, "tokens_per_s": hf_tps, "speedup": 1.0})
        for name, (spec, eng) in configs.items():
            row = {"name": name, "batch": batch}
            try:
                cfg = ExitConfig(**spec)
                time_engine(eng, prompts, cfg, 4, args.device)  # warm-up / compile
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                s, tokens, flops_ratio = time_engine(eng, prompts, cfg, args.new_tokens, args.device)
                row.update(tokens_per_s=tokens / s, speedup=tokens / s / hf_tps, flops_ratio=flops_ratio)
                if eng.compiled is not None:
                    row["compile_seconds"] = eng.compiled.compile_seconds
                    row["compiled_off"] = eng.compiled.failed  # None: the compiled path ran
                if args.device.startswith("cuda"):
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as exc:  # a row that cannot run is reported, the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                traceback.print_exc()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
