"""Low-rank layers that replace a Linear, Conv1D or Conv2d, and the machinery every compressor shares.

A compressed layer is two ordinary layers in a row, ``y = U(V(x))``: ``V`` maps the input to ``rank``
channels and ``U`` maps them to the output and carries the bias. Because the factors are plain
``nn.Linear`` / ``nn.Conv2d`` children, the model stays a normal PyTorch model: it trains, saves and
takes adapters (``rw.adapt(model, LoRAConfig(targets=("U",)))`` adapts every output factor).

Convolutions factor in one of two schemes:

* ``"channel"`` (Zhang et al. 2016): ``M = W.reshape(N, C·kh·kw)``; ``V`` is a kh × kw conv C → r with
  the original stride, padding and dilation, ``U`` a 1 × 1 conv r → N.
* ``"spatial"`` (Jaderberg et al. 2014, scheme 2): ``M = W.permute(C, kh, N, kw).reshape(C·kh, N·kw)``;
  ``V`` is a vertical kh × 1 conv C → r, ``U`` a horizontal 1 × kw conv r → N. Stride, padding and
  dilation split by axis, so the pair equals the rank-r kernel for any of them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core import geometry
from ..core.checks import check_number
from ..core.geometry import BaseKind
from ..decompose import truncated_svd

Scheme = Literal["channel", "spatial"]
SCHEMES: tuple[Scheme, ...] = ("channel", "spatial")


class LowRankLinear(nn.Module):
    """``y = (x Vᵀ) Uᵀ + b``: a rank-r replacement for an ``nn.Linear`` or transformers ``Conv1D``.

    Args:
        in_features, out_features: the replaced layer's sizes.
        rank: r, the inner dimension; 1 <= r.
        bias: whether ``U`` carries a bias (the replaced layer's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_number("LowRankLinear", "rank", rank, 1, integer=True)
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
        return {
            "type": "LowRankLinear",
            "in_features": self.V.in_features,
            "out_features": self.U.out_features,
            "rank": self.rank,
            "bias": self.U.bias is not None,
        }


class LowRankConv2d(nn.Module):
    """A rank-r replacement for an ``nn.Conv2d`` (groups 1): ``V`` then ``U``, in the given scheme.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: the replaced conv's.
        rank: r, the channels between the two convs; 1 <= r.
        scheme: ``"channel"`` or ``"spatial"`` (module docstring).
        bias: whether ``U`` carries a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        rank: int,
        *,
        scheme: Scheme = "channel",
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_number("LowRankConv2d", "rank", rank, 1, integer=True)
        if scheme not in SCHEMES:
            raise ValueError(f"LowRankConv2d: scheme={scheme!r} is not allowed; expected one of {SCHEMES}")
        self.scheme = scheme
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        kwargs: dict[str, Any] = {"dtype": dtype, "device": device}
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
        return from_scheme_matrix(left @ right, "conv2d", self.scheme, shape)

    def layout(self) -> dict[str, Any]:
        """What :func:`load_compressed` needs to rebuild this layer (JSON-ready)."""
        return {
            "type": "LowRankConv2d",
            "in_channels": self.V.in_channels,
            "out_channels": self.U.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": self.rank,
            "scheme": self.scheme,
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.U.bias is not None,
        }


LowRankLayer = LowRankLinear | LowRankConv2d


def scheme_matrix(layer: nn.Module, kind: BaseKind, scheme: Scheme) -> Tensor:
    """The matrix a scheme factors: the layer's (out, in) weight matrix (``core.geometry``), except
    for a conv in the spatial scheme (see the module docstring)."""
    if kind == "conv2d" and scheme == "spatial":
        weight = geometry.layer_weight(layer)
        n, c, kh, kw = weight.shape
        return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    return geometry.weight_matrix(layer, kind)


def from_scheme_matrix(matrix: Tensor, kind: BaseKind, scheme: Scheme, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`scheme_matrix`: ``matrix`` in the layout of a weight of ``shape``."""
    if kind == "conv2d" and scheme == "spatial":
        n, c, kh, kw = shape
        return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3)
    return geometry.as_weight(matrix, kind, shape)


def write_scheme_matrix(layer: nn.Module, kind: BaseKind, scheme: Scheme, matrix: Tensor) -> None:
    """Copy a scheme matrix back into the layer's weight, in place."""
    weight = geometry.layer_weight(layer)
    with torch.no_grad():
        weight.copy_(from_scheme_matrix(matrix, kind, scheme, tuple(weight.shape)))


def empty_like_layer(layer: nn.Module, kind: BaseKind, rank: int, scheme: Scheme) -> LowRankLayer:
    """An uninitialized low-rank replacement of ``layer`` at ``rank``, same dtype and device."""
    weight = geometry.layer_weight(layer)
    kwargs: dict[str, Any] = {
        "bias": geometry.layer_bias(layer) is not None,
        "dtype": weight.dtype,
        "device": weight.device,
    }
    if kind == "conv2d":
        assert isinstance(layer, nn.Conv2d)  # kind "conv2d" is an nn.Conv2d (base_kind)
        return LowRankConv2d(
            layer.in_channels,
            layer.out_channels,
            _pair(layer.kernel_size),
            rank,
            scheme=scheme,
            stride=_pair(layer.stride),
            padding=_pair(layer.padding),
            dilation=_pair(layer.dilation),
            **kwargs,
        )
    out_features, in_features = scheme_matrix(layer, kind, scheme).shape
    return LowRankLinear(in_features, out_features, rank, **kwargs)


def _pair(value: tuple[int, ...] | str) -> tuple[int, int]:
    # nn.Conv2d keeps kernel_size, stride, padding and dilation as pairs; check_supported refuses
    # string padding ("same", "valid") before a layer gets here.
    assert not isinstance(value, str) and len(value) == 2
    return value[0], value[1]


def from_factors(layer: nn.Module, kind: BaseKind, scheme: Scheme, left: Tensor, right: Tensor) -> LowRankLayer:
    """A low-rank replacement of ``layer`` with ``left @ right`` as its scheme matrix and its bias."""
    new = empty_like_layer(layer, kind, left.shape[1], scheme)
    new.set_factor_matrices(left, right)
    bias = geometry.layer_bias(layer)
    if bias is not None:
        assert new.U.bias is not None  # built with a bias because the layer has one
        with torch.no_grad():
            new.U.bias.copy_(bias)
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
