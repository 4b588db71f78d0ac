"""GoRA: per-layer ranks and a first step's worth of ΔW, both from gradients collected before training.

He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation", NeurIPS 2025,
https://arxiv.org/abs/2502.12171; official code hhnqqq/MyTransformers (``common/lora_modules/gora.py``).

    G_i = mean over n batches of ∂L/∂W_i          (base weights, adapters off)
    a_i = mean|W_i ⊙ G_i| / Σ_j mean|W_j ⊙ G_j|
    r_i = clamp(⌊round(budget · a_i) / (in_i + out_i)⌋, r_min, r_max),  budget = Σ_i (in_i + out_i) r_ref
    A_i ~ U(−1/√in, 1/√in),   B_i = −ξ G_i A_iᵀ (A_i A_iᵀ + 1e-8 I)⁻¹,   ξ = γ √(in_i / r_i) / s_i
    so ΔW_0 = s B A = −γ √(in / r) G P_A,  P_A = Aᵀ(AAᵀ)⁻¹A:  a descent step projected onto A's rows.

The sign is the paper's (descent); the official code at HEAD has ``+`` (ascent): ``sign=+1``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..adapters.gora import GoRA as GoRAModule
from ..adapters.lora import LoRA, LoRAConfig
from ..core import geometry, quantized
from ..core.adapted import Adapted
from ..core.checks import check_number
from ..core.distributed import from_rank_zero, mean_across_ranks
from ..core.inject import adapted_modules
from .base import History

PINV_RIDGE = 1e-8  # (A Aᵀ + 1e-8 I)⁻¹: the official code's regularized pseudo-inverse


@dataclass(frozen=True)
class GoRAAllocation:
    """What :func:`gora` decided.

    Args:
        ranks: each layer's rank r_i.
        importance: each layer's normalized importance a_i (they sum to 1).
        params: adapter parameters of the chosen ranks, ``Σ r_i (in_i + out_i)``.
        budget: the parameters asked for.
    """

    ranks: dict[str, int]
    importance: dict[str, float]
    params: int
    budget: int

    @property
    def history(self) -> History:
        """The allocation as a one-step :class:`~rankwise.allocate.base.History` (for ``summary``)."""
        history = History(tuple(self.ranks), "parameters")
        history.record(0, dict(self.ranks), self.params, self.budget)
        return history


def allocate_ranks(
    importance: Sequence[float], sizes: Sequence[int], budget: int, r_min: int, r_max: Sequence[int]
) -> list[int]:
    """GoRA's rule: ``r_i = clamp(⌊round(budget · a_i) / size_i⌋, r_min, r_max_i)``.

    Args:
        importance: I_i per layer, >= 0, not all 0.
        sizes: in_i + out_i per layer (the parameters one rank costs).
        budget: the parameters to share out.
        r_min: the smallest rank.
        r_max: the largest rank of each layer (it wins over ``r_min``).

    Raises:
        ValueError: every importance is 0 (the batches gave no gradient).
    """
    total = sum(importance)
    if not total > 0:
        raise ValueError("GoRA: every layer's importance is 0; the batches gave no gradient to the target weights")
    return [
        min(max(math.floor(round(budget * i / total) / size), r_min), cap)
        for i, size, cap in zip(importance, sizes, r_max, strict=True)
    ]


def gora(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    budget: int | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
    step_size: float = 5e-2,
    sign: Literal[-1, 1] = -1,
    seed: int = 0,
) -> GoRAAllocation:
    """Choose each layer's rank and initialize its adapter from gradients (GoRA), before training.

    Call it on a freshly adapted model (``GoRAConfig`` or ``LoRAConfig``; ``rank`` is r_ref) and
    build the optimizer afterwards: every adapter is replaced. The batches run in the model's
    current mode (``model.train()`` for dropout, as the official collection does). Under DDP call it on every process
    before wrapping the model, each with its own share of the batches: the gradients are averaged
    across processes at every batch and the ranks and factors are taken from process 0.

    Args:
        model: the adapted model; its adapters must be untouched (B = 0), so that the forward
            passes are the pretrained model's.
        batches: the n batches to average gradients over (the official scripts use 32 or 64).
        budget: adapter parameters to share out; default ``Σ_i (in_i + out_i) · r_ref``, uniform
            LoRA at the config's rank.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss`` for
            mapping batches (transformers models).
        r_min: smallest rank, >= 1; default ``max(1, r_ref // 2)`` (the LLaMA scripts' 4 at r_ref 8).
        r_max: largest rank; default ``4 · r_ref`` (the scripts' 32 at r_ref 8). A layer's rank
            never exceeds its in_features, where ``A Aᵀ`` stops being invertible.
        step_size: γ, the size of the initial step; > 0. 5e-2 (LLaMA scripts, ``--gora-lr``).
        sign: -1, descent (paper); +1 reproduces the official code's ascent.
        seed: seeds the random A of every layer (the same on every process).

    Returns:
        The ranks, importances and parameter count; a ``UserWarning`` says when ``r_min`` pushed
        the count over the budget.

    Raises:
        ValueError: no batch, a trained or merged adapter, an argument out of range.
        TypeError: an adapter that is not LoRA-shaped or sits on a layer GoRA does not start (an
            embedding, a quantized base with no weight gradient), or a batch the default ``loss_fn``
            cannot use.
    """
    layers = dict(adapted_modules(model))
    if not layers:
        raise ValueError("gora: the model has no rankwise adapters; call rankwise.adapt first")
    for path, layer in layers.items():
        if not isinstance(layer.delta, LoRA):
            raise TypeError(f"gora sets LoRA factors; '{path}' holds {type(layer.delta).__name__}")
        if layer.kind not in GoRAModule.supported_bases:  # a LoRAConfig model may hold an embedding
            raise TypeError(
                f"gora: '{path}' is a {type(layer.base).__name__}; GoRA starts only "
                f"{sorted(GoRAModule.supported_bases)} layers (see docs/methods/gora.md)"
            )
        if layer.merged or layer.delta.B.abs().max() > 0:
            raise ValueError(f"gora runs on a freshly adapted model; '{path}' is merged or already trained")
        if quantized.is_quantized(layer.base):
            # The gradient of a packed weight does not exist; GoRA's start is built from ∂L/∂W0.
            raise TypeError(
                f"gora reads the gradient of each base weight; '{path}' is quantized "
                f"({quantized.scheme(layer.base, path)}) and has none. Run gora on the float model, or train "
                "the quantized one from LoRA's start (B = 0) without gora"
            )
    first = next(iter(layers.values())).config
    assert isinstance(first, LoRAConfig)  # the config that built the LoRA adapters checked above
    r_ref = first.rank
    r_min = max(1, r_ref // 2) if r_min is None else r_min
    r_max = 4 * r_ref if r_max is None else r_max
    check_number("gora", "r_min", r_min, 1, integer=True)
    check_number("gora", "r_max", r_max, r_min, integer=True)
    check_number("gora", "seed", seed, 0, integer=True)
    if sign not in (-1, 1):
        raise ValueError(f"gora: sign={sign!r} must be -1 (descent) or 1 (the official code)")
    check_number("gora", "step_size", step_size, 0, low_open=True)
    sizes = [layer.delta.in_features + layer.delta.out_features for layer in layers.values()]
    budget = (
        sum(s * layer.delta.config.rank for s, layer in zip(sizes, layers.values(), strict=True))
        if budget is None
        else budget
    )
    check_number("gora", "budget", budget, 1, integer=True)

    gradients = _mean_gradients(model, layers, batches, loss_fn or _model_loss)
    importance = [_importance(layer, gradients[path]) for path, layer in layers.items()]
    caps = [min(r_max, layer.delta.in_features) for layer in layers.values()]
    ranks = allocate_ranks(importance, sizes, budget, r_min, caps)
    ranks = from_rank_zero(torch.tensor(ranks, device=_device(layers))).cpu().tolist()
    for index, ((path, layer), rank) in enumerate(zip(layers.items(), ranks, strict=True)):
        _initialize(layer, gradients.pop(path), rank, step_size, sign, seed + index)
    params = sum(r * s for r, s in zip(ranks, sizes, strict=True))
    if params > budget:
        warnings.warn(
            f"gora: r_min={r_min} puts the adapters at {params} parameters, over the budget of {budget}", stacklevel=2
        )
    total = sum(importance)
    return GoRAAllocation(
        dict(zip(layers, ranks, strict=True)),
        {p: i / total for p, i in zip(layers, importance, strict=True)},
        params,
        budget,
    )


def _model_loss(model: nn.Module, batch: Any) -> Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"gora: batches of type {type(batch).__name__} need a loss_fn(model, batch)")
    return model(**batch).loss


def _importance(layer: Adapted, gradient: Tensor) -> float:
    """``mean|W ⊙ G|``: the paper's avg(|W ⊙ G|), the scripts' ``union_mean`` (not the CLI's
    default Frobenius norm)."""
    weight = geometry.weight_matrix(layer.base, layer.kind).detach()
    return float((weight.float().cpu() * gradient).abs().mean())


def _device(layers: dict[str, Adapted]) -> torch.device:
    return next(iter(layers.values())).weight.device


def _mean_gradients(
    model: nn.Module, layers: dict[str, Adapted], batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor]
) -> dict[str, Tensor]:
    """``(1/n) Σ ∂L/∂W`` per target layer as (out, in) fp32 on the CPU; only target weights train."""
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {path: torch.zeros(layer.delta.out_features, layer.delta.in_features) for path, layer in layers.items()}
    count = 0
    try:
        model.requires_grad_(False)
        for layer in layers.values():
            geometry.layer_weight(layer.base).requires_grad_(True)
        for batch in batches:
            loss_fn(model, batch).backward()
            for path, layer in layers.items():
                weight = geometry.layer_weight(layer.base)
                if weight.grad is None:
                    raise ValueError(f"gora: '{path}' got no gradient from the loss; target layers the loss depends on")
                # Averaged over processes at every batch, as the official hook does.
                grad = geometry.as_matrix(weight.grad, layer.kind)
                sums[path] += mean_across_ranks(grad.float()).cpu()
                weight.grad = None  # the running mean is on the CPU: free the device copy
            count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if count == 0:
        raise ValueError("gora: batches is empty; pass the n batches to collect gradients from")
    return {path: total / count for path, total in sums.items()}


def _initialize(layer: Adapted, gradient: Tensor, rank: int, step_size: float, sign: int, seed: int) -> None:
    """Replace the layer's adapter by one of ``rank`` with ``s B A = sign · γ √(in/r) · G P_A``."""
    old = layer.delta
    assert isinstance(old, LoRA)  # gora checked every layer's adapter
    config = dataclasses.replace(old.config, rank=rank)
    in_features = old.in_features
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)  # kaiming-uniform with a = √5, as LoRA's A
    A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound  # fp32, CPU
    with torch.random.fork_rng(devices=[]):  # the constructor's own random A is overwritten: keep the caller's RNG
        new = type(old)(torch.zeros(old.out_features, in_features, dtype=old.A.dtype), config)
    xi = step_size * math.sqrt(in_features / rank) / new.scale
    # G Aᵀ (A Aᵀ + εI)⁻¹ = ((A Aᵀ + εI)⁻¹ A Gᵀ)ᵀ, since A Aᵀ is symmetric: a solve, not an inverse.
    B = sign * xi * torch.linalg.solve(A @ A.t() + PINV_RIDGE * torch.eye(rank), A @ gradient.t()).t()
    device = old.A.device
    new = new.to(device=device, dtype=old.A.dtype)
    with torch.no_grad():
        new.A.copy_(from_rank_zero(A.to(device)))
        new.B.copy_(from_rank_zero(B.to(device)))
    new.train(old.training)
    layer.replace_delta(new)


# The method declares its data-driven start; declared from here because allocate imports adapters,
# not the other way.
GoRAModule.initializer = staticmethod(gora)
