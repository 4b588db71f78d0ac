"""What every compressor shares: choosing the layers, putting low-rank layers in their place, and
keeping replicas in step under torch.distributed."""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import Tensor, nn

from ..core.config import ALL_LINEAR
from ..core.geometry import base_kind, check_supported
from ..core.inject import matches, replace_module
from .layers import LowRankLayer, Scheme, from_factors, scheme_matrix, svd_factors
from .report import CompressionReport, LayerReport, count_params, layer_report


def select_layers(model: nn.Module, targets: str | Iterable[str], who: str) -> list[tuple[str, nn.Module]]:
    """The layers ``targets`` select, in module order: names, ``"re:"`` patterns or ``"all-linear"``
    (every Linear and Conv1D but the output embedding), as in ``rw.adapt``; one string is one target.

    Raises:
        ValueError: a target matches no module.
        TypeError: a selected module is not a Linear, Conv1D or Conv2d with groups 1.
    """
    modules, inside = [], []
    for path, module in model.named_modules():
        # A low-rank layer and its factors are already compressed; they are never targets.
        if not path or any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LowRankLayer):
            inside.append(path + ".")
            continue
        modules.append((path, module))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen: set[str] = set()
    for pattern in (targets,) if isinstance(targets, str) else targets:
        if pattern == ALL_LINEAR:
            hits = {path for path, m in modules if base_kind(m) in ("linear", "conv1d") and m is not head}
        else:
            hits = {path for path, _ in modules if matches(path, pattern)}
        if not hits:
            raise ValueError(f"{who}: target {pattern!r} matches no module")
        chosen |= hits
    selected = [(path, m) for path, m in modules if path in chosen]
    for path, module in selected:
        check_supported(module, path)
    return selected


def spatial_conv_targets(model: nn.Module) -> list[str]:
    """TRP's and Cuttlefish's default layers: every Conv2d with a kernel other than 1 × 1 and
    groups 1, except the model's first convolution (the stem). 1 × 1 shortcuts and the classifier
    stay full-rank, as in both papers."""
    convs = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [path for path, m in convs[1:] if m.kernel_size != (1, 1) and m.groups == 1]


def install(model: nn.Module, built: dict[str, tuple[LowRankLayer, LayerReport]],
            kept: Iterable[str]) -> CompressionReport:
    """Put every built layer in place (all were built first, so a failure left the model whole)."""
    before = count_params(model)
    for path, (layer, _) in built.items():
        replace_module(model, path, layer)
    reports = tuple(report for _, report in built.values())
    return CompressionReport(reports, tuple(kept), before, count_params(model))


def replace_at_ranks(model: nn.Module, ranks: dict[str, int], scheme: Scheme,
                     kept: Iterable[str] = ()) -> CompressionReport:
    """Replace each layer ``ranks`` names by its truncated-SVD pair at that rank; ``kept`` lists
    the targets the caller left full-rank, for the report."""
    built = {}
    for path, rank in ranks.items():
        layer = model.get_submodule(path)
        kind = check_supported(layer, path)
        left, right, error = svd_factors(scheme_matrix(layer, kind, scheme), rank, scheme)
        new = from_factors(layer, kind, scheme, left, right)
        built[path] = (new, layer_report(path, layer, kind, scheme, rank, error))
    return install(model, built, kept)


def broadcast_(tensor: Tensor) -> Tensor:
    """Under torch.distributed, overwrite ``tensor`` on every rank with rank 0's (a no-op otherwise).

    Rank decisions (TRP's truncation, Cuttlefish's ranks) are taken on rank 0 and broadcast, so all
    replicas change identically even where SVDs round differently.
    """
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Under torch.distributed, sum ``tensor`` over ranks in place (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
