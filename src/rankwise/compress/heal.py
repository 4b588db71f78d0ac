"""Healing: a short fine-tune of a compressed model that keeps every rank the compression chose.

A one-shot compression loses what the calibration statistics could not see; a few hundred steps on
in-domain text recover part of it. Either the model's linear layers train themselves (the factors
``U``, ``V`` of each low-rank layer, and the dense layers), or an adapter is attached to them and
merged back at the end. An adapter on a factor is merged into that factor: ``U`` and ``V`` keep
their shapes, so ``U V`` keeps its rank with no re-factoring. Apply the same call to the
uncompressed model to tell recovery from domain adaptation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..core import targets as core_targets
from ..core.checks import check_number
from ..core.config import ALL_LINEAR, AdapterConfig
from ..core.inject import adapt, unwrap
from .batches import LossFn, batch_loss, forward
from .layers import LowRankConv2d, LowRankLinear


def heal(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    config: AdapterConfig | None = None,
    steps: int,
    lr: float,
    loss: LossFn | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune ``model`` for ``steps`` AdamW steps (cosine learning rate), in place.

    Args:
        model: a model compressed by :func:`rankwise.compress.lord` (or an uncompressed one, as the
            reference the healed model must be compared with).
        batches: the training batches, taken in order and repeated as needed; each passed as in
            :func:`rankwise.compress.calibrate`.
        config: an adapter config (``rw.LoRAConfig(targets=("all-linear",))`` adapts every factor
            and every dense linear layer), merged into the layers at the end; ``None`` trains the
            weights of every linear layer but the output embedding (``"all-linear"``) directly.
        steps: optimizer steps, >= 1.
        lr: the peak learning rate, > 0.
        loss: ``loss(output, batch)``; by default the output's ``loss`` (a transformers model given
            ``labels``).
        progress: called after each step with (step, loss).

    Returns:
        The training loss of every step. The low-rank layers keep their ranks; which parameters
        require grad is as before.

    Raises:
        ValueError: ``steps`` or ``lr`` out of range, no batches, or a batch that gives no loss. A
            run that fails drops its adapters unmerged and restores the ``requires_grad`` flags;
            steps already taken on the layers themselves (``config=None``) stay.
    """
    check_number("heal", "steps", steps, 1, integer=True)
    check_number("heal", "lr", lr, 0, low_open=True)
    batches = list(batches)
    if not batches:
        raise ValueError("heal: no batches to train on")
    ranks = _ranks(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    if config is None:
        paths = core_targets.select(model, (ALL_LINEAR,), owner="heal")
        model.requires_grad_(False)
        for path in paths:
            model.get_submodule(path).requires_grad_(True)
    else:
        model = adapt(model, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    losses = []
    model.train()
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            value = batch_loss(forward(model, batch), batch, loss)
            if value is None:
                raise ValueError("heal: the batch gives no loss; pass batches with labels or loss=")
            value.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value.item())
            if progress is not None:
                progress(step + 1, losses[-1])
    except BaseException:
        if config is not None:
            model = unwrap(model, merge=False)  # a failed run drops the adapters, merging nothing
        raise
    else:
        if config is not None:
            model = unwrap(model, merge=True)
    finally:
        model.train(was_training)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    assert _ranks(model) == ranks, "healing changed a rank"
    return losses


def _ranks(model: nn.Module) -> dict[str, int]:
    return {path: m.rank for path, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))}
