"""How often a layer draft agrees with the final layer: the first draft position's acceptance rate, measured on
prompts (text) by running the engine over their token ids. Lives with the other quality measurements so that the
models layer (``models/draft_export.py``, which records the figure) sits below the engine and never imports it."""

from __future__ import annotations

from torch import nn


def measure_agreement(model: nn.Module, tokenizer, layer: int, prompts: list[str], max_new_tokens: int = 48) -> float:
    """Share of greedy answer tokens where the draft's top token equals the final layer's (teacher-forced along the
    final layer's own greedy answers): the first draft position's acceptance rate."""
    from layerexit.data.prompts import format_prompt

    return measure_agreement_ids(model, tokenizer.eos_token_id, tokenizer.pad_token_id, layer,
                                 [format_prompt(tokenizer, p) for p in prompts], max_new_tokens)


def measure_agreement_ids(model: nn.Module, eos_token_id: int, pad_token_id: int, layer: int,
                          prompt_ids: list[list[int]], max_new_tokens: int = 48) -> float:
    """``measure_agreement`` over prompts already turned into token ids."""
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import SamplingParams
    from layerexit.engine.traces import layer_predictions
    from layerexit.models.exits import decoder_parts

    L = decoder_parts(model).num_layers
    engine = EarlyExitEngine(model, {eos_token_id}, pad_token_id)
    results = engine.generate(prompt_ids, sampling=SamplingParams(max_new_tokens=max_new_tokens))
    same = total = 0
    for prompt, res in zip(prompt_ids, results):
        if not res.token_ids:
            continue
        top1, _, _ = layer_predictions(model, prompt + res.token_ids, len(prompt), [layer, L])
        same += int((top1[0] == top1[1]).sum())
        total += top1.shape[1]
    return same / total if total else 0.0
