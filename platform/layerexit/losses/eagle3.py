"""The EAGLE-3 feature draft's training loss: soft cross-entropy against the frozen model's top-k distribution,
restricted to the draft vocabulary, at every step of the training-time-test unroll (pure functions).

Alignment (the input convention of :class:`layerexit.models.eagle3.Eagle3Draft`): the draft at start ``i`` reads
the embedding of ``x_{i+1}`` and the target's fused features of position ``i``; its step ``j`` predicts the target's
distribution ``p_{i+1+j}`` (the distribution at position ``i+1+j``, over the token ``x_{i+2+j}``). So step ``j``'s
logits at starts ``0..T-2-j`` are scored against the teacher rows at positions ``1+j..T-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def teacher_in_draft_vocab(teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, target_to_draft: torch.Tensor,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k mapped into the draft vocabulary and renormalised over the ids the draft has.

    Shape: teacher_ids, teacher_logp (..., k); target_to_draft (V,) draft id or -1 ->
    draft_ids (..., k) long (0 where the id is outside), probs (..., k) float32 summing to 1 over kept ids (0 for
    dropped ones), has_mass (...) bool: at least one top-k id is in the draft vocabulary.
    """
    draft_ids = target_to_draft[teacher_ids.long()]
    kept = draft_ids >= 0
    logp = teacher_logp.float() / temperature if temperature != 1.0 else teacher_logp.float()
    logp = logp.masked_fill(~kept, float("-inf"))
    has_mass = kept.any(-1)
    probs = torch.softmax(logp.masked_fill(~has_mass[..., None], 0.0), dim=-1) * kept
    return draft_ids.clamp(min=0), probs, has_mass


@dataclass
class TTTLossOutput:
    """Weighted mean loss over steps, and per step: loss, top-1 agreement with the teacher, positions scored."""

    loss: torch.Tensor
    per_step: dict[int, torch.Tensor]
    accuracy: dict[int, torch.Tensor]
    positions: dict[int, int]


def step_weights(steps: int, decay: float) -> list[float]:
    """EAGLE-3's weighting of the unrolled steps: ``decay ** j`` (1 = uniform)."""
    return [decay ** j for j in range(steps)]


def ttt_loss(step_logits: Sequence[torch.Tensor], draft_ids: torch.Tensor, probs: torch.Tensor,
             target_mask: torch.Tensor, weights: Sequence[float], temperature: float = 1.0) -> TTTLossOutput:
    """Soft CE of every unrolled step against the teacher ``j + 1`` positions ahead of the start.

    Shape: step_logits[j] (B, S, Vd) for starts 0..S-1 (S = T - 1); draft_ids, probs (B, T, k) per target position
    (``teacher_in_draft_vocab``); target_mask (B, T) bool: position t's distribution is a training target (its next
    token is a response token, and the teacher has mass in the draft vocabulary).
    """
    total = step_logits[0].new_zeros((), dtype=torch.float32)
    norm = 0.0
    per_step: dict[int, torch.Tensor] = {}
    accuracy: dict[int, torch.Tensor] = {}
    positions: dict[int, int] = {}
    s = step_logits[0].shape[1]
    for j, (logits, w) in enumerate(zip(step_logits, weights, strict=True)):
        n = s - j  # starts 0..S-1-j have a target at position 1+j..T-1
        if n <= 0:
            break
        z = logits[:, :n].float()
        if temperature != 1.0:
            z = z / temperature
        ids, p, m = draft_ids[:, 1 + j: 1 + j + n], probs[:, 1 + j: 1 + j + n], target_mask[:, 1 + j: 1 + j + n]
        logq = F.log_softmax(z, dim=-1)  # Shape: (B, n, Vd)
        ce = -(p * logq.gather(-1, ids)).sum(-1)  # Shape: (B, n)
        count = int(m.sum())
        positions[j] = count
        if count == 0:
            per_step[j] = total.new_zeros(())
            accuracy[j] = total.new_zeros(())
            continue
        mf = m.float()
        loss_j = (ce * mf).sum() / mf.sum()
        per_step[j] = loss_j.detach()
        top_teacher = ids.gather(-1, p.argmax(-1, keepdim=True)).squeeze(-1)
        accuracy[j] = (((z.argmax(-1) == top_teacher).float() * mf).sum() / mf.sum()).detach()
        total = total + w * loss_j
        norm += w
    loss = total / norm if norm else total
    if temperature != 1.0:
        loss = loss * temperature ** 2
    return TTTLossOutput(loss, per_step, accuracy, positions)
