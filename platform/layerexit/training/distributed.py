"""``torch.distributed`` helpers that also work without it (one process): rank/world and metric reductions."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Sum scalar values across ranks (identity without torch.distributed)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist(), strict=True)}


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    _, world = world_info()
    return {k: v / world for k, v in all_reduce_sum(values).items()}
