"""The baseline every engine result is compared against: transformers' own ``generate`` with a KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), as decoder-only generation needs."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def eos_ids(model, tokenizer=None) -> set[int]:
    """Every token id that ends generation for this model (generation config and tokenizer)."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found


def hf_greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos: set[int] | None = None,
    prompt_lookup: int | None = None,
    **generate_kwargs,
) -> list[list[int]]:
    """Greedy ``model.generate`` (KV cache) on a left-padded batch; returns each sequence's new tokens,
    cut after the first EOS (which is kept). ``prompt_lookup``: transformers' own prompt-lookup decoding
    (``prompt_lookup_num_tokens``), the n-gram drafter a user would otherwise reach for. ``generate_kwargs`` go to
    ``generate`` as they are (``cache_implementation="static"``, ``assistant_early_exit=L``, ``assistant_model=``)."""
    eos = eos if eos is not None else eos_ids(model)
    ids, mask = pad_left(prompts, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos) if eos else None,
            use_cache=True,
            temperature=None,
            top_p=None,
            top_k=None,
            **({"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}),
            **generate_kwargs,
        )
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        kept = []
        for tok in row:
            kept.append(tok)
            if tok in eos:
                break
        results.append(kept)
    return results


def hf_greedy_generate_batched(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    batch_size: int = 8,
    eos: set[int] | None = None,
    show_progress: bool = True,
    desc: str = "generate (final layer)",
) -> list[list[int]]:
    """``hf_greedy_generate`` over many prompts in batches of similar length, with a progress bar."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not show_progress, unit="batch"):
        outs = hf_greedy_generate(model, [prompts[i] for i in batch], max_new_tokens, pad_id, eos)
        for i, out in zip(batch, outs, strict=True):
            results[i] = out
    return results
