"""Which batch, ZeRO stage and head chunk make the 7B-shaped LITE step fastest on one GPU, and its MFU.

Run (the device check, one lent GPU; about 6-8 minutes on an H200, inside one 10-minute command):
    DS_ACCELERATOR=cuda .venv/bin/python benchmarks/gpu_mfu_7b.py --budget-s 480 --out $OUT/mfu.json

Code-path check on a CPU (tiny shape, two settings, numbers mean nothing):
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/gpu_mfu_7b.py --shape tiny --budget-s 300

Each setting runs ``benchmarks/gpu_zero3_7b.py`` in its own process (a fresh CUDA context, so an out-of-memory
setting costs only itself), in order, until ``--budget-s`` would be exceeded by the next one (each is given at most
``--per-run-s``). The settings start from the one measured before (ZeRO-3, 4 x 512, head chunks of 128) and grow
what amortises the fixed costs of a step: tokens per step (optimizer step, ZeRO hooks), head chunk size (fewer,
larger LM-head matmuls for the LITE exits), and ZeRO-2 instead of ZeRO-3 (on one GPU ZeRO-3 shards nothing and only
adds its per-module fetch hooks). Prints a table and the best setting; target MFU >= 35%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS_7B = [  # (zero stage, batch, seq, head chunk)
    (3, 4, 512, 128),
    (2, 4, 512, 128),
    (2, 8, 1024, 512),
    (2, 16, 1024, 512),
    (3, 16, 1024, 512),
    (2, 8, 2048, 1024),
]
SETTINGS_TINY = [(3, 2, 64, 16), (2, 4, 64, 32)]


def run_setting(shape: str, stage: int, batch: int, seq: int, chunk: int, steps: int, timeout_s: float) -> dict:
    cmd = [sys.executable, str(HERE / "gpu_zero3_7b.py"), "--shape", shape, "--zero-stage", str(stage), "--batch",
           str(batch), "--seq", str(seq), "--chunk", str(chunk), "--steps", str(steps), "--warmup", "2"]
    row = {"zero_stage": stage, "batch": batch, "seq": seq, "chunk": chunk}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout_s:.0f} s", "wall_s": time.perf_counter() - start}
    row["wall_s"] = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in (proc.stderr or "").lower()
        return {**row, "error": "out of memory" if oom else " | ".join(tail)[-400:]}
    return {**row, **json.loads(lines[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting settings after this long")
    parser.add_argument("--per-run-s", type=float, default=150, help="time limit of one setting")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per setting")
    parser.add_argument("--out", type=Path, help="write the result (JSON) here")
    args = parser.parse_args(argv)

    settings = SETTINGS_7B if args.shape == "7b" else SETTINGS_TINY
    start, rows = time.perf_counter(), []
    for stage, batch, seq, chunk in settings:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            rows.append({"zero_stage": stage, "batch": batch, "seq": seq, "chunk": chunk, "error": "not run (budget)"})
            continue
        row = run_setting(args.shape, stage, batch, seq, chunk, args.steps, min(args.per_run_s, left))
        rows.append(row)
        shown = (f"{row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.1%}" if row.get("mfu") is not None
                 else f"{row.get('tokens_per_s', 0):.0f} tok/s" if "tokens_per_s" in row else row.get("error"))
        print(f"ZeRO-{stage} {batch}x{seq} chunk {chunk}: {shown} ({row['wall_s']:.0f} s)", file=sys.stderr,
              flush=True)
        if args.out:  # after every setting: a later crash or timeout keeps what was measured
            args.out.write_text(json.dumps({"rows": rows}, indent=2))
    done = [r for r in rows if "tokens_per_s" in r]
    best = max(done, key=lambda r: r["tokens_per_s"], default=None)
    print("| ZeRO | batch x seq | head chunk | step (s) | tokens/s | MFU | peak GiB |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            mem = r.get("peak_gpu_mem_reserved_gib")
            print(f"| {r['zero_stage']} | {r['batch']} x {r['seq']} | {r['chunk']} | {r['step_s_median']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {mfu} | {mem:.0f} |" if mem else
                  f"| {r['zero_stage']} | {r['batch']} x {r['seq']} | {r['chunk']} | {r['step_s_median']:.3f} | "
                  f"{r['tokens_per_s']:.0f} | {mfu} | - |", file=sys.stderr)
        else:
            print(f"| {r['zero_stage']} | {r['batch']} x {r['seq']} | {r['chunk']} | - | - | {r['error']} | - |",
                  file=sys.stderr)
    result = {"benchmark": "gpu_mfu_7b", "shape": args.shape, "rows": rows, "best": best,
              "target_mfu": 0.35, "met": bool(best and best.get("mfu") and best["mfu"] >= 0.35)}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
