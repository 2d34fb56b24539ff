"""Step time and peak memory of one full fine-tuning step (forward + loss + backward + AdamW), LITE vs standard.

Run:  .venv/bin/python benchmarks/train_step.py --model smollm2 --batch 4 --seq 128 --steps 3 --precision autocast_bf16

Every mode runs in a fresh subprocess on the same random batch (same seed). The process's peak RSS (VmHWM) is reset
after one warm-up step (so AdamW state exists, as in a real run) and read after the measured steps: the number is
the steady-state step's peak, including weights, gradients and optimizer state. Time: the median and the fastest
measured step (on a shared machine the fastest is the better estimate of the step's own cost).
Modes:
  standard     model(input_ids, labels=...): transformers' own loss on the final layer (standard fine-tuning)
  final_only   our objective with the final layer only (the LITE code path, weights = final_only)
  lite         exits 8..28 step 4 + final, uniform weights, chunked logits (the paper's setting, scaled to depth)
  lite_anchor  lite + KL to a frozen copy of the starting model (what smollm2_lite.yaml trains with)

Expect LITE to cost extra LM-head evaluations: on SmolLM2 (576 x 49152 head, 30 layers) one head costs about as
much as 8 decoder layers, so 6 extra exits roughly double a step's FLOPs; on LLaMA-2 7B a head is ~0.65 of a layer
and 6 extra heads add ~12%. The FLOPs column estimates this analytically (heads recomputed under checkpointing
count 4x forward); `--flops-only llama2-7b` prints the same estimate for a model shape without running anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from proc_memory import reset_peak_rss, rss_kib, run_mode_in_subprocess

MODES = ("standard", "final_only", "lite", "lite_anchor")


def step_flops(cfg, tokens: int, heads: int, teacher: bool, recompute_heads: bool = True) -> float:
    """Training FLOPs of one step: 3x forward for the decoder stack (forward + backward), LM heads at 4x forward
    when their chunks run under activation checkpointing (our objective: the head is recomputed in backward) or 3x
    (transformers' own loss), plus one forward of the frozen teacher when the anchor is on."""
    h, inter, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    layer = 2 * tokens * (2 * h * h + 2 * h * kv + 3 * h * inter)
    head = 2 * tokens * h * V
    fwd_teacher = (L * layer + head) if teacher else 0
    return 3 * L * layer + (4 if recompute_heads else 3) * heads * head + fwd_teacher


SHAPES = {  # for --flops-only: published model shapes
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152,
                         num_attention_heads=9, num_key_value_heads=3),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, vocab_size=32000,
                       num_attention_heads=40, num_key_value_heads=40),
}


def flops_table(shape: str) -> None:
    """Analytical FLOPs of LITE (exits 8.. step 4) vs standard fine-tuning for a model shape."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(**SHAPES[shape])
    L = cfg.num_hidden_layers
    exits = len(range(8, L - 1, 4))
    std = step_flops(cfg, 1, 1, False, recompute_heads=False)
    head_in_layers = (2 * cfg.hidden_size * cfg.vocab_size) / (step_flops(cfg, 1, 0, False) / 3 / L)
    print(f"{shape}: one LM head = {head_in_layers:.2f} decoder layers; {exits} exits + final")
    for name, heads, teacher in (("final_only", 1, False), ("lite", exits + 1, False), ("lite_anchor", exits + 2, True)):
        print(f"  {name:12s} FLOPs / standard = {step_flops(cfg, 1, heads, teacher) / std:.2f}")


def run_one(mode: str, model_spec: str, batch: int, seq: int, steps: int, chunk: int, precision: str,
            threads: int) -> dict:
    import contextlib

    import torch

    from layerexit.losses import exit_weights
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training.loop import FrozenTeacher, LiteObjective, TorchEngine, lr_lambda, param_groups

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_spec)
    model.train()
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # the prompt part is masked, as in instruction tuning
    mask = torch.ones_like(ids)
    exits = list(range(8, L - 1, 4)) if mode.startswith("lite") else []
    weights = exit_weights(exits, L, "uniform" if exits else "final_only")
    teacher = None
    if mode == "lite_anchor":
        t_model, _ = load_model_and_tokenizer(model_spec, dtype=torch.bfloat16 if precision != "fp32" else torch.float32)
        teacher = FrozenTeacher(t_model)
    objective = LiteObjective(model, weights, chunk, anchor_weight=1.0 if teacher else 0.0)
    opt = torch.optim.AdamW(param_groups(objective, 0.0), lr=1e-5)
    engine = TorchEngine(objective, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, 0, "constant")),
                         grad_accum=1, grad_clip=1.0)

    def one_step() -> tuple[float, float]:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast_bf16" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            if mode == "standard":
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                loss = engine(input_ids=ids, attention_mask=mask, labels=labels,
                              **({"teacher": teacher} if teacher else {}))["loss"]
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0, float(loss)

    one_step()  # warm-up: allocates AdamW state and autograd buffers
    base = reset_peak_rss()
    times, loss = [], 0.0
    for _ in range(steps):
        dt, loss = one_step()
        times.append(dt)
    peak = rss_kib("VmHWM")
    heads = 1 + len(exits) + (1 if teacher else 0)  # the anchor evaluates the student's final head a second time
    return {"mode": mode, "exits": exits, "loss": loss, "seconds": statistics.median(times), "times": times,
            "rss_before_mib": base / 1024, "peak_mib": peak / 1024,
            "flops": step_flops(model.config, batch * seq, heads, teacher is not None, recompute_heads=mode != "standard")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode (after one warm-up step)")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--precision", default="autocast_bf16", choices=("fp32", "autocast_bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--flops-only", choices=sorted(SHAPES), help="print analytical FLOPs ratios for a shape, no run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flops_only:
        flops_table(args.flops_only)
        return 0
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.batch, args.seq, args.steps, args.chunk, args.precision,
                                 args.threads)))
        return 0
    results = []
    for mode in args.modes:
        results.append(run_mode_in_subprocess(__file__, mode, [
            "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
            "--chunk", str(args.chunk), "--precision", args.precision, "--threads", str(args.threads)]))
        r = results[-1]
        print(f"{mode:12s} step {r['seconds']:6.2f} s (runs {', '.join(f'{t:.2f}' for t in r['times'])})  "
              f"peak {r['peak_mib']:7.0f} MiB  loss {r['loss']:.3f}", flush=True)
    ref = next((r for r in results if r["mode"] == "standard"), results[0])
    print(f"\n{args.model}, batch {args.batch} x {args.seq} tokens, {args.precision}, {args.threads} threads, "
          f"median of {args.steps} steps")
    print("| mode | exits | step time median / min (s) | time / standard (median, min) | peak RSS (MiB) "
          "| memory / standard | FLOPs / standard |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        fastest, ref_fastest = min(r["times"]), min(ref["times"])
        print(f"| {r['mode']} | {len(r['exits'])} + final | {r['seconds']:.2f} / {fastest:.2f} "
              f"| {r['seconds'] / ref['seconds']:.2f}, {fastest / ref_fastest:.2f} "
              f"| {r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f} | {r['flops'] / ref['flops']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
