"""Peak memory and time of one LITE loss step (forward + loss + backward) versus standard fine-tuning.

Run:  .venv/bin/python benchmarks/lite_loss_memory.py --model smollm2 --batch 4 --seq 256

Each mode runs in a fresh subprocess. The process's peak RSS (VmHWM) is reset right before the step via
/proc/self/clear_refs, so the number is the step's own peak, including weights and gradients.
Modes: `hf` (model(labels=...), transformers' own loss), `final_only` (our loss, final layer only),
`lite` (exits 8..28 step 4 + final, chunked logits), `lite_unchunked` (every exit's full logits kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from proc_memory import reset_peak_rss, rss_kib, run_mode_in_subprocess

MODES = ("hf", "final_only", "lite", "lite_unchunked")


def run_one(mode: str, model_spec: str, batch: int, seq: int, chunk: int) -> dict:
    import torch

    from layerexit.losses import exit_weights, lite_loss
    from layerexit.models.exits import collect_hidden_states, decoder_parts
    from layerexit.models.loading import load_model_and_tokenizer

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_spec)
    model.train()
    parts = decoder_parts(model)
    L = parts.num_layers
    ids = torch.randint(100, model.config.vocab_size, (batch, seq))
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # prompt part masked, as in instruction tuning
    exits = list(range(8, L - 1, 4)) if mode.startswith("lite") else []
    weights = exit_weights(exits, L, "uniform" if exits else "final_only")
    base = reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "hf":
        loss = model(input_ids=ids, labels=labels).loss
    else:
        hidden = collect_hidden_states(model, ids, weights.keys())
        loss = lite_loss(hidden, labels, parts.norm, parts.head, weights,
                         chunk_size=None if mode == "lite_unchunked" else chunk).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    return {"mode": mode, "exits": exits, "loss": float(loss), "seconds": seconds,
            "rss_before_mib": base / 1024, "peak_mib": peak / 1024, "step_extra_mib": (peak - base) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.batch, args.seq, args.chunk)))
        return 0
    results = []
    for mode in args.modes:
        results.append(run_mode_in_subprocess(__file__, mode, ["--model", args.model, "--batch", str(args.batch),
                                                               "--seq", str(args.seq), "--chunk", str(args.chunk)]))
        r = results[-1]
        print(f"{mode:15s} peak {r['peak_mib']:8.0f} MiB  step +{r['step_extra_mib']:7.0f} MiB  "
              f"{r['seconds']:6.1f} s  loss {r['loss']:.3f}", flush=True)
    ref = next((r for r in results if r["mode"] == "hf"), results[0])
    print("\n| mode | exits | peak RSS (MiB) | peak / hf | step time (s) | time / hf |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {len(r['exits'])} + final | {r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f} "
              f"| {r['seconds']:.1f} | {r['seconds'] / ref['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
