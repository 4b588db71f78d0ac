"""Low-rank layers that replace a Linear, Conv1D or Conv2d, and the machinery every compressor shares.

A compressed layer is two ordinary layers in a row, ``y = U(V(x))``: ``V`` maps the input to ``rank``
channels and ``U`` maps them to the output and carries the bias. Because the factors are plain
``nn.Linear`` / ``nn.Conv2d`` children, the model stays a normal PyTorch model: it trains, saves and
takes adapters (``rw.adapt(model, LoRAConfig(targets=("U",)))`` adapts every output factor).

Convolutions factor in one of two schemes (``shared/methods/rank-and-compression.md`` §B1):

* ``"channel"`` (Zhang et al. 2016): ``M = W.reshape(N, C·kh·kw)``; ``V`` is a kh × kw conv C → r with
  the original stride, padding and dilation, ``U`` a 1 × 1 conv r → N.
* ``"spatial"`` (Jaderberg et al. 2014, scheme 2): ``M = W.permute(C, kh, N, kw).reshape(C·kh, N·kw)``;
  ``V`` is a vertical kh × 1 conv C → r, ``U`` a horizontal 1 × kw conv r → N. Stride, padding and
  dilation split by axis, so the pair equals the rank-r kernel for any of them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core.checkpoint import CheckpointError
from ..core.config import ALL_LINEAR
from ..core.geometry import BaseKind, base_kind, check_supported
from ..core.inject import matches, replace_module
from ..decompose import truncated_svd
from ..version import __version__

Scheme = Literal["channel", "spatial"]
SCHEMES: tuple[Scheme, ...] = ("channel", "spatial")
_FORMAT = "rankwise-compressed"
_WEIGHTS, _LAYOUT = "model.safetensors", "compression.json"


class LowRankLinear(nn.Module):
    """``y = (x Vᵀ) Uᵀ + b``: a rank-r replacement for an ``nn.Linear`` or transformers ``Conv1D``.

    Args:
        in_features, out_features: the replaced layer's sizes.
        rank: r, the inner dimension; 1 <= r.
        bias: whether ``U`` carries a bias (the replaced layer's).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        self.V = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.U = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.V.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.U(self.V(x))

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ``left @ right`` the layer's (out, in) weight; differentiable."""
        return self.U.weight, self.V.weight

    def set_factor_matrices(self, left: Tensor, right: Tensor) -> None:
        """Write ``U = left`` (out, r) and ``V = right`` (r, in), in the layer's dtype."""
        with torch.no_grad():
            self.U.weight.copy_(left)
            self.V.weight.copy_(right)

    def dense_weight(self) -> Tensor:
        """The dense (out, in) weight the pair computes."""
        return self.U.weight @ self.V.weight

    def layout(self) -> dict[str, Any]:
        """What :func:`load_compressed` needs to rebuild this layer (JSON-ready)."""
        return {"type": "LowRankLinear", "in_features": self.V.in_features, "out_features": self.U.out_features,
                "rank": self.rank, "bias": self.U.bias is not None}


class LowRankConv2d(nn.Module):
    """A rank-r replacement for an ``nn.Conv2d`` (groups 1): ``V`` then ``U``, in the given scheme.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: the replaced conv's.
        rank: r, the channels between the two convs; 1 <= r.
        scheme: ``"channel"`` or ``"spatial"`` (module docstring).
        bias: whether ``U`` carries a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], rank: int, *,
                 scheme: Scheme = "channel", stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_rank(rank)
        if scheme not in SCHEMES:
            raise ValueError(f"LowRankConv2d: scheme={scheme!r} is not allowed; expected one of {SCHEMES}")
        self.scheme = scheme
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        kwargs = {"dtype": dtype, "device": device}
        if scheme == "channel":
            self.V = nn.Conv2d(in_channels, rank, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias=False, **kwargs)
            self.U = nn.Conv2d(rank, out_channels, 1, bias=bias, **kwargs)
        else:
            self.V = nn.Conv2d(in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, **kwargs)
            self.U = nn.Conv2d(rank, out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias, **kwargs)

    @property
    def rank(self) -> int:
        return self.V.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.U(self.V(x))

    def factor_matrices(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ``left @ right`` the scheme's matrix of the composite kernel."""
        if self.scheme == "channel":
            return self.U.weight.flatten(1), self.V.weight.flatten(1)  # (N, r), (r, C·kh·kw)
        r, c, kh, _ = self.V.weight.shape
        n, kw = self.U.weight.shape[0], self.U.weight.shape[3]
        left = self.V.weight[..., 0].permute(1, 2, 0).reshape(c * kh, r)
        right = self.U.weight[:, :, 0, :].permute(1, 0, 2).reshape(r, n * kw)
        return left, right

    def set_factor_matrices(self, left: Tensor, right: Tensor) -> None:
        """Inverse of :meth:`factor_matrices`: write the factors from the scheme's two matrices."""
        with torch.no_grad():
            if self.scheme == "channel":
                self.U.weight.copy_(left.reshape(self.U.weight.shape))
                self.V.weight.copy_(right.reshape(self.V.weight.shape))
                return
            r, c, kh, _ = self.V.weight.shape
            n, kw = self.U.weight.shape[0], self.U.weight.shape[3]
            self.V.weight.copy_(left.reshape(c, kh, r).permute(2, 0, 1).unsqueeze(-1))
            self.U.weight.copy_(right.reshape(r, n, kw).permute(1, 0, 2).unsqueeze(2))

    def dense_weight(self) -> Tensor:
        """The dense (N, C, kh, kw) kernel the pair computes."""
        left, right = self.factor_matrices()
        shape = (self.U.out_channels, self.V.in_channels, *self.kernel_size)
        return from_scheme_matrix(left @ right, shape, self.scheme)

    def layout(self) -> dict[str, Any]:
        """What :func:`load_compressed` needs to rebuild this layer (JSON-ready)."""
        return {"type": "LowRankConv2d", "in_channels": self.V.in_channels, "out_channels": self.U.out_channels,
                "kernel_size": list(self.kernel_size), "rank": self.rank, "scheme": self.scheme,
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "bias": self.U.bias is not None}


LowRankLayer = LowRankLinear | LowRankConv2d


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
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.append(f"model: {self.params_before:,} -> {self.params_after:,} parameters "
                     f"({self.compression_ratio:.2f}x); replaced layers' FLOPs {self.flop_reduction:.2f}x fewer")
        if self.kept_full_rank:
            lines.append(f"kept full-rank (no saving at the chosen rank): {', '.join(self.kept_full_rank)}")
        return "\n".join(lines)


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


def scheme_matrix(layer: nn.Module, kind: BaseKind, scheme: Scheme) -> Tensor:
    """The matrix a scheme factors: (out, in) for Linear/Conv1D; see the module docstring for convs."""
    if kind == "linear":
        return layer.weight
    if kind == "conv1d":
        return layer.weight.t()
    if scheme == "channel":
        return layer.weight.flatten(1)
    n, c, kh, kw = layer.weight.shape
    return layer.weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def from_scheme_matrix(matrix: Tensor, shape: tuple[int, ...], scheme: Scheme) -> Tensor:
    """Inverse of :func:`scheme_matrix` for a conv kernel of ``shape`` (N, C, kh, kw)."""
    if scheme == "channel":
        return matrix.reshape(shape)
    n, c, kh, kw = shape
    return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3)


def write_scheme_matrix(layer: nn.Module, kind: BaseKind, scheme: Scheme, matrix: Tensor) -> None:
    """Copy a scheme matrix back into the layer's weight, in place."""
    with torch.no_grad():
        if kind == "conv2d":
            layer.weight.copy_(from_scheme_matrix(matrix, tuple(layer.weight.shape), scheme))
        else:
            layer.weight.copy_(matrix.t() if kind == "conv1d" else matrix)


def empty_like_layer(layer: nn.Module, kind: BaseKind, rank: int, scheme: Scheme) -> LowRankLayer:
    """An uninitialized low-rank replacement of ``layer`` at ``rank``, same dtype and device."""
    kwargs = {"bias": layer.bias is not None, "dtype": layer.weight.dtype, "device": layer.weight.device}
    if kind == "conv2d":
        return LowRankConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, rank, scheme=scheme,
                             stride=layer.stride, padding=layer.padding, dilation=layer.dilation, **kwargs)
    out_features, in_features = scheme_matrix(layer, kind, scheme).shape
    return LowRankLinear(in_features, out_features, rank, **kwargs)


def from_factors(layer: nn.Module, kind: BaseKind, scheme: Scheme, left: Tensor, right: Tensor) -> LowRankLayer:
    """A low-rank replacement of ``layer`` with ``left @ right`` as its scheme matrix and its bias."""
    new = empty_like_layer(layer, kind, left.shape[1], scheme)
    new.set_factor_matrices(left, right)
    if layer.bias is not None:
        with torch.no_grad():
            new.U.bias.copy_(layer.bias)
    return new


def svd_factors(matrix: Tensor, rank: int, scheme: Scheme) -> tuple[Tensor, Tensor, float]:
    """``(left, right, error)``: the rank-r truncated SVD ``P Σ Qᵀ`` of ``matrix`` split in two.

    Channel scheme and Linear: ``left = P √Σ``, ``right = √Σ Qᵀ`` (TRP's NC, Cuttlefish, LoRD).
    Spatial scheme: ``left = P``, ``right = Σ Qᵀ`` (TRP's VH code puts all of Σ in the horizontal conv).
    """
    compute = matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    svd = truncated_svd(compute, rank=rank)
    if scheme == "spatial":
        return svd.U, svd.S[:, None] * svd.Vh, svd.error
    root = svd.S.sqrt()
    return svd.U * root, root[:, None] * svd.Vh, svd.error


def layer_report(path: str, layer: nn.Module, kind: BaseKind, scheme: Scheme, rank: int, error: float,
                 output_error: float | None = None) -> LayerReport:
    """The counts for replacing ``layer`` by a rank-r pair (weights and MACs; bias unchanged)."""
    rows, cols = scheme_matrix(layer, kind, scheme).shape
    weight = rows * cols
    factored = rank * (rows + cols)  # the weights of both factors, in every scheme
    macs = factored
    if kind == "conv2d" and scheme == "spatial":
        # The vertical conv is not strided along the width: about stride_w columns per output one.
        n, c, kh, kw = layer.weight.shape
        macs = rank * (c * kh * layer.stride[1] + n * kw)
    return LayerReport(path, kind, scheme, rank, min(rows, cols), weight + _bias(layer), factored + _bias(layer),
                       weight, macs, error, output_error)


def saves_parameters(layer: nn.Module, kind: BaseKind, scheme: Scheme, rank: int) -> bool:
    """Whether a rank-r pair has fewer weights than the layer (the break-even rule)."""
    report = layer_report("", layer, kind, scheme, rank, 0.0)
    return report.params_after < report.params_before


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


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, shared ones counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_compressed(model: nn.Module, folder: str | Path) -> None:
    """Write a compressed model: ``model.safetensors`` (the whole state dict) and ``compression.json``
    (format, version, and each low-rank layer's path and layout), so a reload needs no report.

    Tied tensors (an LM head sharing the embedding) are written under each of their keys; loading
    copies both into the one shared parameter, so the tie survives.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = {"format": _FORMAT, "format_version": 1, "rankwise_version": __version__,
              "layers": {path: m.layout() for path, m in model.named_modules() if isinstance(m, LowRankLayer)}}
    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        # safetensors refuses tensors that share storage; a copy per key keeps both keys loadable.
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.detach().clone() if storage in seen else value.detach().contiguous()
        seen.add(storage)
    _atomic_write(folder / _WEIGHTS, lambda path: save_file(tensors, str(path)))
    _atomic_write(folder / _LAYOUT, lambda path: Path(path).write_text(json.dumps(layout, indent=2)))


def load_compressed(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load :func:`save_compressed`'s files into an uncompressed model of the same architecture.

    Every recorded layer is checked against the model (present, same type and shape) and every
    tensor against the rebuilt model (missing, unexpected and mis-shaped keys listed together)
    before the model is changed. Returns the same model object, compressed.

    Raises:
        CheckpointError: the files do not fit the model.
    """
    folder = Path(folder)
    layout = json.loads((folder / _LAYOUT).read_text())
    if layout.get("format") != _FORMAT or layout.get("format_version") != 1:
        raise CheckpointError(f"{folder / _LAYOUT} is not a {_FORMAT} v1 file")
    built = {path: _rebuild(model, path, entry) for path, entry in layout["layers"].items()}
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not any(k.startswith(path + ".") for path in built)}
    for path, layer in built.items():
        expected |= {f"{path}.{k}": v.shape for k, v in layer.state_dict().items()}
    tensors = load_file(str(folder / _WEIGHTS))
    problems = [f"missing {sorted(set(expected) - set(tensors))}"] if set(expected) - set(tensors) else []
    if set(tensors) - set(expected):
        problems.append(f"unexpected {sorted(set(tensors) - set(expected))}")
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
              for k, v in tensors.items() if k in expected and v.shape != expected[k]]
    if shapes:
        problems.append(f"mis-shaped {shapes}")
    if problems:
        raise CheckpointError(f"{folder} does not fit the model: " + "; ".join(problems))
    for path, layer in built.items():
        replace_module(model, path, layer)
    model.load_state_dict(tensors, strict=True)
    return model


def broadcast_(tensor: Tensor) -> Tensor:
    """Under torch.distributed, overwrite ``tensor`` on every rank with rank 0's (a no-op otherwise).

    Rank decisions (TRP's truncation, Cuttlefish's ranks) are taken on rank 0 and broadcast, so all
    replicas change identically even where SVDs round differently (the spec's DDP section).
    """
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Under torch.distributed, sum ``tensor`` over ranks in place (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _rebuild(model: nn.Module, path: str, entry: dict[str, Any]) -> LowRankLayer:
    try:
        layer = model.get_submodule(path)
    except AttributeError as error:
        raise CheckpointError(f"compressed layer '{path}' is not in the model") from error
    kind = check_supported(layer, path)
    is_conv = entry["type"] == "LowRankConv2d"
    if is_conv != (kind == "conv2d"):
        raise CheckpointError(f"'{path}' is a {type(layer).__name__} in the model but a {entry['type']} in the file")
    scheme = entry.get("scheme", "channel")
    new = empty_like_layer(layer, kind, entry["rank"], scheme)
    if new.layout() != entry:
        raise CheckpointError(f"'{path}': the file's layer {entry} does not fit the model's {new.layout()}")
    return new


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _bias(layer: nn.Module) -> int:
    return 0 if layer.bias is None else layer.bias.numel()


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an integer >= 1")
