"""Drafts that agree: acceptance, cost and lossless speed of exit drafts, one row per (model, draft layer), with
compiled `final` as the baseline in the same run.

Run:  .venv/bin/python benchmarks/draft_bench.py --prompts 8 --max-new-tokens 64 \
          --row 'base@8=smollm2:8' --row 'decoder@8=models:/layerexit-smollm2_draft@trained:8:8192' \
          --out outputs/bench/drafts.md

A row is NAME=MODEL:LAYER[:DRAFT_VOCAB_SIZE] (a draft vocabulary of the N tokens the model's own answers on the
training split use most; the model's shipped draft_vocab.json when it has one of that size). Per row: agreement at
the draft layer (acceptance at draft position 1), acceptance at positions 1..K (each given the earlier ones were
accepted), the draft's cost per token in weight bytes of a full step, tokens per verification, and tokens/s of
lossless self-speculative decoding (the best draft length by the cost model, 1..K) against compiled `final`, both
on one compiled engine, interleaved prompt by prompt, at batch 1 and --batch-size. Prompts are the project's
held-out instructions (never trained on). An fp32 pass checks that the tokens equal `final`'s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _parse_row(text: str) -> tuple[str, str, int, int | None]:
    name, _, rest = text.partition("=")
    parts = rest.rsplit(":", 2)
    # MODEL may itself hold ':' (models:/...); LAYER and the vocabulary size are the trailing integers.
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return name, parts[0], int(parts[1]), int(parts[2])
    model, _, layer = rest.rpartition(":")
    if not name or not model or not layer.isdigit():
        raise SystemExit(f"--row {text!r}: expected NAME=MODEL:LAYER[:DRAFT_VOCAB_SIZE]")
    return name, model, int(layer), None


def _draft_vocab(model, tok, model_spec: str, size: int | None, out_dir: Path) -> str | None:
    if size is None:
        return None
    from layerexit.data.instructions import train_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.heads import build_draft_vocab, load_draft_vocab, save_draft_vocab
    from layerexit.engine.options import SamplingParams
    from layerexit.engine.reference import eos_ids
    from layerexit.models.draft_settings import draft_settings_of

    shipped = draft_settings_of(model).get("draft_vocab")
    if shipped and len(load_draft_vocab(shipped, tok)) == size:
        return shipped
    # The model's own greedy answers on 64 training-split instructions.
    engine = EarlyExitEngine(model, eos_ids(model, tok), tok.pad_token_id)
    ids = [format_prompt(tok, it.text) for it in train_instructions()[:64]]
    answers = [r.token_ids for r in engine.generate(ids, sampling=SamplingParams(max_new_tokens=64))]
    path = out_dir / f"draft_vocab_{abs(hash(model_spec)) % 10**8}_{size}.json"
    return str(save_draft_vocab(path, build_draft_vocab(answers, size), tok))


def _time(engine, prompts, cfgs: dict, max_new: int, batch: int) -> dict[str, float]:
    from layerexit.engine.options import SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new)
    secs = {name: 0.0 for name in cfgs}
    toks = {name: 0 for name in cfgs}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        for name, cfg in cfgs.items():  # interleaved: load that comes and goes hits every config alike
            t0 = time.perf_counter()
            out = engine.generate(chunk, cfg, sampling)
            secs[name] += time.perf_counter() - t0
            toks[name] += sum(len(r.token_ids) for r in out)
    return {name: toks[name] / secs[name] for name in cfgs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True, metavar="NAME=MODEL:LAYER[:N]")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-draft", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="outputs/bench/drafts.md")
    args = p.parse_args()

    from layerexit.data.instructions import heldout_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig
    from layerexit.engine.reference import eos_ids
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.tuning.draft_choice import (draft_cost_ratio, expected_tokens, measure_acceptance,
                                               predicted_speedup)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = [it.text for it in heldout_instructions()[: args.prompts]]
    results = []
    for spec in args.row:
        name, model_spec, layer, vocab_size = _parse_row(spec)
        model, tok = load_model_and_tokenizer(model_spec, dtype=getattr(torch, args.dtype))
        prompts = [format_prompt(tok, t) for t in texts]
        vocab = _draft_vocab(model, tok, model_spec, vocab_size, out.parent)
        eos = eos_ids(model, tok)
        engine = EarlyExitEngine(model, eos, tok.pad_token_id, compile=not args.no_compile)
        stats = measure_acceptance(engine, prompts, layer, args.max_draft, args.max_new_tokens, vocab)
        cost = draft_cost_ratio(model, layer, vocab_size)
        k = max(range(1, args.max_draft + 1), key=lambda n: predicted_speedup(stats.per_position, cost, n))
        final = ExitConfig(policy="final")
        spec_cfg = ExitConfig(policy="self-speculative", layer=layer, num_draft=k, draft="layer", draft_vocab=vocab)
        cfgs = {"final": final, "draft": spec_cfg}
        # compile both paths' shapes (batch 1 and the batch size) before timing
        _time(engine, prompts[:1], cfgs, 8, 1)
        _time(engine, prompts[: args.batch_size], cfgs, 8, args.batch_size)
        b1 = _time(engine, prompts, cfgs, args.max_new_tokens, 1)
        bn = _time(engine, prompts, cfgs, args.max_new_tokens, args.batch_size)
        # Lossless check in fp32 (bf16 verification can flip near-ties).
        m32, _ = load_model_and_tokenizer(model_spec, dtype=torch.float32)
        e32 = EarlyExitEngine(m32, eos, tok.pad_token_id)
        from layerexit.engine.options import SamplingParams

        sp = SamplingParams(max_new_tokens=args.max_new_tokens)
        ref = [r.token_ids for r in e32.generate(prompts, final, sp)]
        got = [r.token_ids for r in e32.generate(prompts, spec_cfg, sp)]
        identical = sum(a == b for a, b in zip(ref, got)) / len(ref)
        row = {"name": name, "model": model_spec, "layer": layer, "draft_vocab": vocab_size, "num_draft": k,
               "agreement": stats.per_position[0], "per_position": stats.per_position,
               "acceptance": stats.acceptance, "cost_ratio": cost,
               "tokens_per_verification": expected_tokens(stats.per_position, k),
               "predicted_speedup": predicted_speedup(stats.per_position, cost, k),
               "final_tps_b1": b1["final"], "draft_tps_b1": b1["draft"], "speedup_b1": b1["draft"] / b1["final"],
               f"final_tps_b{args.batch_size}": bn["final"], f"draft_tps_b{args.batch_size}": bn["draft"],
               f"speedup_b{args.batch_size}": bn["draft"] / bn["final"], "identical_fp32": identical}
        results.append(row)
        print(json.dumps(row), flush=True)
        del model, m32, engine, e32
    from layerexit.machine import describe_machine

    machine = describe_machine()
    b = args.batch_size
    lines = [f"Machine: {json.dumps(machine)}; dtype {args.dtype}, {args.threads} threads, {args.prompts} held-out "
             f"prompts x {args.max_new_tokens} tokens, compiled engine: {not args.no_compile}", "",
             "| row | layer | draft vocab | agreement | acceptance pos 1..K | cost / token | k | tokens / verif. "
             f"| predicted | b1 vs final | b{b} vs final | identical (fp32) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['layer']} | {r['draft_vocab'] or 'full'} | {r['agreement']:.0%} | "
                     + "/".join(f"{a:.0%}" for a in r["per_position"]) + f" | {r['cost_ratio']:.2f} | {r['num_draft']} "
                     f"| {r['tokens_per_verification']:.2f} | {r['predicted_speedup']:.2f}x | {r['speedup_b1']:.2f}x "
                     f"| {r[f'speedup_b{b}']:.2f}x | {r['identical_fp32']:.0%} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": results}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
