"""Held-out evaluation during training: exit losses on the eval split, and every layer's alignment with the
final layer on generated answers (each rank takes its share of the prompts; reports merged)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from layerexit.evaluation.alignment import AlignmentReport, LayerAlignment, alignment_from_generations
from layerexit.losses import chunked_exit_cross_entropy
from layerexit.models.exits import collect_hidden_states, decoder_parts, exit_hidden
from layerexit.training.distributed import all_reduce_sum, world_info


@torch.no_grad()
def exit_losses(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], layers: Sequence[int],
                chunk_size: int | None = 128, autocast: bool = False) -> dict[int, tuple[float, int]]:
    """Per-layer (sum of token cross-entropies, token count) over batches, through the final norm and LM head."""
    parts = decoder_parts(model)
    sums = {l: 0.0 for l in layers}
    count = 0
    for batch in batches:
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            hidden = collect_hidden_states(model, batch["input_ids"], layers, batch["attention_mask"])
            n = 0
            for l in layers:
                h = exit_hidden(parts, l, hidden[l])  # through the exit's adapter when it has one
                s, n = chunked_exit_cross_entropy(h, batch["labels"], parts.norm, parts.head, chunk_size)
                sums[l] += float(s)
        count += n
    return {l: (sums[l], count) for l in layers}


def eval_loss_metrics(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], layers: Sequence[int],
                      weights: Mapping[int, float], chunk_size: int | None = 128,
                      autocast: bool = False) -> dict[str, float]:
    """``eval/loss_l{l:02d}`` per layer (token-mean over all ranks) and ``eval/loss`` (LITE-weighted over ``weights``)."""
    need = sorted(set(layers) | set(weights))
    local = exit_losses(model, batches, need, chunk_size, autocast)
    flat = {f"s{l}": s for l, (s, _) in local.items()}
    flat["n"] = next(iter(local.values()))[1] if local else 0
    total = all_reduce_sum(flat)
    n = max(total["n"], 1.0)
    per_layer = {l: total[f"s{l}"] / n for l in need}
    metrics = {f"eval/loss_l{l:02d}": per_layer[l] for l in sorted(layers)}
    wsum = sum(weights.values())
    metrics["eval/loss"] = sum(per_layer[l] * w for l, w in weights.items()) / wsum
    metrics["eval/tokens"] = total["n"]
    return metrics


def merge_alignment_reports(reports: Sequence[AlignmentReport | None]) -> AlignmentReport | None:
    """Combine reports computed on disjoint prompt shards (token-weighted)."""
    reports = [r for r in reports if r is not None and r.num_tokens > 0]
    if not reports:
        return None
    first = reports[0]
    rows = []
    for i, row in enumerate(first.rows):
        parts = [r.rows[i] for r in reports]
        tokens = sum(p.tokens for p in parts)
        bins = len(row.bin_counts)
        counts = [sum(p.bin_counts[b] for p in parts) for b in range(bins)]
        matched = [sum((p.bin_alignment[b] or 0.0) * p.bin_counts[b] for p in parts) for b in range(bins)]
        rows.append(LayerAlignment(
            layer=row.layer,
            alignment=sum(p.alignment * p.tokens for p in parts) / tokens if tokens else 0.0,
            mean_confidence=sum(p.mean_confidence * p.tokens for p in parts) / tokens if tokens else 0.0,
            tokens=tokens,
            bin_counts=counts,
            bin_alignment=[m / c if c else None for m, c in zip(matched, counts, strict=True)],
        ))
    return AlignmentReport(num_layers=first.num_layers, num_prompts=sum(r.num_prompts for r in reports),
                           num_tokens=sum(r.num_tokens for r in reports), bin_edges=first.bin_edges, rows=rows)


def sharded_alignment(model: nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                      eos: set[int], batch_size: int = 8) -> AlignmentReport | None:
    """Alignment of every layer with the final layer; each rank takes every world-th prompt, results merged."""
    from layerexit.engine.reference import hf_greedy_generate_batched

    rank, world = world_info()
    mine = [list(p) for p in prompt_ids[rank::world]]
    report = None
    if mine:
        responses = hf_greedy_generate_batched(model, mine, max_new_tokens, pad_id, batch_size=batch_size, eos=eos,
                                               show_progress=False)
        report = alignment_from_generations(model, mine, responses, show_progress=False)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        return merge_alignment_reports(gathered)
    return merge_alignment_reports([report])


def alignment_metrics(report: AlignmentReport | None, conf_layers: Sequence[int] = ()) -> dict[str, float]:
    """``align/l{l:02d}`` for every layer and ``conf/l{l:02d}`` (zero-padded: the MLflow UI sorts them by layer) (mean top-1 probability) for ``conf_layers``."""
    if report is None:
        return {}
    out = {f"align/l{r.layer:02d}": r.alignment for r in report.rows}
    out.update({f"conf/l{r.layer:02d}": r.mean_confidence for r in report.rows if r.layer in conf_layers})
    return out
