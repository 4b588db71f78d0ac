"""Healing: a short fine-tune of a compressed model that keeps every rank the compression chose.

A one-shot compression loses what the calibration statistics could not see; a few hundred steps on
in-domain text recover part of it. Either the model's linear layers train themselves (the factors
``U``, ``V`` of each low-rank layer, and the dense layers), or an adapter is attached to them and
merged back at the end. An adapter on a factor is merged into that factor: ``U`` and ``V`` keep
their shapes, so ``U V`` keeps its rank with no re-factoring. Apply the same call to the
uncompressed model to tell recovery from domain adaptation.

With a ``teacher`` (the uncompressed model, or that model given the same fine-tune), the loss is
the teacher's token distributions instead of, or beside, the labels: knowledge distillation,
a dense signal per token where the labels give one token each (Hinton et al., 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
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
        teacher: a model whose output distribution over the same batches the model learns
            (KL(teacher ‖ model) per position, averaged over the positions the batch's
            ``attention_mask`` keeps, or all); run in eval mode without gradients. Its output and
            the model's must be logits (a tensor, or an output with ``logits``) of one shape.
        distill_weight: the loss is ``distill_weight · KL + (1 − distill_weight) · task loss``; in
            [0, 1], used only with a ``teacher``. At 1 (the default) no labels are needed.
        progress: called after each step with (step, loss).

    Returns:
        The training loss of every step. The low-rank layers keep their ranks; which parameters
        require grad is as before.

    Raises:
        ValueError: ``steps`` or ``lr`` out of range, no batches, a batch that gives no loss, or a
            ``teacher`` that shares parameters with the model (it would move with it). A
            run that fails drops its adapters unmerged and restores the ``requires_grad`` flags;
            steps already taken on the layers themselves (``config=None``) stay.
    """
    check_number("heal", "steps", steps, 1, integer=True)
    check_number("heal", "lr", lr, 0, low_open=True)
    check_number("heal", "distill_weight", distill_weight, 0, 1)
    if teacher is not None and {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
        # A teacher that is the model (compressed in place), or holds its layers, moves with it:
        # the distillation loss would be ~0 and the run would heal nothing, without an error.
        raise ValueError(
            "heal: the teacher shares parameters with the model (is it the model itself, compressed in "
            "place?); pass the uncompressed model as a separate copy (copy.deepcopy before compressing)"
        )
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
            value = _step_loss(model, batch, loss, teacher, distill_weight)
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


def _step_loss(
    model: nn.Module, batch: Any, loss: LossFn | None, teacher: nn.Module | None, distill_weight: float
) -> Tensor:
    output = forward(model, batch)
    task_weight = 1.0 if teacher is None else 1 - distill_weight
    task = batch_loss(output, batch, loss) if task_weight > 0 else None
    if task is None and task_weight > 0:
        raise ValueError("heal: the batch gives no loss; pass batches with labels or loss=, or a teacher")
    if teacher is None:
        assert task is not None
        return task
    was_training = teacher.training
    with torch.no_grad():
        target = _logits(forward(teacher.eval(), batch), "teacher")
    teacher.train(was_training)
    distill = distillation_loss(_logits(output, "model"), target, _attention_mask(batch))
    return distill if task is None else distill_weight * distill + task_weight * task


def distillation_loss(logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ model) of the distributions over the last dimension, averaged over positions
    (those where ``mask`` is nonzero, when given)."""
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"heal: the model's logits {tuple(logits.shape)} and the teacher's "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_q = F.log_softmax(teacher_logits.float(), dim=-1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)
    if mask is None:
        return per_position.mean()
    keep = mask.to(per_position.dtype)
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


def _logits(output: Any, whose: str) -> Tensor:
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(f"heal: the {whose}'s output has no logits to distil ({type(output).__name__})")
    return logits


def _attention_mask(batch: Any) -> Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, Tensor) else None


def _ranks(model: nn.Module) -> dict[str, int]:
    return {path: m.rank for path, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))}
