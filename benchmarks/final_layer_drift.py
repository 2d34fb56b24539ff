"""Did LITE fine-tuning keep the final layer's behaviour? Greedy final-layer answers of two models, compared.

Run:  .venv/bin/python benchmarks/final_layer_drift.py --before smollm2 \
          --after models:/layerexit-smollm2_lite@trained --prompts 32 --max-new-tokens 48

Both models answer the held-out 20% of the project's instruction set (never trained on) with transformers'
greedy ``generate``; the report gives spaCy similarity (the paper's Table 2 metric), all-MiniLM-L6-v2 cosine,
token agreement, identical answers and mean lengths, overall and per category. For scale, the same metrics
between the base model's greedy answers and its own answers to a lightly reworded prompt ("Please answer:
...") are reported as a noise floor: how different two acceptable answers of the *same* model already are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch


def answers(spec: str, prompt_sets: list[list[str]], max_new_tokens: int,
            batch_size: int) -> list[tuple[list[str], list[list[int]]]]:
    """Greedy final-layer answers of one model (loaded once) to each prompt set: (texts, token ids) per set."""
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
    from layerexit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec)
    out = []
    for prompts in prompt_sets:
        ids = [format_prompt(tok, p) for p in prompts]
        gen = hf_greedy_generate_batched(model, ids, max_new_tokens, tok.pad_token_id, batch_size,
                                         eos_ids(model, tok), desc=f"generate ({spec})")
        out.append(([tok.decode(o, skip_special_tokens=True) for o in gen], gen))
    return out


def compare(ref_text, ref_ids, other_text, other_ids) -> dict[str, list[float]]:
    from layerexit.evaluation.similarity import embedding_similarities, spacy_similarities, token_agreement

    return {
        "spacy": spacy_similarities(ref_text, other_text),
        "minilm": embedding_similarities(ref_text, other_text),
        "token_agreement": [token_agreement(a, b).agreement for a, b in zip(ref_ids, other_ids, strict=True)],
        "identical": [float(list(a) == list(b)) for a, b in zip(ref_ids, other_ids, strict=True)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="smollm2", help="model spec before fine-tuning")
    parser.add_argument("--after", required=True, help="model spec after fine-tuning (dir or models:/ URI)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (categories interleaved)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench/final_layer_drift.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from layerexit.data.instructions import heldout_instructions, interleave_categories

    items = interleave_categories(heldout_instructions())[: args.prompts]
    prompts = [it.text for it in items]
    (before_text, before_ids), (reworded_text, reworded_ids) = answers(
        args.before, [prompts, [f"Please answer: {p}" for p in prompts]], args.max_new_tokens, args.batch_size)
    [(after_text, after_ids)] = answers(args.after, [prompts], args.max_new_tokens, args.batch_size)
    rows = {"after LITE vs before": compare(before_text, before_ids, after_text, after_ids),
            "noise floor: before, reworded prompt": compare(before_text, before_ids, reworded_text, reworded_ids)}

    lines = [f"{len(prompts)} held-out prompts, {args.max_new_tokens} new tokens, greedy; before `{args.before}`, "
             f"after `{args.after}`", "",
             "| comparison | spaCy sim | MiniLM cos | token agreement | identical answers |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {mean(m['spacy']):.3f} | {mean(m['minilm']):.3f} | "
                     f"{100 * mean(m['token_agreement']):.1f}% | {100 * mean(m['identical']):.0f}% |")
    lines += ["", f"mean answer length (tokens): before {mean(map(len, before_ids)):.1f}, "
              f"after {mean(map(len, after_ids)):.1f}", "", "| category | spaCy sim after vs before | n |", "|---|---|---|"]
    by_cat: dict[str, list[float]] = defaultdict(list)
    for item, s in zip(items, rows["after LITE vs before"]["spacy"], strict=True):
        by_cat[item.category].append(s)
    lines += [f"| {c} | {mean(v):.3f} | {len(v)} |" for c, v in sorted(by_cat.items())]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "table": table,
                               "examples": [{"prompt": p, "before": b, "after": a} for p, b, a
                                            in zip(prompts[:8], before_text, after_text)]}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
