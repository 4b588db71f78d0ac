"""LoRD: one-shot low-rank decomposition of a trained model's linear layers.

Kaushal, Vaidhya, Rish, "LoRD: Low Rank Decomposition of Monolingual Code LLMs for One-Shot
Compression", https://arxiv.org/abs/2309.14021. ``y = W x + b`` becomes ``y = B(A x) + b`` with no
training, and the result stays a dense, trainable model (adapters and quantization still apply).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import check_number
from ..core.config import ALL_LINEAR
from ..core.distributed import sum_across_ranks
from ..core.geometry import BaseKind, check_supported, layer_bias
from ..decompose import rank_for_energy
from .allocation import allocate_ranks
from .batches import LossFn, batch_loss, forward
from .layers import LowRankLayer, from_factors, scheme_matrix, svd_factors
from .replace import replace_layers, select_layers
from .report import CompressionReport, LayerReport, layer_report, saves_parameters


@dataclass
class Calibration:
    """Each layer's output second moment ``C = (1/N) Σ z zᵀ`` (float64), from :func:`calibrate`,
    and, where a loss was available, the second moment of the loss gradient at the output
    ``G = (1/N) Σ g gᵀ``, ``g = ∂L/∂z`` (what :func:`lord`'s ``params`` allocation weighs by).

    Eigendecompositions are computed on first use and kept, so a sweep over rank ratios or budgets
    (each on a fresh copy of the model) pays for the calibration pass and the ``eigh`` calls once.
    """

    moments: dict[str, Tensor]
    gradients: dict[str, Tensor] | None = None
    _eigen: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def eigen(self, path: str) -> tuple[Tensor, Tensor]:
        """``(λ, Q)`` of layer ``path``'s moment, eigenvalues descending (clamped at 0)."""
        if path not in self._eigen:
            values, vectors = torch.linalg.eigh(self.moments[path])  # ascending
            self._eigen[path] = values.flip(0).clamp_min(0), vectors.flip(1)
        return self._eigen[path]

    def scores(self, path: str) -> Tensor:
        """Each eigen-direction's estimated loss increase if dropped, ``λ_i · q_iᵀ G q_i``
        (``rankwise.compress.allocation``), in the order of :meth:`eigen`.

        Raises:
            ValueError: the calibration had no loss, so no gradient moments.
        """
        if self.gradients is None:
            raise ValueError(
                "the calibration has no gradient statistics: calibrate with batches whose output "
                "has a loss (a transformers model given labels) or pass loss="
            )
        values, vectors = self.eigen(path)
        return values * (vectors * (self.gradients[path] @ vectors)).sum(0)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    targets: str | Iterable[str] = (ALL_LINEAR,),
    loss: LossFn | None = None,
) -> Calibration:
    """Run ``batches`` through ``model`` and keep each target layer's output second moment, and the
    second moment of the loss gradient at each output where the batches give a loss.

    Args:
        batches: a Mapping is passed as keyword arguments (a tokenizer's output), a tuple or list
            as positional arguments, anything else as the one argument. Run in eval mode; padding
            positions count as data.
        targets: as in :func:`lord`.
        loss: ``loss(output, batch)``, a scalar; by default the output's ``loss`` (a transformers
            model given ``labels``). Without either only the output moments are kept (enough for
            ``rank_ratio`` and ``energy``, not for ``params``).

    Raises:
        ValueError: a target matches nothing, the batches never reach a target layer, or some
            batches give a loss and others none.
    """
    moments, gradients = _output_moments(model, select_layers(model, targets, "calibrate"), batches, loss)
    return Calibration(moments, gradients)


def lord(
    model: nn.Module,
    *,
    targets: str | Iterable[str] = (ALL_LINEAR,),
    rank_ratio: float | None = None,
    energy: float | None = None,
    params: float | None = None,
    calibration: Iterable[Any] | Calibration | None = None,
) -> CompressionReport:
    """Replace each target layer by a rank-r pair, in place.

    Without ``calibration`` the factors are the weight's truncated SVD, ``W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ)``.
    With it they are activation-aware (our reading of LoRD, after Yu & Wu 2023, "features are
    low-rank, weights are not"): from the layer outputs ``z = W x`` (bias excluded) on the
    calibration batches, ``C = (1/N) Σ z zᵀ = Q Λ Qᵀ``, and ``B = Q_r``, ``A = Q_rᵀ W``, which
    minimizes the expected output error ``E‖W x − B A x‖²`` over the calibration distribution.

    Exactly one of ``rank_ratio``, ``energy`` and ``params`` sets the ranks. ``params`` allocates
    them across the layers under one budget (``rankwise.compress.allocation``): the directions of
    largest estimated loss increase per parameter are kept, attention and MLP matrices alike.
    Layers where the rank would not save parameters (``r·(in + out) >= out·in``) stay full-rank
    and are listed in the report.

    Args:
        model: any model; transformers models work as is. Changed in place.
        targets: layer names, ``"re:"`` patterns, or ``"all-linear"`` (every Linear and Conv1D but
            the output embedding: LoRD never decomposes embeddings or the LM head). A Conv2d target
            is factored in the channel scheme.
        rank_ratio: the kept fraction of each layer's full rank, in (0, 1]:
            ``r = max(1, round(rank_ratio · min(out, in)))``.
        energy: in (0, 1]: the smallest r keeping that fraction of ``Σ σ_i²`` (weights) or of
            ``Σ λ_i`` (calibration outputs).
        params: in (0, 1]: the fraction of the target layers' parameters to keep, in all (a
            layer left dense counts in full). Needs a calibration with a loss.
        calibration: batches to run through ``model`` (as in :func:`calibrate`), or a
            :class:`Calibration` from :func:`calibrate` on this model (or an identical copy).

    Returns:
        The per-layer ranks, parameters and errors (``output_error``: relative RMS error of the
        layer outputs on the calibration data, ``sqrt(Σ_{i>r} λ_i / Σ λ_i)``), and the totals.

    Raises:
        ValueError: not exactly one of ``rank_ratio``/``energy``/``params``, or one out of (0, 1];
            a target matches nothing or selects a layer that is adapted or reachable at two paths;
            a :class:`Calibration` lacks a target layer; ``params`` without a calibration that had
            a loss, or below rank 1 in every layer.
        TypeError: a target is not a Linear, Conv1D or Conv2d (groups 1).
    """
    given = {
        name: value
        for name, value in (("rank_ratio", rank_ratio), ("energy", energy), ("params", params))
        if value is not None
    }
    if len(given) != 1:
        raise ValueError(f"lord: give exactly one of rank_ratio, energy and params; got {given or 'none'}")
    for name, value in given.items():
        check_number("lord", name, value, 0, 1, low_open=True)
    if params is not None and calibration is None:
        raise ValueError("lord: params allocates ranks from calibration data; pass calibration=")
    layers = select_layers(model, targets, "lord")
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration(*_output_moments(model, layers, calibration))
    if calibration is not None:
        missing = [path for path, _ in layers if path not in calibration.moments]
        if missing:
            raise ValueError(f"lord: the calibration has no statistics for {missing}")
    kinds = {path: check_supported(layer, path) for path, layer in layers}
    weights = {path: scheme_matrix(layer, kinds[path], "channel") for path, layer in layers}
    ranks = {}
    if params is not None:
        everything = sum(
            layer_report(path, layer, kinds[path], "channel", 1, 0.0).params_before for path, layer in layers
        )
        biases = everything - sum(w.numel() for w in weights.values())  # unchanged by any rank
        assert calibration is not None  # params without a calibration was refused above
        try:
            ranks = allocate_ranks(
                {path: (w.shape[0], w.shape[1]) for path, w in weights.items()},
                {path: calibration.scores(path) for path in weights},
                math.floor(params * everything) - biases,
            )
        except ValueError as refused:
            raise ValueError(f"lord: params={params}: {refused}") from None
    built: dict[str, tuple[LowRankLayer, LayerReport]] = {}
    kept = []
    for path, layer in layers:
        kind, weight = kinds[path], weights[path]
        eigen = None if calibration is None else calibration.eigen(path)
        rank = ranks.get(path) or _rank(weight, rank_ratio, energy, None if eigen is None else eigen[0])
        if not saves_parameters(layer, kind, "channel", rank):
            kept.append(path)
            continue
        if eigen is None:
            left, right, error = svd_factors(weight, rank, "channel")
            output_error = None
        else:
            left, right, error, output_error = _activation_factors(weight, *eigen, rank)
        new = from_factors(layer, kind, "channel", left, right)
        built[path] = (new, layer_report(path, layer, kind, "channel", rank, error, output_error))
    return replace_layers(model, built, kept)


def _rank(weight: Tensor, rank_ratio: float | None, energy: float | None, eigenvalues: Tensor | None) -> int:
    full = min(weight.shape)
    if rank_ratio is not None:
        return max(1, round(rank_ratio * full))
    assert energy is not None  # lord() gives exactly one of the three
    if eigenvalues is None:
        eigenvalues = torch.linalg.svdvals(weight.detach().float()).square()
    return min(rank_for_energy(eigenvalues, energy), full)


def _activation_factors(
    weight: Tensor, eigenvalues: Tensor, vectors: Tensor, rank: int
) -> tuple[Tensor, Tensor, float, float]:
    basis = vectors[:, :rank]  # Q_r, (out, r)
    w = weight.detach().to(torch.float64)
    right = basis.T @ w  # Q_rᵀ W, (r, in)
    error = float(torch.linalg.matrix_norm(w - basis @ right) / torch.linalg.matrix_norm(w))
    total = eigenvalues.sum()
    output_error = float((eigenvalues[rank:].sum() / total).sqrt()) if total > 0 else 0.0
    return basis, right, error, output_error


def _output_moments(
    model: nn.Module, layers: list[tuple[str, nn.Module]], calibration: Iterable[Any], loss: LossFn | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """``(1/N) Σ z zᵀ`` of each layer's bias-free output over the calibration batches and, where the
    batches give a loss, ``(1/N) Σ g gᵀ`` of its gradient ``g = ∂L/∂z``; both float64."""
    sums: dict[str, Tensor] = {}
    gradient_sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    outputs: list[tuple[str, Tensor]] = []  # this batch's layer outputs, to differentiate the loss by

    def hook_for(path: str, kind: BaseKind) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            z = output if module.bias is None else output - _bias_view(module, kind)
            sums[path] = sums.get(path, 0) + _gram(z, kind)
            counts[path] = counts.get(path, 0) + z.numel() // z.shape[1 if kind == "conv2d" else -1]
            # A zero leaf added to the output: the loss's gradient at it is exactly ∂L/∂z, whether or
            # not the weights require grad, and no path through the other targets is cut.
            probe = torch.zeros_like(output, requires_grad=True)
            outputs.append((path, probe))
            return output + probe

        return hook

    kinds = {path: check_supported(layer, path) for path, layer in layers}
    handles = [layer.register_forward_hook(hook_for(path, kinds[path])) for path, layer in layers]
    was_training = model.training
    model.eval()
    with_loss = set()
    try:
        for batch in calibration:
            outputs.clear()
            with torch.enable_grad():
                value = batch_loss(forward(model, batch), batch, loss)
                with_loss.add(value is not None)
                if value is not None:
                    grads = torch.autograd.grad(value, [leaf for _, leaf in outputs], allow_unused=True)
                    for (path, _), grad in zip(outputs, grads, strict=True):
                        if grad is not None:
                            gradient_sums[path] = gradient_sums.get(path, 0) + _gram(grad, kinds[path])
    finally:
        outputs.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [path for path, _ in layers if path not in sums]
    if missing:
        raise ValueError(f"the calibration batches never reached {missing}")
    if len(with_loss) > 1:
        raise ValueError("some calibration batches give a loss and others do not; give every batch labels or none")
    # Under torch.distributed each rank saw its own shard: sum the moments and counts first.
    count = {
        path: sum_across_ranks(torch.tensor([n], dtype=torch.float64, device=sums[path].device))
        for path, n in counts.items()
    }
    moments = {path: sum_across_ranks(total) / count[path] for path, total in sums.items()}
    if with_loss != {True}:
        return moments, None
    gradients = {
        path: sum_across_ranks(gradient_sums.get(path, torch.zeros_like(total))) / count[path]
        for path, total in sums.items()
    }
    return moments, gradients


def _gram(z: Tensor, kind: BaseKind) -> Tensor:
    """``Σ z zᵀ`` over every output vector of ``z`` (one per token, or per position of a conv)."""
    if kind == "conv2d":
        z = z.movedim(1, -1)  # (batch, h, w, out)
    z = z.detach().reshape(-1, z.shape[-1]).to(torch.float64)
    return z.T @ z


def _bias_view(module: nn.Module, kind: BaseKind) -> Tensor:
    bias = layer_bias(module)
    assert bias is not None  # called only for a layer with a bias
    return bias.view(1, -1, 1, 1) if kind == "conv2d" else bias
