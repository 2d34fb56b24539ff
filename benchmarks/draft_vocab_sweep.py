"""Draft vocabulary size N against acceptance: how small the draft head can be before drafts stop agreeing.

Run:  .venv/bin/python benchmarks/draft_vocab_sweep.py --model models:/layerexit-smollm2_draft@trained --layer 10 \\
          --sizes full,2048,1024,512 --prompts 8 --max-new-tokens 48 --num-draft 3

The draft scores only the N most frequent tokens of the model's own answers on the training split (FR-Spec style:
the model's shipped ``draft_vocab.json`` cut to its first N ids, which are in frequency order; ``full`` is the whole
head) while verification keeps the full head, so the tokens stay the final layer's and only acceptance moves. Per
N: acceptance at each draft position measured by lossless self-speculative decoding on held-out prompts (fp32,
exact), the draft token's cost in weight bytes of a full step, and the speedup the cost model predicts at the best
draft length. One process, one model, so the rows differ only in N.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model with a shipped draft_vocab.json (or pass --vocab)")
    p.add_argument("--layer", type=int, default=None, help="draft layer (default: the model's draft_settings.json)")
    p.add_argument("--vocab", default=None, help="a draft vocabulary file to cut (default: the model's shipped one)")
    p.add_argument("--sizes", default="full,4096,2048,1024,512")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--num-draft", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/bench/draft_vocab_sweep.json")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from layerexit.data.instructions import heldout_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.heads import load_draft_vocab, save_draft_vocab
    from layerexit.engine.reference import eos_ids
    from layerexit.machine import describe_machine, machine_line
    from layerexit.models.draft_settings import draft_settings_of
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.tuning.draft_choice import draft_cost_ratio, measure_acceptance, predicted_speedup

    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    shipped = draft_settings_of(model)
    layer = args.layer or shipped.get("layer")
    vocab_path = args.vocab or shipped.get("draft_vocab")
    if layer is None or vocab_path is None:
        raise SystemExit("--layer and --vocab are needed for a model without draft_settings.json / draft_vocab.json")
    ranked = load_draft_vocab(vocab_path, tok)
    engine = EarlyExitEngine(model, eos_ids(model, tok), tok.pad_token_id)
    prompts = [format_prompt(tok, it.text) for it in heldout_instructions()[: args.prompts]]
    tmp = Path(tempfile.mkdtemp(prefix="draft-vocab-"))
    rows = []
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in tqdm(sizes, desc="draft vocabulary sizes"):
        n = None if size == "full" else int(size)
        if n is not None and n > len(ranked):
            print(f"skipping N={n}: the vocabulary file ranks only {len(ranked)} tokens")
            continue
        path = str(save_draft_vocab(tmp / f"v{n}.json", ranked[:n], tok)) if n else None
        stats = measure_acceptance(engine, prompts, layer, args.num_draft, args.max_new_tokens, draft_vocab=path)
        c = draft_cost_ratio(model, layer, n)
        best_k = max(range(1, args.num_draft + 1), key=lambda k: predicted_speedup(stats.per_position, c, k))
        rows.append({"draft_vocab": n or len(tok), "layer": layer, "per_position": [round(a, 4) for a in
                     stats.per_position], "acceptance": round(stats.acceptance, 4),
                     "tokens_per_verification": round(stats.tokens_per_verification, 3), "cost_ratio": round(c, 4),
                     "best_k": best_k, "predicted_speedup": round(predicted_speedup(stats.per_position, c, best_k), 3)})
    report = {"command": "benchmarks/draft_vocab_sweep.py " + " ".join(argv if argv is not None else
                                                                      __import__("sys").argv[1:]),
              "machine": machine_line(describe_machine()), "model": args.model, "dtype": args.dtype, "rows": rows}
    print(report["machine"])
    print(f"{'N':>7} {'acceptance by position':>26} {'accepted':>9} {'tok/verify':>11} {'cost c':>7} {'best k':>7}"
          f" {'predicted':>10}")
    for r in rows:
        pos = "/".join(f"{a:.0%}" for a in r["per_position"])
        print(f"{r['draft_vocab']:>7} {pos:>26} {r['acceptance']:>9.1%} {r['tokens_per_verification']:>11.2f} "
              f"{r['cost_ratio']:>7.3f} {r['best_k']:>7} {r['predicted_speedup']:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
