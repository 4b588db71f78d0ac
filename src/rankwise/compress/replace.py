"""What every compressor shares: choosing the layers and putting low-rank layers in their place."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..core import targets as core_targets
from ..core.geometry import check_supported
from ..core.inject import replace_module
from .layers import LowRankConv2d, LowRankLayer, LowRankLinear, Scheme, from_factors, scheme_matrix, svd_factors
from .report import CompressionReport, LayerReport, count_params, layer_report


def select_layers(model: nn.Module, targets: str | Iterable[str], who: str) -> list[tuple[str, nn.Module]]:
    """The layers ``targets`` select, in module order, by the rule ``rw.adapt`` uses
    (:func:`rankwise.core.targets.select`); one string is one target. Low-rank layers and their
    factors are already compressed and never selected.

    Raises:
        ValueError: a target matches no module; a selected layer is adapted (compress before
            adapting, or unwrap first), shared with another path, or the model itself.
        TypeError: a selected module is not a Linear, Conv1D or Conv2d with groups 1.
    """
    entries = (targets,) if isinstance(targets, str) else tuple(targets)
    paths = core_targets.select(model, entries, skip=(LowRankLinear, LowRankConv2d), owner=who)
    if "" in paths:
        raise ValueError(f"{who}: the model itself is a target; a compressor replaces layers inside a model")
    return [(path, model.get_submodule(path)) for path in paths]


def spatial_conv_targets(model: nn.Module) -> list[str]:
    """TRP's and Cuttlefish's default layers: every Conv2d with a kernel other than 1 × 1 and
    groups 1, except the model's first convolution (the stem). 1 × 1 shortcuts and the classifier
    stay full-rank, as in both papers."""
    convs = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [path for path, m in convs[1:] if m.kernel_size != (1, 1) and m.groups == 1]


def replace_layers(
    model: nn.Module, built: dict[str, tuple[LowRankLayer, LayerReport]], kept: Iterable[str]
) -> CompressionReport:
    """Put every built low-rank layer in place of the layer at its path (all were built first, so a
    failure left the model whole) and report what changed."""
    before = count_params(model)
    for path, (layer, _) in built.items():
        replace_module(model, path, layer)
    reports = tuple(report for _, report in built.values())
    return CompressionReport(reports, tuple(kept), before, count_params(model))


def replace_at_ranks(
    model: nn.Module, ranks: dict[str, int], scheme: Scheme, kept: Iterable[str] = ()
) -> CompressionReport:
    """Replace each layer ``ranks`` names by its truncated-SVD pair at that rank; ``kept`` lists
    the targets the caller left full-rank, for the report."""
    built = {}
    for path, rank in ranks.items():
        layer = model.get_submodule(path)
        kind = check_supported(layer, path)
        left, right, error = svd_factors(scheme_matrix(layer, kind, scheme), rank, scheme)
        new = from_factors(layer, kind, scheme, left, right)
        built[path] = (new, layer_report(path, layer, kind, scheme, rank, error))
    return replace_layers(model, built, kept)
