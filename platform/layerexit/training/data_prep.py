"""The training data a job prepares in the driver before any worker starts: tokenized train/eval examples (a
dataset file, or the instruction set answered by the model itself) and the held-out alignment prompts."""

from __future__ import annotations

from layerexit.data.datasets import PreparedData, TokenizedExample, finish_example
from layerexit.training.config import TrainConfig


def _load_tokenizer(spec: str):
    from layerexit.models.loading import load_tokenizer

    return load_tokenizer(spec)


def prepare_training_data(cfg: TrainConfig, show_progress: bool = True) -> PreparedData:
    """Tokenized train/eval data and alignment prompts for ``cfg`` (runs in the driver, before any worker)."""
    d = cfg.data
    if d.source != "instructions":
        from layerexit.data.datasets import prepare_sft_data

        tokenizer = _load_tokenizer(cfg.model.spec)
        return prepare_sft_data(tokenizer, d.path, template=d.template, max_length=d.max_length,
                                eval_fraction=d.eval_fraction, seed=d.seed, max_train_examples=d.max_train_examples,
                                max_eval_examples=d.max_eval_examples)
    from layerexit.data.datasets import TokenizeStats
    from layerexit.data.instructions import interleave_categories, load_instructions, split_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.data.selfdistill import self_distill

    train_items, held_items = split_instructions(load_instructions(d.path))
    # Balanced prefixes: a capped run still sees every category, and so does its evaluation.
    train_items, held_items = interleave_categories(train_items), interleave_categories(held_items)
    if d.max_train_examples is not None:
        train_items = train_items[: d.max_train_examples]
    eval_items = held_items[: d.max_eval_examples] if d.max_eval_examples is not None else held_items
    distilled, cache = self_distill(cfg.model.spec, [*train_items, *eval_items], d.distill_max_new_tokens,
                                    d.distill_batch_size, show_progress=show_progress)
    tokenizer = _load_tokenizer(cfg.model.spec)

    def build(rows) -> tuple[list[TokenizedExample], TokenizeStats]:
        stats = TokenizeStats()
        out = []
        for r in rows:
            ids = [*r.prompt_ids, *r.response_ids]
            labels = [-100] * len(r.prompt_ids) + list(r.response_ids)
            ex = finish_example(ids, labels, len(r.prompt_ids), d.max_length, stats)
            if ex is not None:
                out.append(ex)
        return out, stats

    train, train_stats = build(distilled[: len(train_items)])
    evals, eval_stats = build(distilled[len(train_items):])
    n_prompts = cfg.eval.alignment_prompts
    eval_prompts = [format_prompt(tokenizer, i.text) for i in held_items[:n_prompts]]
    return PreparedData(train, evals, eval_prompts, info={
        "source": "instructions (self-distilled)", "cache": str(cache), "train_instructions": len(train_items),
        "heldout_instructions": len(held_items), "train": train_stats.as_dict(), "eval": eval_stats.as_dict(),
    })
