"""Keeping replicas in step under torch.distributed: rank allocators and compressors take their
decisions (ranks, masks, truncations) from statistics every process agrees on, so that every
replica changes identically even where kernels or SVDs round differently across devices.

Without torch.distributed (absent, or no process group initialized) each function returns its
argument; otherwise a new tensor, even in a one-process group (so that a test can run the
collectives on one machine). The argument itself is never written.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes in the default group; 1 without ``torch.distributed``."""
    return dist.get_world_size() if _initialized() else 1


def sum_across_ranks(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all processes (each process's own shard of a statistic)."""
    if not _initialized():
        return tensor
    total = tensor.detach().clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def mean_across_ranks(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over all processes."""
    if not _initialized():
        return tensor
    return sum_across_ranks(tensor) / world_size()


def from_rank_zero(tensor: Tensor) -> Tensor:
    """Rank 0's copy of a decision, so that ties and rounding cannot make processes disagree."""
    if not _initialized():
        return tensor
    shared = tensor.detach().clone().contiguous()
    dist.broadcast(shared, src=0)
    return shared


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()
