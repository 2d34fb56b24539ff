"""fp32 vs bf16 on this CPU: matmul GFLOP/s and batch-1 ``generate`` tokens/s, and what ``dtype: auto`` picks.

    .venv/bin/python benchmarks/cpu_dtype.py                      # SmolLM2, 2 threads, 4 prompts x 32 tokens
    .venv/bin/python benchmarks/cpu_dtype.py --json               # one JSON object

The matmul is one SmolLM2 MLP projection at a prefill/batch of 512 positions (512x576 @ 576x1536), in fp32, in bf16,
and as fp32 tensors under bf16 autocast (what the training configs used). ``generate`` is transformers' greedy
``generate`` with a KV cache, batch 1, on held-out prompts, the dtypes taking turns (best of 3 calls per prompt).
The figures are what ``layerexit.machine.choose_dtype`` encodes: bf16 is fast for everything on CPUs with native
bf16 (avx512_bf16 / AMX); without it compute-bound work (training, prefill, batched serving) wants fp32 while
batch-1 decoding still wants bf16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_gflops(dtype: torch.dtype | None, autocast: bool = False, m: int = 512, k: int = 576, n: int = 1536,
                  seconds: float = 1.0) -> float:
    """Best-of-5 GFLOP/s of an (m x k) @ (k x n) matmul; ``dtype`` None with ``autocast``: fp32 under bf16 autocast."""
    a = torch.randn(m, k, dtype=dtype or torch.float32)
    b = torch.randn(k, n, dtype=dtype or torch.float32)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    flops = 2 * m * k * n
    best = 0.0
    with torch.inference_mode(), ctx:
        a @ b  # warm-up (kernel selection, packing)
        t0 = time.perf_counter()
        a @ b
        one = max(time.perf_counter() - t0, 1e-6)
        reps = max(1, int(seconds / 5 / one))
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, reps * flops / (time.perf_counter() - t0) / 1e9)
    return best


def generate_tokens_per_s(model_spec: str, dtypes: list[str], prompts: int, tokens: int,
                          repeats: int = 3) -> dict[str, float]:
    """Batch-1 greedy ``generate`` tokens/s per dtype over ``prompts`` held-out prompts. The dtypes take turns
    prompt by prompt and each prompt's time is the best of ``repeats`` (a shared machine's load spikes hit one call,
    not a whole dtype); one warm-up call per dtype is not timed."""
    from layerexit.data.instructions import heldout_instructions, interleave_categories
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.reference import eos_ids, hf_greedy_generate
    from layerexit.models.loading import load_model_and_tokenizer

    models = {name: load_model_and_tokenizer(model_spec, dtype=getattr(torch, name)) for name in dtypes}
    tok = next(iter(models.values()))[1]
    eos = eos_ids(next(iter(models.values()))[0], tok)
    ids = [format_prompt(tok, item.text) for item in interleave_categories(heldout_instructions())[:prompts]]
    for model, _ in models.values():
        hf_greedy_generate(model, ids[:1], 4, tok.pad_token_id, eos)
    counts = {name: 0 for name in dtypes}
    seconds = {name: 0.0 for name in dtypes}
    for p in ids:
        for name, (model, _) in models.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = len(hf_greedy_generate(model, [p], tokens, tok.pad_token_id, eos)[0])
                best = min(best, time.perf_counter() - t0)
            counts[name] += n
            seconds[name] += best
    return {name: counts[name] / seconds[name] for name in dtypes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="calls per prompt and dtype (the best one counts)")
    ap.add_argument("--no-generate", action="store_true", help="only the matmuls")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from layerexit.machine import STAGES, choose_dtype, describe_machine, machine_line

    report: dict = {"machine": describe_machine(), "matmul": "512x576 @ 576x1536"}
    report["gflops"] = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16),
                        "bf16_autocast": matmul_gflops(None, autocast=True)}
    if not args.no_generate:
        report["generate_tokens_per_s"] = generate_tokens_per_s(args.model, ["float32", "bfloat16"], args.prompts,
                                                                args.tokens, args.repeats)
        report["generate"] = f"{args.model}, batch 1, {args.prompts} prompts x {args.tokens} tokens"
    report["auto"] = {s: choose_dtype(s, log=False).dtype for s in STAGES}
    if args.json:
        print(json.dumps(report))
        return
    print(machine_line(report["machine"]))
    g = report["gflops"]
    print(f"matmul {report['matmul']}: fp32 {g['float32']:.1f}, bf16 {g['bfloat16']:.1f}, "
          f"bf16 autocast {g['bf16_autocast']:.1f} GFLOP/s")
    if "generate_tokens_per_s" in report:
        t = report["generate_tokens_per_s"]
        print(f"generate ({report['generate']}): fp32 {t['float32']:.1f}, bf16 {t['bfloat16']:.1f} tokens/s")
    print("dtype: auto ->", ", ".join(f"{s} {d}" for s, d in report["auto"].items()))


if __name__ == "__main__":
    main()
