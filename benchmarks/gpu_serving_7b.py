"""The serving layer without Ray on one GPU: a 7B-shaped LLaMA (random weights, bf16) behind the replica's
scheduler, with the KV budget checked against the real device, continuous batching, ``n`` choices with
log-probs and ``echo`` prompt scoring on the GPU.

    python benchmarks/gpu_serving_7b.py --out gpu_serving.json            # H100/H200, bf16, ~3 minutes
    python benchmarks/gpu_serving_7b.py --tiny --device cpu --out x.json  # smoke test of the script itself

Ray is not installed on the lent GPU machine, so this drives what a Serve replica runs per request
(``BatchScheduler`` + ``choices`` + ``engine/scoring.py``) directly; the HTTP layer is covered by the CPU
integration tests. Reports: the KV budget check (bytes per position, the largest budget that fits), tokens/s of
16 concurrent requests with and without a budget that admits only 4 of them at a time, peak GPU memory, and the
time of a 1024-token echo prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from gpu_engine_7b import SEVEN_B, TINY, build  # the same random models (benchmarks/ is on sys.path when run)
from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.scoring import score_prompt
from layerexit.errors import ConfigError
from layerexit.serving.choices import collect, generate_choice, plan_choices
from layerexit.serving.kv_budget import check_kv_budget, device_memory_bytes, kv_bytes_per_token
from layerexit.serving.protocol import ExitStatsAccumulator
from layerexit.serving.scheduler import BatchScheduler


class _Tok:
    """Enough of a tokenizer for the text assembler: ids -> a space-separated string."""

    def decode(self, ids, skip_special_tokens=True):  # noqa: ARG002 - the tokenizer signature
        return " ".join(str(int(i)) for i in ids) + (" " if ids else "")


def run_load(engine, budget: int | None, prompts: list[list[int]], new: int, config: ExitConfig) -> dict:
    sched = BatchScheduler(engine, max_batch_size=16, batch_wait_timeout_s=0.05, max_concurrent_batches=2,
                           kv_budget_tokens=budget).start()
    tok = _Tok()
    try:
        async def main():
            plans = plan_choices([(p, "") for p in prompts], 1, SamplingParams(max_new_tokens=new, temperature=0.0))
            stats = [ExitStatsAccumulator(config, engine.L) for _ in plans]
            gens = [generate_choice(sched, tok, p, config, s, [], 600, time.perf_counter())
                    for p, s in zip(plans, stats)]
            return await collect(gens)

        t0 = time.perf_counter()
        outcomes = asyncio.run(main())
        seconds = time.perf_counter() - t0
    finally:
        sched.stop()
    tokens = sum(o.completion_tokens for o in outcomes)
    return {"budget": budget, "requests": len(prompts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "kv_waits": sched.kv_waits, "batches": sched.batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="gpu_serving.json")
    args = ap.parse_args()
    shape = TINY if args.tiny else SEVEN_B
    dtype = torch.bfloat16
    out: dict = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "shape": "tiny" if args.tiny else "7b", "dtype": "bfloat16"}
    model = build(shape, args.device, dtype)
    engine = EarlyExitEngine(model, set(), 0)
    per_token = kv_bytes_per_token(model.config, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    device_bytes = device_memory_bytes(args.device)
    fits = (device_bytes - weights) // per_token
    check_kv_budget(int(fits), per_token, weights, device_bytes)
    try:
        check_kv_budget(int(fits) + 1, per_token, weights, device_bytes)
        out["kv_check_rejects_too_large"] = False
    except ConfigError as err:
        out["kv_check_rejects_too_large"] = True
        out["kv_check_message"] = str(err)
    out.update(kv_bytes_per_token=per_token, weights_gib=round(weights / 2**30, 2),
               device_gib=round(device_bytes / 2**30, 1), largest_budget_tokens=int(fits))

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, shape["vocab_size"], (int(n),), generator=g).tolist()
               for n in torch.randint(32, 128, (16,), generator=g)]
    config = ExitConfig(policy="final")
    run_load(engine, None, prompts[:2], 4, config)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out["no_budget"] = run_load(engine, None, prompts, args.new, config)
    four_rows = 4 * (max(len(p) for p in prompts) + args.new)
    out["budget_4_rows"] = run_load(engine, four_rows, prompts, args.new, config)
    if args.device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # n = 3 sampled choices with log-probs (top 5), then a 1024-token echo prefill
    sched = BatchScheduler(engine, max_batch_size=8, batch_wait_timeout_s=0.05).start()
    try:
        async def choices():
            plans = plan_choices([(prompts[0], "")], 3, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3,
                                                                       logprobs=5))
            stats = [ExitStatsAccumulator(ExitConfig(policy="fixed", layer=shape["num_hidden_layers"] // 2), engine.L)
                     for _ in plans]
            gens = [generate_choice(sched, _Tok(), p, ExitConfig(policy="fixed", layer=shape["num_hidden_layers"] // 2),
                                    s, [], 600, time.perf_counter()) for p, s in zip(plans, stats)]
            return await collect(gens)

        outcomes = asyncio.run(choices())
    finally:
        sched.stop()
    out["n3_distinct_samples"] = len({tuple(o.scores.ids) for o in outcomes})
    out["n3_logprobs_filled"] = all(lp is not None and lp <= 0 for o in outcomes for lp in o.scores.logprobs)
    long_prompt = torch.randint(5, shape["vocab_size"], (1024,), generator=g).tolist()
    score_prompt(model, long_prompt[:64], top_k=1)  # warm-up
    t0 = time.perf_counter()
    scores = score_prompt(model, long_prompt, top_k=1)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    out["echo_prefill_1024_s"] = round(time.perf_counter() - t0, 4)
    out["echo_scores"] = len(scores.logprobs)
    print(json.dumps(out, indent=2))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
