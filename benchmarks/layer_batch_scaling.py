"""How the cost of one decode step's pieces grows with the rows in a batch: a decoder layer and the LM head.

Run:  .venv/bin/python benchmarks/layer_batch_scaling.py --model smollm2 --rows 1 2 4 8 16 --context 200

Times the engine's own ``run_layer`` (one new position per row over ``--context`` cached positions, the
decode case) and ``head_probs`` (final norm, LM head, softmax) at each batch size, on ``--threads`` torch
threads. Per-row cost that falls with the rows means the piece is bound by overhead or by reading weights, not
by arithmetic: then dropping rows that exited early from the deeper layers buys little time, and one head call
for the whole batch costs about what one call for a single row does. Ratios against 1 row are printed too,
since absolute times on a shared machine drift.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def time_call(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[len(samples) // 2]


def measure(engine, rows: int, context: int, repeat: int) -> dict:
    from layerexit.engine.cache import ExitKVCache

    H = engine.model.config.hidden_size
    cache = ExitKVCache(engine.L, rows, context + 1, engine.kv_heads, engine.head_dim, engine.dtype)
    valid = torch.ones(rows, context + 1, dtype=torch.bool)
    pad_off = torch.zeros(rows, dtype=torch.long)
    h = torch.randn(rows, 1, H, dtype=engine.dtype)
    pos = engine.positions(pad_off, context, 1)
    rope = engine.rope(h, pos)
    mask = engine.attention_mask(valid, context, 1)
    layer_no = {"k": 0}

    def one_layer():
        layer_no["k"] = layer_no["k"] % engine.L + 1  # cycle through the layers: no single layer stays cached
        cache.lengths = [context] * engine.L
        engine.run_layer(layer_no["k"], h, mask, pos, rope, cache)

    x = torch.randn(rows, H, dtype=engine.dtype)
    with torch.inference_mode():
        layer_s = time_call(one_layer, repeat)
        head_s = time_call(lambda: engine.head_probs(x), max(5, repeat // 3))
    return {"rows": rows, "layer_ms": layer_s * 1e3, "head_ms": head_s * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model spec (smollm2, HF dir, .gguf, models:/name@alias)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="batch sizes to time")
    parser.add_argument("--context", type=int, default=200, help="cached positions per row")
    parser.add_argument("--repeat", type=int, default=60, help="timed layer calls per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="outputs/bench/layer_batch_scaling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.reference import eos_ids
    from layerexit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    engine = EarlyExitEngine(model, eos_ids(model, tok), tok.pad_token_id)
    rows = [measure(engine, n, args.context, args.repeat) for n in args.rows]
    base = rows[0]
    print(f"model={args.model} layers={engine.L} context={args.context} threads={args.threads}")
    print(f"{'rows':>5} {'layer ms':>9} {'per row':>8} {'vs first':>9} {'head ms':>8} {'per row':>8} {'vs first':>9}")
    for r in rows:
        r["layer_ratio"] = r["layer_ms"] / base["layer_ms"]
        r["head_ratio"] = r["head_ms"] / base["head_ms"]
        print(f"{r['rows']:>5} {r['layer_ms']:>9.2f} {r['layer_ms'] / r['rows']:>8.2f} {r['layer_ratio']:>8.2f}x "
              f"{r['head_ms']:>8.2f} {r['head_ms'] / r['rows']:>8.2f} {r['head_ratio']:>8.2f}x")
    head_layers = base["head_ms"] / base["layer_ms"]
    print(f"one head call at {base['rows']} row(s) = {head_layers:.1f} layers")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "benchmarks/layer_batch_scaling.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "model": args.model, "context": args.context,
        "threads": args.threads, "rows": rows, "head_in_layers": head_layers}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
