"""Step time and peak memory of the three exit recipes vs standard fine-tuning, at the same batch.

Run:  .venv/bin/python benchmarks/recipes_step.py --model smollm2 --batch 4 --seq 128 --steps 3 --threads 2

Each mode runs in a fresh subprocess on the same random batch (forward + loss + backward + AdamW; peak RSS reset
after one warm-up step, as in benchmarks/train_step.py). Modes:
  standard   transformers' own loss on the final layer (standard fine-tuning)
  lite       CE-LITE: exits 8..28 step 4 + final, full-vocabulary heads, chunked (the paper's recipe)
  distill    full fine-tuning, top-k KL towards the base model at every exit + the final-layer anchor; the
             teacher's top-k comes precomputed (the teacher cache), so no teacher forward runs in the step
  adapters   frozen base; one adapter per exit trained on cached exit hidden states of the same B x T positions
             (no decoder layer runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from proc_memory import reset_peak_rss, rss_kib, run_mode_in_subprocess

MODES = ("standard", "lite", "distill", "adapters")


def run_one(mode: str, model_spec: str, batch: int, seq: int, steps: int, threads: int, k: int, full_every: int,
            rank: int) -> dict:
    import torch

    from layerexit.data.datasets import collate_teacher
    from layerexit.losses import exit_weights
    from layerexit.losses.distill import teacher_topk
    from layerexit.models.adapters import build_adapters
    from layerexit.models.exits import collect_hidden_states, decoder_parts
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training.loop import LiteObjective, TorchEngine, lr_lambda, param_groups
    from layerexit.training.recipes import AdapterObjective, DistillObjective

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_spec)
    parts = decoder_parts(model)
    L = parts.num_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    mask = torch.ones_like(ids)
    exits = list(range(8, L - 1, 4))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    inputs: dict = {}
    if mode in ("distill", "adapters"):  # the teacher cache: computed once, outside the timed steps
        with torch.no_grad(), autocast:
            hidden = collect_hidden_states(model, ids, [*exits, L])
            t_ids, t_logp = teacher_topk(parts.head(parts.norm(hidden[L])).flatten(0, 1), k)
    if mode == "standard":
        objective = model
    elif mode == "lite":
        objective = LiteObjective(model, exit_weights(exits, L, "uniform"), 128)
    elif mode == "distill":
        objective = DistillObjective(model, exit_weights(exits, L, "uniform"), 1.0, full_every, 256, 1.0)

        class Ex:  # the per-example teacher rows collate expects
            def __init__(self, b):
                self.teacher = (torch.arange(seq), t_ids.view(batch, seq, k)[b], t_logp.view(batch, seq, k)[b])

        tb = collate_teacher([Ex(b) for b in range(batch)], seq)
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels, **tb}
    else:
        adapters = build_adapters(exits, model.config.hidden_size, rank)
        objective = AdapterObjective(model, adapters, exit_weights(exits, L, "uniform"), 1.0, full_every, 512)
        inputs = {"teacher_ids": t_ids, "teacher_logp": t_logp, "mask": torch.ones(batch * seq),
                  **{f"hidden_l{l}": hidden[l].flatten(0, 1).to(torch.bfloat16) for l in exits}}
        del hidden
    model.train()
    opt = torch.optim.AdamW(param_groups(objective, 0.0), lr=1e-5)
    engine = TorchEngine(objective, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, 0, "constant")),
                         grad_accum=1, grad_clip=1.0)

    def one_step() -> tuple[float, float]:
        t0 = time.perf_counter()
        with autocast:
            if mode == "standard":
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            elif mode == "lite":
                loss = engine(input_ids=ids, attention_mask=mask, labels=labels)["loss"]
            else:
                loss = engine(**inputs)["loss"]
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0, float(loss)

    one_step()
    base = reset_peak_rss()
    times, loss = [], 0.0
    for _ in range(steps):
        dt, loss = one_step()
        times.append(dt)
    return {"mode": mode, "loss": loss, "seconds": statistics.median(times), "times": times,
            "rss_before_mib": base / 1024, "peak_mib": rss_kib("VmHWM") / 1024,
            "trainable": sum(p.numel() for p in objective.parameters() if p.requires_grad)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--full-every", type=int, default=8)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = [args.model, args.batch, args.seq, args.steps, args.threads, args.k, args.full_every, args.rank]
    if args.one:
        print(json.dumps(run_one(args.one, *common)))
        return 0
    results = []
    for mode in args.modes:
        results.append(run_mode_in_subprocess(__file__, mode, [
            "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
            "--threads", str(args.threads), "--k", str(args.k), "--full-every", str(args.full_every),
            "--rank", str(args.rank)]))
        r = results[-1]
        print(f"{mode:9s} step {r['seconds']:6.2f} s (runs {', '.join(f'{t:.2f}' for t in r['times'])}) "
              f"peak {r['peak_mib']:7.0f} MiB", flush=True)
    ref = next((r for r in results if r["mode"] == "standard"), results[0])
    print(f"\n{args.model}, batch {args.batch} x {args.seq}, autocast bf16, {args.threads} threads, k={args.k}, "
          f"full head every {args.full_every} positions, median of {args.steps} steps")
    print("| recipe | trainable params | step median / min (s) | time / standard (median, min) | peak RSS (MiB) "
          "| memory / standard |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['trainable'] / 1e6:.1f}M | {r['seconds']:.2f} / {min(r['times']):.2f} "
              f"| {r['seconds'] / ref['seconds']:.2f}, {min(r['times']) / min(ref['times']):.2f} "
              f"| {r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
