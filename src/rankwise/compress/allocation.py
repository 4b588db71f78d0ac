"""One parameter budget for all target layers: each layer's rank from what its directions are worth.

A layer compressed to rank r keeps the top r eigenvectors ``q_i`` of its calibration output moment
``C = E[z zᵀ]`` (:func:`rankwise.compress.lord`). Dropping direction i changes the output by
``q_i q_iᵀ z``, and to second order, with the Fisher approximation of the loss curvature and the
output independent of its gradient ``g = ∂L/∂z``, the loss by ``½ λ_i · q_iᵀ E[g gᵀ] q_i``. That
product is the direction's score: a layer's output energy alone says nothing about how much the
loss needs it (an energy-only allocation did worse than one uniform ratio on SmolLM2). Every
direction costs ``in + out`` parameters, so the allocation keeps the directions of highest score
per parameter across all layers until the budget is spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def break_even(rows: int, cols: int) -> int:
    """The smallest rank whose two factors hold at least as many weights as the dense matrix."""
    return math.ceil(rows * cols / (rows + cols))


def allocate_ranks(sizes: Mapping[str, tuple[int, int]], scores: Mapping[str, Tensor], budget: int) -> dict[str, int]:
    """Each layer's rank under one budget of weights, greedily by score per parameter.

    Every layer starts at rank 1. Directions are then taken in order of ``score / (rows + cols)``,
    highest first, until the next one would exceed ``budget``. A layer's ranks are prefixes of its
    eigenvector order, so its scores are first made non-increasing (a running minimum: a direction
    is worth no more than the weakest one it needs before it). A layer that reaches its break-even
    rank is dense from then on and costs ``rows · cols``, which is what the budget counts.

    Args:
        sizes: each layer's (rows, cols), the matrix the factors approximate.
        scores: each layer's direction scores (at least ``min(rows, cols)`` of them), in the
            order the factors keep them.
        budget: weights the layers may hold in all (factors, or dense weights of dense layers).

    Returns:
        Each layer's rank; ``min(rows, cols)`` for a layer that stays dense.

    Raises:
        ValueError: the budget is below rank 1 in every layer.
    """
    ranks = dict.fromkeys(sizes, 1)
    total = sum(rows + cols for rows, cols in sizes.values())
    if total > budget:
        raise ValueError(f"a budget of {budget:,} weights is below rank 1 in every layer ({total:,})")
    candidates = []
    for path, (rows, cols) in sizes.items():
        monotone = torch.cummin(scores[path][: min(rows, cols)].double().clamp_min(0), dim=0).values
        density = (monotone / (rows + cols)).tolist()
        candidates += [(-density[i], i, path) for i in range(1, break_even(rows, cols))]
    candidates.sort()
    dense = set()
    for _, _, path in candidates:
        if path in dense:
            continue
        rows, cols = sizes[path]
        rank = ranks[path] + 1
        becomes_dense = rank >= break_even(rows, cols)
        step = rows * cols - ranks[path] * (rows + cols) if becomes_dense else rows + cols
        if total + step > budget:
            break
        total += step
        ranks[path] = rank
        if becomes_dense:
            dense.add(path)
            ranks[path] = min(rows, cols)
    return ranks
