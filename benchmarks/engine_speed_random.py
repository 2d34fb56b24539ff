"""Decode speed of the engine's `final` vs transformers `generate` vs the memory-bandwidth floor (weight bytes per
token over this machine's measured read bandwidth; the eager `F.linear` weights loop beside it), on a SmolLM2-shaped
model with random weights (speed depends on shapes and dtype, not on the weights), interleaved in one process.

Run:  .venv/bin/python benchmarks/engine_speed_random.py --config-dir ~/.cache/layerexit/models/smollm2-135m-instruct \
          --dtype bfloat16 --threads 1 --tokens 64 --prompts 4 [--device cuda]

Needs only the model's config.json, so it runs where the checkpoint is not (a quiet machine, a GPU box). Random
weights decode greedy garbage of full length (no EOS is set), which is what a speed measurement wants. Prints one
JSON object: tokens/s of each path and the ratios the engine targets use (x generate, share of the floor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerexit.engine.bench import LOOP, FLOOR, BandwidthProbe, weight_bytes_per_token, weights_loop_tokens_per_s
    from layerexit.machine import describe_machine
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams
    from layerexit.engine.reference import hf_greedy_generate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(args.config_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, cfg.vocab_size - 10, (24 + 6 * i,), generator=g).tolist() for i in range(args.prompts)]
    fused = EarlyExitEngine(model, set(), 0, fused=True)
    stock = EarlyExitEngine(model, set(), 0, fused=False)
    sp = SamplingParams(max_new_tokens=args.tokens)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    paths = {
        "hf-generate": lambda p: hf_greedy_generate(model, [p], args.tokens, 0, set()),
        "final (fused)": lambda p: fused.generate([p], ExitConfig(), sp),
        "final (stock layers)": lambda p: stock.generate([p], ExitConfig(), sp),
    }
    for f in paths.values():  # warm-up
        f(prompts[0][:8])
    seconds = {k: 0.0 for k in paths}
    loops = []
    probe = BandwidthProbe(device=args.device)
    for _ in range(args.rounds):
        for p in prompts:
            for name, f in paths.items():
                sync()
                t0 = time.perf_counter()
                f(p)
                sync()
                seconds[name] += time.perf_counter() - t0
        loops.append(weights_loop_tokens_per_s(model, 20))
        probe.measure()
    n = args.rounds * len(prompts) * args.tokens
    tps = {k: n / v for k, v in seconds.items()}
    loop = sum(loops) / len(loops)
    floor = probe.best * 1e9 / weight_bytes_per_token(model)  # weight bytes per token over measured bandwidth
    out = {"dtype": args.dtype, "threads": args.threads, "device": args.device, "tokens": n,
           "machine": describe_machine(), "bandwidth_gbs": round(probe.best, 2),
           "tokens_per_s": {**{k: round(v, 2) for k, v in tps.items()}, LOOP: round(loop, 2), FLOOR: round(floor, 2)},
           "x_generate": {k: round(v / tps["hf-generate"], 3) for k, v in tps.items()},
           "share_of_floor": {k: round(v / floor, 3) for k, v in tps.items()}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
