"""Prompt scoring: the log-prob of each prompt token given the tokens before it, from one full-depth prefill.

This is what OpenAI's ``echo: true`` with ``logprobs`` returns for the prompt, and what log-likelihood
evaluations (lm-evaluation-harness ``local-completions``) read. It always uses the final layer: a prompt token
has no exit layer (prefill runs every layer for every policy). The LM head runs over ``chunk`` positions at a
time so a long prompt never materialises a (length x vocabulary) matrix at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PromptScores:
    """Per prompt position: log-prob of the token there (None for the first) and the top-k alternatives."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def score_prompt(model, prompt_ids: Sequence[int], top_k: int = 0, chunk: int = 256) -> PromptScores:
    """Full-depth log-probs of ``prompt_ids[i]`` given ``prompt_ids[:i]`` for every i >= 1.

    ``top_k`` > 0 also returns, per position, the k most likely tokens with their log-probs (sorted, likeliest
    first). The model is any HF ``*ForCausalLM`` with ``.model`` (the decoder, final norm included) and
    ``.lm_head``.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        return PromptScores([], [])
    device = next(model.parameters()).device
    logprobs: list[float | None] = [None]
    top: list[list[tuple[int, float]] | None] = [None]
    with torch.inference_mode():
        inputs = torch.tensor([ids], dtype=torch.long, device=device)
        # Shape: hidden (1, T, H), already through the final norm
        hidden = model.model(input_ids=inputs).last_hidden_state
        targets = inputs[0, 1:]
        for start in range(0, len(ids) - 1, chunk):
            stop = min(start + chunk, len(ids) - 1)
            # Shape: position t predicts token t+1 -> (n, V) log-probs in fp32
            lp = torch.log_softmax(model.lm_head(hidden[0, start:stop]).float(), dim=-1)
            chosen = lp.gather(1, targets[start:stop, None])[:, 0]
            logprobs.extend(chosen.cpu().tolist())
            if top_k > 0:
                vals, idx = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
                top.extend([list(zip(i, v)) for i, v in zip(idx.cpu().tolist(), vals.cpu().tolist())])
            else:
                top.extend([[] for _ in range(stop - start)])
    return PromptScores(logprobs, top)
