"""The learning tests' shared loop: Adam on a mean-squared error toward a reachable target."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

import rankwise as rw


def fit(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    lr: float,
    steps: int = 60,
    params: Iterable[nn.Parameter] | None = None,
) -> list[float]:
    """Train the trainable parameters (or ``params``) for ``steps``; the loss before each step.

    ``rw.step(model)`` follows every optimizer step, as a training loop with step-dependent
    adapters (SingLoRA's ramp) must do.
    """
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rw.step(model)
    return losses
