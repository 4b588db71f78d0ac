"""What a compression did: per-layer and whole-model counts of parameters and MACs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.geometry import BaseKind, layer_bias
from .layers import Scheme, scheme_matrix


@dataclass(frozen=True)
class LayerReport:
    """One replaced layer.

    ``macs_*`` are multiply-accumulates per output position (per token for a Linear): ``out·in``
    against ``r·(in + out)``. For the spatial scheme the vertical conv runs on ``stride_w`` columns
    per output column, counted as such (exact for "same" padding, where the input is ``stride_w``
    times as wide as the output).
    ``error`` is ``‖W − U V‖_F / ‖W‖_F``; ``output_error`` is the relative error of the layer's
    outputs on calibration data, where a method measured it.
    """

    path: str
    kind: BaseKind
    scheme: Scheme
    rank: int
    full_rank: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    error: float
    output_error: float | None = None


@dataclass(frozen=True)
class CompressionReport:
    """What a compressor did to a model; ``str()`` gives a table.

    Args:
        layers: the replaced layers, in module order.
        kept_full_rank: targets left unchanged because their rank would not save parameters
            (``r·(in + out) >= out·in``).
        params_before, params_after: parameters of the whole model (shared ones once).
    """

    layers: tuple[LayerReport, ...]
    kept_full_rank: tuple[str, ...]
    params_before: int
    params_after: int

    @property
    def compression_ratio(self) -> float:
        """Whole-model parameters before over after."""
        return self.params_before / self.params_after

    @property
    def flop_reduction(self) -> float:
        """MACs of the replaced layers before over after (per output position)."""
        after = sum(layer.macs_after for layer in self.layers)
        return sum(layer.macs_before for layer in self.layers) / after if after else 1.0

    def ranks(self) -> dict[str, int]:
        return {layer.path: layer.rank for layer in self.layers}

    def __str__(self) -> str:
        header = ("layer", "rank", "of", "params", "rel. error")
        rows = [
            (r.path, str(r.rank), str(r.full_rank), f"{r.params_before:,} -> {r.params_after:,}", f"{r.error:.4f}")
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
        ]
        lines.append(
            f"model: {self.params_before:,} -> {self.params_after:,} parameters "
            f"({self.compression_ratio:.2f}x); replaced layers' FLOPs {self.flop_reduction:.2f}x fewer"
        )
        if self.kept_full_rank:
            lines.append(f"kept full-rank (no saving at the chosen rank): {', '.join(self.kept_full_rank)}")
        return "\n".join(lines)


def layer_report(
    path: str,
    layer: nn.Module,
    kind: BaseKind,
    scheme: Scheme,
    rank: int,
    error: float,
    output_error: float | None = None,
) -> LayerReport:
    """The counts for replacing ``layer`` by a rank-r pair (weights and MACs; bias unchanged)."""
    rows, cols = scheme_matrix(layer, kind, scheme).shape
    weight = rows * cols
    factored = rank * (rows + cols)  # the weights of both factors, in every scheme
    macs = factored
    if kind == "conv2d" and scheme == "spatial":
        # The vertical conv is not strided along the width: about stride_w columns per output one.
        assert isinstance(layer, nn.Conv2d)  # kind "conv2d" is an nn.Conv2d (base_kind)
        n, c, kh, kw = layer.weight.shape
        macs = rank * (c * kh * layer.stride[1] + n * kw)
    return LayerReport(
        path,
        kind,
        scheme,
        rank,
        min(rows, cols),
        weight + _bias(layer),
        factored + _bias(layer),
        weight,
        macs,
        error,
        output_error,
    )


def saves_parameters(layer: nn.Module, kind: BaseKind, scheme: Scheme, rank: int) -> bool:
    """Whether a rank-r pair has fewer weights than the layer (the break-even rule)."""
    report = layer_report("", layer, kind, scheme, rank, 0.0)
    return report.params_after < report.params_before


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, shared ones counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _bias(layer: nn.Module) -> int:
    bias = layer_bias(layer)
    return 0 if bias is None else bias.numel()
