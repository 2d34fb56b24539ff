"""Distillation losses for exits: KL from a teacher's top-k distribution to an exit, never a full-vocabulary
softmax at every position.

The teacher (the frozen base model's final layer) is stored as its top-k token ids and their log-probabilities
at temperature T (``teacher_topk``). The rest of the vocabulary is one "other" bucket holding the teacher's
residual mass ``1 - sum(top-k)``. An exit is scored on the k rows of the LM head only; a fixed share of
positions (every ``full_every``-th) also runs the full head, which gives the student's exact normaliser and so
a KL over the k + 1 buckets (this is what keeps the exit's confidence calibrated: probability the student puts
outside the teacher's top-k is penalised there). The other positions get the KL between the teacher and
student distributions restricted (renormalised) to the k ids.

The number of full-head calls per chunk depends only on the chunk's shape, never on the data (ZeRO-3 gathers
the head's weights collectively per call, so a data-dependent count would deadlock ranks).

All KLs are multiplied by T**2 (Hinton et al.), so the gradient scale does not shrink with temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layerexit.errors import ConfigError

_TINY = 1e-12


def check_distill_settings(k: int, vocab_size: int, temperature: float) -> None:
    """Reject settings the losses cannot honour (names the config field)."""
    if not 1 <= k <= vocab_size:
        raise ConfigError(f"distill.top_k={k} is outside 1..{vocab_size} (the model's vocabulary)",
                          f"choose a k between 1 and {vocab_size}, e.g. 64")
    if not temperature > 0:
        raise ConfigError(f"distill.temperature={temperature} must be > 0", "use 1.0 (the teacher as is) or e.g. 2.0")


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k ids and their log-probabilities at ``temperature`` (normalised over the full vocab)."""
    # Shape: logits (N, V) -> ids (N, k) long, logp (N, k) float32
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    top = logp.topk(k, dim=-1)
    return top.indices, top.values


def topk_kl(student_topk: torch.Tensor, teacher_logp: torch.Tensor, temperature: float = 1.0,
            student_lse: torch.Tensor | None = None, include_other: bool = True) -> torch.Tensor:
    """Per-position KL(teacher || student) from the student's logits on the teacher's top-k ids.

    ``student_lse`` (the logsumexp of the student's full-vocabulary logits / T) given: KL over the k ids plus
    the "other" bucket (exact). Not given: KL between both distributions restricted to the k ids.
    ``include_other=False`` drops the bucket (k = vocabulary: nothing is outside the top-k).
    """
    # Shape: student_topk (N, k) logits, teacher_logp (N, k), student_lse (N,) -> (N,)
    z = student_topk.float() / temperature
    t = teacher_logp.float()
    if student_lse is None:
        t_r = t - torch.logsumexp(t, dim=-1, keepdim=True)  # Shape: (N, k) renormalised teacher
        s_r = z - torch.logsumexp(z, dim=-1, keepdim=True)  # Shape: (N, k) renormalised student
        return (t_r.exp() * (t_r - s_r)).sum(-1) * temperature**2
    s = z - student_lse.float().unsqueeze(-1)  # Shape: (N, k) student log-probs over the full vocab
    kl = (t.exp() * (t - s)).sum(-1)  # Shape: (N,)
    if include_other:
        p_other = (1.0 - t.exp().sum(-1)).clamp_min(0.0)  # Shape: (N,)
        q_other = (1.0 - s.exp().sum(-1)).clamp_min(_TINY)
        kl = kl + p_other * (torch.log(p_other.clamp_min(_TINY)) - torch.log(q_other))
    return kl * temperature**2


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(teacher || student) over the whole vocabulary (the reference the top-k loss approximates)."""
    # Shape: student_logits, teacher_logits (N, V) -> (N,)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def full_rows(n: int, full_every: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask of the positions (0..n-1) that run the full head: every ``full_every``-th; a function of
    ``n`` only, so every rank makes the same number of head calls."""
    # Shape: (n,)
    idx = torch.arange(n, device=device)
    return (idx % max(1, full_every)) == 0 if full_every > 0 else torch.zeros(n, dtype=torch.bool, device=device)


def _chunk_kl_sum(hidden: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor,
                  norm: Callable, head_weight: torch.Tensor, temperature: float, full_every: int) -> torch.Tensor:
    # Shape: hidden (c, H), ids (c, k), logp (c, k), mask (c,) -> scalar sum of masked KLs
    c, k = ids.shape
    vocab = head_weight.shape[0]
    h = norm(hidden)  # Shape: (c, H)
    # Shape: the k head rows each position is scored on: (c, k, H) x (c, H) -> (c, k)
    z_k = torch.einsum("ckh,ch->ck", head_weight[ids].to(h.dtype), h)
    total = hidden.new_zeros((), dtype=torch.float32)
    rows = full_rows(c, full_every, hidden.device)
    n_full = int(rows.sum())  # shape-only: same on every rank
    if n_full:
        h_full = h[rows]  # Shape: (f, H)
        logits = F.linear(h_full, head_weight.to(h.dtype)).float()  # Shape: (f, V), the full head on f rows
        lse = torch.logsumexp(logits / temperature, dim=-1)  # Shape: (f,)
        z_full = logits.gather(-1, ids[rows])  # Shape: (f, k), consistent with lse
        kl = topk_kl(z_full, logp[rows], temperature, lse, include_other=k < vocab)
        total = total + (kl * mask[rows]).sum()
    if n_full < c:
        kl = topk_kl(z_k[~rows], logp[~rows], temperature)
        total = total + (kl * mask[~rows]).sum()
    return total


def distill_kl_sum(hidden: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                   mask: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], head_weight: torch.Tensor,
                   temperature: float = 1.0, full_every: int = 8, chunk_size: int | None = 256) -> torch.Tensor:
    """Sum over masked positions of the top-k KL for one exit (``hidden`` is pre-norm, already through the exit's
    adapter if it has one). Chunks of ``chunk_size`` positions run under activation checkpointing, so only one
    chunk's head rows are alive at a time; the chunk count depends on the number of positions only.

    ``full_every=1`` runs the full head everywhere (exact (k+1)-bucket KL; with k = vocabulary this is the
    full-softmax KL); ``0`` never does (restricted KL only).
    """
    # Shape: hidden (N, H), teacher_ids (N, k), teacher_logp (N, k), mask (N,) -> scalar
    n = hidden.shape[0]
    step = chunk_size or max(n, 1)
    mask = mask.to(torch.float32)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        args = (hidden[sl], teacher_ids[sl], teacher_logp[sl], mask[sl], norm, head_weight, temperature, full_every)
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_kl_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(*args)
    return total


@dataclass
class DistillLossOutput:
    """Total loss plus detached per-exit KLs and the anchor (for logging)."""

    loss: torch.Tensor
    per_layer: dict[int, torch.Tensor]
    anchor: torch.Tensor | None = None
    num_positions: int = 0


def distill_loss(exit_hidden: dict[int, torch.Tensor], teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                 mask: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], head_weight: torch.Tensor,
                 weights: dict[int, float], temperature: float = 1.0, full_every: int = 8,
                 chunk_size: int | None = 256, final_hidden: torch.Tensor | None = None,
                 anchor_weight: float = 0.0) -> DistillLossOutput:
    """Weighted mean over exits of the top-k KL to the teacher, plus ``anchor_weight`` x the same KL at the final
    layer (``final_hidden``), which keeps a fully fine-tuned final layer on the base model's distribution.

    ``exit_hidden`` maps layer -> (N, H) pre-norm states (through the adapter when there is one); every other
    tensor is per position: ``teacher_ids``/``teacher_logp`` (N, k), ``mask`` (N,) 1 where the position counts.
    """
    # Shape: each exit (N, H); teacher (N, k); mask (N,) -> scalar
    missing = [l for l in weights if l not in exit_hidden]
    if missing:
        raise ConfigError(f"no hidden states for exit layers {missing}", "collect every weighted exit layer")
    n_valid = float(mask.sum())
    denom = max(n_valid, 1.0)
    wsum = sum(weights.values()) or 1.0
    per_layer: dict[int, torch.Tensor] = {}
    total = None
    for layer in sorted(weights):
        kl = distill_kl_sum(exit_hidden[layer], teacher_ids, teacher_logp, mask, norm, head_weight, temperature,
                            full_every, chunk_size) / denom
        per_layer[layer] = kl.detach()
        term = kl * (weights[layer] / wsum)
        total = term if total is None else total + term
    if total is None:
        total = next(iter(exit_hidden.values())).new_zeros((), dtype=torch.float32)
    anchor = None
    if final_hidden is not None and anchor_weight > 0:
        anchor = distill_kl_sum(final_hidden, teacher_ids, teacher_logp, mask, norm, head_weight, temperature,
                                full_every, chunk_size) / denom
        total = total + anchor_weight * anchor
        anchor = anchor.detach()
    return DistillLossOutput(total, per_layer, anchor, int(n_valid))
