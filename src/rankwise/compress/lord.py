"""LoRD: one-shot low-rank decomposition of a trained model's linear layers.

Kaushal, Vaidhya, Rish, "LoRD: Low Rank Decomposition of Monolingual Code LLMs for One-Shot
Compression", https://arxiv.org/abs/2309.14021. ``y = W x + b`` becomes ``y = B(A x) + b`` with no
training, and the result stays a dense, trainable model (adapters and quantization still apply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import check_number
from ..core.config import ALL_LINEAR
from ..core.distributed import sum_across_ranks
from ..core.geometry import BaseKind, check_supported, layer_bias
from ..decompose import rank_for_energy
from .layers import LowRankLayer, from_factors, scheme_matrix, svd_factors
from .replace import replace_layers, select_layers
from .report import CompressionReport, LayerReport, layer_report, saves_parameters


@dataclass
class Calibration:
    """Each layer's output second moment ``C = (1/N) Σ z zᵀ`` (float64), from :func:`calibrate`.

    Eigendecompositions are computed on first use and kept, so a sweep over rank ratios (each on a
    fresh copy of the model) pays for the calibration pass and the ``eigh`` calls once.
    """

    moments: dict[str, Tensor]
    _eigen: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def eigen(self, path: str) -> tuple[Tensor, Tensor]:
        """``(λ, Q)`` of layer ``path``'s moment, eigenvalues descending (clamped at 0)."""
        if path not in self._eigen:
            values, vectors = torch.linalg.eigh(self.moments[path])  # ascending
            self._eigen[path] = values.flip(0).clamp_min(0), vectors.flip(1)
        return self._eigen[path]


def calibrate(model: nn.Module, batches: Iterable[Any], *, targets: str | Iterable[str] = (ALL_LINEAR,)) -> Calibration:
    """Run ``batches`` through ``model`` and keep each target layer's output second moment.

    Args:
        batches: a Mapping is passed as keyword arguments (a tokenizer's output), a tuple or list
            as positional arguments, anything else as the one argument. Run in eval mode under
            ``no_grad``; padding positions count as data.
        targets: as in :func:`lord`.

    Raises:
        ValueError: a target matches nothing, or the batches never reach a target layer.
    """
    return Calibration(_output_moments(model, select_layers(model, targets, "calibrate"), batches))


def lord(model: nn.Module, *, targets: str | Iterable[str] = (ALL_LINEAR,), rank_ratio: float | None = None,
         energy: float | None = None, calibration: Iterable[Any] | Calibration | None = None) -> CompressionReport:
    """Replace each target layer by a rank-r pair, in place.

    Without ``calibration`` the factors are the weight's truncated SVD, ``W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ)``.
    With it they are activation-aware (our reading of LoRD, after Yu & Wu 2023, "features are
    low-rank, weights are not"): from the layer outputs ``z = W x`` (bias excluded) on the
    calibration batches, ``C = (1/N) Σ z zᵀ = Q Λ Qᵀ``, and ``B = Q_r``, ``A = Q_rᵀ W``, which
    minimizes the expected output error ``E‖W x − B A x‖²`` over the calibration distribution.

    Exactly one of ``rank_ratio`` and ``energy`` sets each layer's rank. Layers where the rank would
    not save parameters (``r·(in + out) >= out·in``) stay full-rank and are listed in the report.

    Args:
        model: any model; transformers models work as is. Changed in place.
        targets: layer names, ``"re:"`` patterns, or ``"all-linear"`` (every Linear and Conv1D but
            the output embedding: LoRD never decomposes embeddings or the LM head). A Conv2d target
            is factored in the channel scheme.
        rank_ratio: the kept fraction of each layer's full rank, in (0, 1]:
            ``r = max(1, round(rank_ratio · min(out, in)))``.
        energy: in (0, 1]: the smallest r keeping that fraction of ``Σ σ_i²`` (weights) or of
            ``Σ λ_i`` (calibration outputs).
        calibration: batches to run through ``model`` (as in :func:`calibrate`), or a
            :class:`Calibration` from :func:`calibrate` on this model (or an identical copy).

    Returns:
        The per-layer ranks, parameters and errors (``output_error``: relative RMS error of the
        layer outputs on the calibration data, ``sqrt(Σ_{i>r} λ_i / Σ λ_i)``), and the totals.

    Raises:
        ValueError: not exactly one of ``rank_ratio``/``energy``, or one out of (0, 1]; a target
            matches nothing or selects a layer that is adapted or reachable at two paths; a
            :class:`Calibration` lacks a target layer.
        TypeError: a target is not a Linear, Conv1D or Conv2d (groups 1).
    """
    if (rank_ratio is None) == (energy is None):
        raise ValueError(
            f"lord: give exactly one of rank_ratio and energy; got rank_ratio={rank_ratio}, energy={energy}"
        )
    for name, value in (("rank_ratio", rank_ratio), ("energy", energy)):
        if value is not None:
            check_number("lord", name, value, 0, 1, low_open=True)
    layers = select_layers(model, targets, "lord")
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration(_output_moments(model, layers, calibration))
    if calibration is not None:
        missing = [path for path, _ in layers if path not in calibration.moments]
        if missing:
            raise ValueError(f"lord: the calibration has no statistics for {missing}")
    built: dict[str, tuple[LowRankLayer, LayerReport]] = {}
    kept = []
    for path, layer in layers:
        kind = check_supported(layer, path)
        weight = scheme_matrix(layer, kind, "channel")
        if calibration is None:
            rank = _rank(weight, rank_ratio, energy, None)
            left, right, error = svd_factors(weight, rank, "channel")
            output_error = None
        else:
            left, right, error, output_error, rank = _activation_factors(weight, *calibration.eigen(path),
                                                                         rank_ratio, energy)
        if not saves_parameters(layer, kind, "channel", rank):
            kept.append(path)
            continue
        new = from_factors(layer, kind, "channel", left, right)
        built[path] = (new, layer_report(path, layer, kind, "channel", rank, error, output_error))
    return replace_layers(model, built, kept)


def _rank(weight: Tensor, rank_ratio: float | None, energy: float | None, eigenvalues: Tensor | None) -> int:
    full = min(weight.shape)
    if rank_ratio is not None:
        return max(1, round(rank_ratio * full))
    assert energy is not None  # lord() takes exactly one of rank_ratio and energy
    if eigenvalues is None:
        eigenvalues = torch.linalg.svdvals(weight.detach().float()).square()
    return min(rank_for_energy(eigenvalues, energy), full)


def _activation_factors(weight: Tensor, eigenvalues: Tensor, vectors: Tensor, rank_ratio: float | None,
                        energy: float | None) -> tuple[Tensor, Tensor, float, float, int]:
    rank = _rank(weight, rank_ratio, energy, eigenvalues)
    basis = vectors[:, :rank]  # Q_r, (out, r)
    w = weight.detach().to(torch.float64)
    right = basis.T @ w  # Q_rᵀ W, (r, in)
    error = float(torch.linalg.matrix_norm(w - basis @ right) / torch.linalg.matrix_norm(w))
    total = eigenvalues.sum()
    output_error = float((eigenvalues[rank:].sum() / total).sqrt()) if total > 0 else 0.0
    return basis, right, error, output_error, rank


def _output_moments(model: nn.Module, layers: list[tuple[str, nn.Module]],
                    calibration: Iterable[Any]) -> dict[str, Tensor]:
    """``(1/N) Σ z zᵀ`` of each layer's bias-free output over the calibration batches, in float64."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}

    def hook_for(path: str, kind: BaseKind):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            z = output if module.bias is None else output - _bias_view(module, kind)
            if kind == "conv2d":
                z = z.movedim(1, -1)  # (batch, h, w, out): one output vector per position
            z = z.detach().reshape(-1, z.shape[-1]).to(torch.float64)
            sums[path] = sums.get(path, 0) + z.T @ z
            counts[path] = counts.get(path, 0) + z.shape[0]
        return hook

    handles = [layer.register_forward_hook(hook_for(path, check_supported(layer, path))) for path, layer in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [path for path, _ in layers if path not in sums]
    if missing:
        raise ValueError(f"the calibration batches never reached {missing}")
    moments = {}
    for path, total in sums.items():
        # Under torch.distributed each rank saw its own shard: sum the moments and counts first.
        count = sum_across_ranks(torch.tensor([counts[path]], dtype=torch.float64, device=total.device))
        moments[path] = sum_across_ranks(total) / count
    return moments


def _bias_view(module: nn.Module, kind: BaseKind) -> Tensor:
    bias = layer_bias(module)
    assert bias is not None  # called only for a layer with a bias
    return bias.view(1, -1, 1, 1) if kind == "conv2d" else bias
