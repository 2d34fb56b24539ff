"""Build a static draft vocabulary: the N tokens a model emits most, measured on the training split.

Run:  .venv/bin/python -m layerexit.data.draft_vocab --model smollm2 --size 8192 --limit 128 \
          --out outputs/draft_vocab/smollm2-8192.json

The model answers the training split's instructions greedily (its own outputs, as FR-Spec / VocabTrim count
them); the most frequent tokens of those answers and of the prompts are kept. The file records the tokenizer's
fingerprint, so it is rejected for another tokenizer. Use it with ``{"policy": "self-speculative",
"draft_vocab": FILE}``: only the draft scores this subset; verification keeps the full head (lossless).

The dataset side (instructions, prompt formatting, the model's answers) lives here, beside the other model-answered
datasets (``data/selfdistill.py``); the engine's part takes token ids only (``engine.heads.build_draft_vocab``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_for_model(model, tokenizer, size: int, limit: int | None = None, max_new_tokens: int = 96,
                    batch_size: int = 8, show_progress: bool = True) -> list[int]:
    """The ``size`` most frequent token ids in the model's greedy answers (and prompts) on the training split."""
    from layerexit.data.instructions import train_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.heads import build_draft_vocab
    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched

    items = train_instructions()[:limit] if limit else train_instructions()
    prompts = [format_prompt(tokenizer, it.text) for it in items]
    answers = hf_greedy_generate_batched(model, prompts, max_new_tokens, tokenizer.pad_token_id, batch_size,
                                         eos_ids(model, tokenizer), show_progress, desc="draft vocabulary")
    return build_draft_vocab([*answers, *prompts], size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--size", type=int, default=8192, help="tokens kept (N)")
    parser.add_argument("--limit", type=int, default=None, help="training instructions used (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch

    from layerexit.engine.heads import save_draft_vocab
    from layerexit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, dtype=torch.bfloat16)
    if not 1 <= args.size <= model.config.vocab_size:
        parser.error(f"--size must be in 1..{model.config.vocab_size}")
    ids = build_for_model(model, tok, args.size, args.limit, args.max_new_tokens)
    print(save_draft_vocab(Path(args.out), ids, tok), f"({len(ids)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
