"""The LITE loss (Varshney et al. 2024): cross-entropy at selected intermediate layers through the model's
own final norm and LM head, averaged with the final layer's loss: ``Loss = sum(w_i * Loss_i) / sum(w_i)``.

Memory: each exit's logits are computed in sequence chunks inside ``torch.utils.checkpoint``, so at most one
chunk of full-vocabulary logits is alive at a time, in the forward and in the backward pass. LITE's peak
memory then stays close to standard fine-tuning, whose logits tensor is one (B, T, V) block.

INVARIANT (ZeRO-3, every loss that calls the LM head, here and in the distillation losses): the number of calls
of ``head`` (and ``norm``) per micro-batch depends only on the batch's SHAPE and the config, never on its data.
Under ZeRO-3 each call of the head module all-gathers its weights collectively, in the forward pass and again when
``torch.utils.checkpoint`` recomputes the chunk in the backward pass, so two ranks that call it a different number
of times deadlock or exchange the wrong tensors. Hence: no "skip a chunk without labels" shortcuts (a label-free
chunk contributes an exact zero instead), no data-dependent branches around head calls, and the training and
evaluation batches are padded to one width agreed by all ranks (``training.loop.epoch_batches``/``eval_batches``),
so equal shapes give equal call counts. A loss that needs a slice of the head (top-k rows) must still go through
a call of the head module or a ``deepspeed.zero.GatheredParameters`` made on every rank: under ZeRO-3 the
parameter itself is an empty shard outside those. ``head_calls_per_micro_batch`` states the count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from layerexit.errors import ConfigError

IGNORE_INDEX = -100
WEIGHT_SCHEMES = ("uniform", "increasing", "final_only")


@dataclass
class LiteLossOutput:
    """Total loss plus the detached per-layer terms (for logging)."""

    loss: torch.Tensor
    per_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    distill: dict[int, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0


def exit_weights(
    exit_layers: Sequence[int], final_layer: int, scheme: str | Sequence[float] = "uniform"
) -> dict[int, float]:
    """Per-layer weights for the loss. ``exit_layers`` excludes the final layer, which is always included.

    ``uniform``: every exit and the final layer weigh 1 (the paper's main setting).
    ``increasing``: 1..N in depth order, the final layer N (paper Appendix C).
    ``final_only``: standard instruction tuning.
    A sequence gives one weight per exit layer followed by the final layer's weight.
    """
    layers = sorted(set(exit_layers))
    if any(l < 1 or l >= final_layer for l in layers):
        bad = [l for l in layers if l < 1 or l >= final_layer]
        raise ConfigError(
            f"exit layers {bad} are outside the model's 1..{final_layer - 1}",
            f"choose intermediate layers between 1 and {final_layer - 1}; the final layer {final_layer} is always added",
        )
    if isinstance(scheme, str):
        if scheme == "final_only":
            return {final_layer: 1.0}
        if scheme == "uniform":
            return {l: 1.0 for l in [*layers, final_layer]}
        if scheme == "increasing":
            return {l: float(i + 1) for i, l in enumerate([*layers, final_layer])}
        raise ConfigError(f"unknown weight scheme {scheme!r}", f"use one of {', '.join(WEIGHT_SCHEMES)} or a list of numbers")
    weights = [float(w) for w in scheme]
    if len(weights) != len(layers) + 1:
        raise ConfigError(
            f"{len(weights)} loss weights given for {len(layers)} exit layers plus the final layer",
            f"give {len(layers) + 1} weights: one per exit layer, then the final layer's",
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("loss weights must be >= 0 with a positive sum", "fix the weights list")
    return dict(zip([*layers, final_layer], weights, strict=True))


def _chunk_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, norm: Callable, head: Callable) -> torch.Tensor:
    # Shape: hidden (B, c, H), labels (B, c) -> scalar sum of token losses
    logits = head(norm(hidden)).float()  # Shape: (B, c, V), freed after this chunk
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_kl_sum(
    hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor, norm: Callable, head: Callable
) -> torch.Tensor:
    # Shape: hidden, teacher_hidden (B, c, H); labels (B, c) selects response positions
    with torch.no_grad():
        teacher = F.log_softmax(head(norm(teacher_hidden)).float(), dim=-1)  # Shape: (B, c, V)
    student = F.log_softmax(head(norm(hidden)).float(), dim=-1)  # Shape: (B, c, V)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # Shape: (B, c)
    return (kl * (labels != IGNORE_INDEX)).sum()


def chunked_exit_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int | None = 128,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over valid tokens for one exit, and the number of valid tokens.

    ``hidden`` is the exit layer's pre-norm output (B, T, H); ``labels`` (B, T) are the unshifted labels with
    -100 on prompt/padding. ``chunk_size=None`` computes all positions at once (reference path).
    """
    # Shape: shift so position t predicts label t+1 -> hidden (B, T-1, H), labels (B, T-1)
    hidden = hidden[:, :-1]
    labels = labels[:, 1:]
    n_valid = int((labels != IGNORE_INDEX).sum())
    if chunk_size is None:
        return _chunk_ce_sum(hidden, labels, norm, head), n_valid
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk_size):
        h = hidden[:, start : start + chunk_size]
        y = labels[:, start : start + chunk_size]
        # A chunk without labels is NOT skipped (it adds an exact 0): the head-call count must not depend on
        # the data (see the module docstring; ZeRO-3 gathers the head's weights collectively on every call).
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h, y, norm, head, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, y, norm, head)
    return total, n_valid


def head_calls_per_micro_batch(seq_len: int, num_weighted_layers: int, chunk_size: int | None,
                                distill: bool = False) -> int:
    """Head calls in the forward pass of :func:`lite_loss` for a (B, ``seq_len``) batch (the backward pass
    recomputes each checkpointed chunk once more). A function of the shape only: the ZeRO-3 invariant."""
    positions = max(seq_len - 1, 0)
    chunks = 1 if chunk_size is None else -(-positions // chunk_size)
    kl_calls = 2 * (num_weighted_layers - 1) * chunks if distill else 0  # teacher + student per exit chunk
    return num_weighted_layers * chunks + kl_calls


def lite_loss(
    hidden_states: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    weights: Mapping[int, float],
    chunk_size: int | None = 128,
    distill_weight: float = 0.0,
) -> LiteLossOutput:
    """Weighted mean of per-layer token-mean cross-entropies (optionally plus exit->final KL).

    ``hidden_states`` maps layer index -> that layer's pre-norm output (B, T, H); it must hold every layer in
    ``weights`` (the deepest one is the final layer). ``labels`` (B, T) are unshifted with -100 on masked
    tokens. With ``distill_weight > 0`` each intermediate exit also gets ``KL(final || exit)`` towards the
    detached final-layer distribution, averaged over response tokens and exits.
    """
    missing = [l for l in weights if l not in hidden_states]
    if missing:
        raise ConfigError(f"hidden states for layers {missing} were not collected", "collect every weighted layer")
    final_layer = max(weights)
    per_layer: dict[int, torch.Tensor] = {}
    total = None
    n_valid = 0
    weight_sum = sum(weights.values())
    for layer in sorted(weights):
        ce_sum, n_valid = chunked_exit_cross_entropy(hidden_states[layer], labels, norm, head, chunk_size)
        layer_loss = ce_sum / max(n_valid, 1)
        per_layer[layer] = layer_loss.detach()
        term = layer_loss * (weights[layer] / weight_sum)
        total = term if total is None else total + term
    distill: dict[int, torch.Tensor] = {}
    if distill_weight > 0:
        teacher = hidden_states[final_layer].detach()[:, :-1]
        shifted = labels[:, 1:]
        exits = [l for l in sorted(weights) if l != final_layer]
        for layer in exits:
            h = hidden_states[layer][:, :-1]
            kl_sum = h.new_zeros((), dtype=torch.float32)
            step = chunk_size or h.shape[1]
            for start in range(0, h.shape[1], step):
                sl = slice(start, start + step)
                if torch.is_grad_enabled() and h.requires_grad:
                    kl_sum = kl_sum + checkpoint(
                        _chunk_kl_sum, h[:, sl], teacher[:, sl], shifted[:, sl], norm, head, use_reentrant=False
                    )
                else:
                    kl_sum = kl_sum + _chunk_kl_sum(h[:, sl], teacher[:, sl], shifted[:, sl], norm, head)
            distill[layer] = kl_sum / max(n_valid, 1)
        if exits:
            total = total + distill_weight * torch.stack(list(distill.values())).mean()
        distill = {k: v.detach() for k, v in distill.items()}
    return LiteLossOutput(loss=total, per_layer=per_layer, distill=distill, num_tokens=n_valid)
