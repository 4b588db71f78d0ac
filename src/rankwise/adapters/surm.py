"""SURM: structured unrestricted-rank matrices (circulant, Toeplitz, Kronecker, LDR) in place of B A.

Sehanobish et al., "Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning",
NeurIPS 2024, https://arxiv.org/abs/2406.17740 (official code: arijitthegame/structured-matrices-PEFT).
Building blocks on length-n vectors, each applied by FFT in O(n log n), never formed in forward:

    C(c)[i, j] = c[(i − j) mod n]                        circulant, first column c
    S(h)[i, j] = h[i − j] if i ≥ j else −h[n + i − j]    skew-circulant
    T(v)[i, j] = v[|i − j|]                              symmetric Toeplitz

``surm`` (additive, mergeable) on an (out, in) layer, with s = α:

    circulant  ΔW = s · C(b ⊙ a)            toeplitz   ΔW = s · T(b) T(a)
    ldr        ΔW = s · Σ_i C(b_i) S(a_i)    kronecker  ΔW = (α / f) · b ⊗ a

n = in on square layers (the paper). For in ≠ out (our extension, a rectangular Toeplitz)
n = in + out − 1, the input is zero-padded to n and ΔW is the top-left out × in block: for the
circulant, a general rectangular Toeplitz matrix with all in + out − 1 diagonals free.

``surm_adapter`` (not mergeable) after a layer whose output h has width d:

    h ← h + GELU(M drop(h)) + β,    M = C(b ⊙ a), T(b ⊙ a) or b ⊗ a    (d × d)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..core.config import AdapterConfig, check_range
from ..core.delta import Adapter, Delta, OutputAdapter, as_method, check_configs_agree
from ..core.precision import at_least_fp32
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class SURMConfig(AdapterConfig):
    """SURM-LoRA's hyperparameters.

    Args:
        structure: the form of ΔW: ``"circulant"``, ``"toeplitz"`` (product of two symmetric
            Toeplitz matrices), ``"kronecker"`` or ``"ldr"`` (sum of ρ circulant × skew-circulant).
        alpha: α; the branch is scaled by α (by α / f for ``"kronecker"``); α > 0.
        displacement_rank: ρ, the number of terms of ``"ldr"`` (2ρn parameters); ρ >= 1.
        kron_factor: f for ``"kronecker"``: b is (out/f) × f and a is f × (in/f); f must divide
            in_features and out_features (checked at attach time).
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
    """

    # The parameter count is fixed by the layer (2n, or in + out); only "ldr" has a knob (ρ).
    size_knob: ClassVar[str | None] = None
    recommended_lr: ClassVar[float] = 2e-3  # official GLUE example (circulant, BERT-base, AdamW)

    structure: Literal["circulant", "toeplitz", "kronecker", "ldr"] = "circulant"  # paper's headline
    alpha: float = 1.0  # official circ_alpha, toep_alpha and kronecker_alpha
    displacement_rank: int = 1  # the official code takes it from the caller (num_adapters)
    kron_factor: int = 16  # divides the usual widths; the parameter count (in + out) does not depend on it
    dropout: float = 0.0  # official default

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "displacement_rank", 1)
        check_range(self, "kron_factor", 1)
        check_range(self, "dropout", 0, 1, high_open=True)


@dataclass(frozen=True, kw_only=True)
class SURMAdapterConfig(AdapterConfig):
    """SURM-Adapter's hyperparameters (the official code's form: one d × d structured matrix, GELU,
    a bias; no bottleneck). Target the layer whose output the adapter follows.

    Args:
        structure: M: ``"circulant"`` C(b ⊙ a), ``"toeplitz"`` T(b ⊙ a) or ``"kronecker"`` b ⊗ a.
        kron_factor: f for ``"kronecker"``: a is f × f and b is (d/f) × (d/f); f must divide the
            layer's out_features (checked at attach time).
        dropout: dropout probability on M's input only; in [0, 1).
    """

    size_knob: ClassVar[str | None] = None  # 3d parameters, fixed by the layer
    recommended_lr: ClassVar[float] = 2e-3  # official GLUE example (circulant adapter, BERT-base, AdamW)

    structure: Literal["circulant", "toeplitz", "kronecker"] = "circulant"  # official GLUE example
    kron_factor: int = 16  # the official code leaves (r0, r1) to the caller; see docs
    dropout: float = 0.0  # official GLUE example uses 0.15; 0 keeps the step-0 forward deterministic

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "kron_factor", 1)
        check_range(self, "dropout", 0, 1, high_open=True)


def _fast_size(m: int) -> int:
    """The smallest 2^i·3^j·5^k >= m: FFT lengths with small factors only (a prime length such as
    in + out − 1 = 3839 = 11·349 runs several times slower).

    For each odd part 3^j·5^k below the best size so far, the smallest power-of-two multiple that
    reaches m: a few dozen integer steps, so no cache is needed (torch.compile warns about cached
    functions, and counting up from m one integer at a time would take ~0.4 ms for m near 70,000).
    """
    best = 1 << (m - 1).bit_length()  # the smallest power of two >= m
    five = 1
    while five < best:
        odd = five
        while odd < best:
            best = min(best, odd << (-(-m // odd) - 1).bit_length())
            odd *= 3
        five *= 5
    return best


def _cyclic(t: Tensor, x: Tensor, size: int) -> Tensor:
    """The circular convolution t ⊛ x of length ``size``, both zero-padded to it (and broadcast)."""
    return _CircularConvolution.apply(t, x, size)


class _CircularConvolution(torch.autograd.Function):
    """``y = irfft(T · X)`` with ``T = rfft(t)``, ``X = rfft(x)`` (length ``size``), and its backward
    written out from ``G = rfft(grad)``:

        ∂x = irfft(conj(T) · G)[:len x],    ∂t = irfft(Σ conj(X) · G)[:len t]

    each summed over the dims it was broadcast along (∂t's sum runs over the tokens before its
    inverse FFT). Why not autograd: rfft's backward runs a full-length complex FFT and copies its
    real part, about a third of the step's FFT time on a 1024-wide layer. It keeps what autograd
    kept (the two spectra), so memory is unchanged.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, x: Tensor, size: int) -> Tensor:
        t_spectrum, x_spectrum = torch.fft.rfft(t, n=size), torch.fft.rfft(x, n=size)
        ctx.save_for_backward(t_spectrum, x_spectrum)
        ctx.size, ctx.t_shape, ctx.x_shape = size, t.shape, x.shape
        # irfft needs n: without it an odd length comes back one entry short.
        return torch.fft.irfft(t_spectrum * x_spectrum, n=size)

    @staticmethod
    @once_differentiable  # the saved spectra are constants to autograd: double backward raises
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        t_spectrum, x_spectrum = ctx.saved_tensors
        size, t_shape, x_shape = ctx.size, ctx.t_shape, ctx.x_shape
        spectrum = torch.fft.rfft(grad, n=size)
        grad_t = grad_x = None
        if ctx.needs_input_grad[0]:
            cross = (x_spectrum.conj() * spectrum).sum_to_size(*t_shape[:-1], spectrum.shape[-1])
            grad_t = torch.fft.irfft(cross, n=size)[..., : t_shape[-1]]
        if ctx.needs_input_grad[1]:
            grad_x = torch.fft.irfft(t_spectrum.conj() * spectrum, n=size)[..., : x_shape[-1]]
            grad_x = grad_x.sum_to_size(x_shape)
        return grad_t, grad_x, None


def _toeplitz_mul(column: Tensor, row_tail: Tensor, x: Tensor) -> Tensor:
    """R x for the m × k Toeplitz matrix R with first column ``column`` (m) and first row
    ``[column[0], *row_tail]`` (k), for x of shape (..., <= k): R is the top-left block of the
    circulant of any length N >= m + k − 1 with first column [column, 0, …, 0, reversed row_tail]."""
    m, size = column.shape[-1], _fast_size(column.shape[-1] + row_tail.shape[-1])
    gap = column.new_zeros(*column.shape[:-1], size - m - row_tail.shape[-1])
    return _cyclic(torch.cat([column, gap, row_tail.flip(-1)], -1), x, size)[..., :m]


def _circulant_mul(c: Tensor, x: Tensor) -> Tensor:
    """C(c) x, n = len(c): one FFT of length n, or of a fast length >= 2n − 1 when n has large factors."""
    n = c.shape[-1]
    return _cyclic(c, x, n) if _fast_size(n) == n else _toeplitz_mul(c, c[..., 1:].flip(-1), x)


def _symmetric_toeplitz_mul(v: Tensor, x: Tensor) -> Tensor:
    """T(v) x: first column and first row are both v."""
    return _toeplitz_mul(v, v[..., 1:], x)


def _skew_mul(h: Tensor, x: Tensor) -> Tensor:
    """S(h) x: first column h, first row [h[0], −h[n−1], …, −h[1]]."""
    return _toeplitz_mul(h, -h[..., 1:].flip(-1), x)


def _kronecker_mul(b: Tensor, a: Tensor, x: Tensor) -> Tensor:
    """(b ⊗ a) x without forming b ⊗ a: vec_row(b X aᵀ), X the row-major view of x as (b.cols, a.cols)."""
    # X aᵀ first: 2f(in + out) FLOPs per row for surm's shapes, against 4·in·out/f for (b X) aᵀ.
    return (b @ (x.unflatten(-1, (b.shape[1], a.shape[1])) @ a.t())).flatten(-2)


def _offsets(n: int, device: torch.device) -> Tensor:
    k = torch.arange(n, device=device)
    return k[:, None] - k[None, :]  # (i − j) at row i, column j


@register("surm", SURMConfig)
class SURM(Delta[SURMConfig]):
    """SURM: ΔW circulant, Toeplitz, Kronecker or LDR; O(d) parameters at unrestricted rank."""

    double_backward = False  # the FFT backward keeps only the spectra (once_differentiable)

    def __init__(self, w0: Tensor, config: SURMConfig) -> None:
        super().__init__(w0, config)
        self.structure = config.structure
        self.scale = config.alpha / config.kron_factor if self.structure == "kronecker" else config.alpha
        a_shape, b_shape = self.factor_shapes(self.in_features, self.out_features, config)
        self.a = nn.Parameter(torch.empty(a_shape, dtype=w0.dtype, device=w0.device))
        self.b = nn.Parameter(torch.zeros(b_shape, dtype=w0.dtype, device=w0.device))  # ΔW = 0 at step 0
        if self.structure == "kronecker":  # kaiming-uniform(a=√5) on a, as LoRA's A
            bound = 1 / math.sqrt(a_shape[1])
            nn.init.uniform_(self.a, -bound, bound)
        else:  # official inits: std 1 for the circulant's a, 0.02 for Toeplitz and the skew part of LDR
            nn.init.normal_(self.a, std=1.0 if self.structure == "circulant" else 0.02)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @staticmethod
    def factor_shapes(in_features: int, out_features: int, config: SURMConfig) -> tuple[tuple[int, ...], ...]:
        """Shapes of ``a`` (random at init) and ``b`` (zero at init) on an (out, in) layer."""
        if config.structure == "kronecker":
            f = config.kron_factor
            if in_features % f or out_features % f:
                raise ValueError(
                    f"kron_factor={f} must divide in_features={in_features} and out_features={out_features}"
                )
            return (f, in_features // f), (out_features // f, f)
        n = in_features if in_features == out_features else in_features + out_features - 1
        shape = (config.displacement_rank, n) if config.structure == "ldr" else (n,)
        return shape, shape

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: SURMConfig) -> int:
        return sum(math.prod(shape) for shape in cls.factor_shapes(in_features, out_features, config))

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(x)
        # The scale goes on b (n numbers) rather than on the output (a full pass each way).
        if self.structure == "kronecker":
            return _kronecker_mul(self.scale * self.b, self.a, x)
        # FFTs run in at least fp32: bf16 has no FFT, fp16 only for powers of two on GPU.
        dtype = at_least_fp32(x.dtype)
        a, b, z = self.a.to(dtype), (self.scale * self.b).to(dtype), x.to(dtype)
        if self.structure == "circulant" and self.in_features == self.out_features:
            y = _circulant_mul(b * a, z)
        elif self.structure == "circulant":  # the rectangular Toeplitz: column c[:out], row c[0], c[n−1], …, c[out]
            c = b * a
            y = _toeplitz_mul(c[: self.out_features], c[self.out_features :].flip(-1), z)
        elif self.structure == "toeplitz":
            y = _symmetric_toeplitz_mul(b, _symmetric_toeplitz_mul(a, z))
        else:
            y = _circulant_mul(b, _skew_mul(a, z.unsqueeze(-2))).sum(-2)  # Σ_i C(b_i) S(a_i) z; (..., ρ, n) summed
        return y[..., : self.out_features].to(x.dtype)

    def delta_weight(self) -> Tensor:
        a, b = self.a, self.b
        if self.structure == "kronecker":
            return self.scale * torch.kron(b, a)
        n, rows, cols = a.shape[-1], self.out_features, self.in_features
        offsets = _offsets(n, a.device)
        if self.structure == "circulant":
            matrix = (b * a)[offsets % n][:rows, :cols]
        elif self.structure == "toeplitz":
            matrix = b[offsets.abs()][:rows] @ a[offsets.abs()][:, :cols]
        else:
            # S(a_i)[j, k] = [a_i, −a_i][(j − k) mod 2n]: the skew-circulant's definition, as one gather
            skew = torch.cat([a, -a], -1)[:, offsets % (2 * n)]  # (ρ, n, n)
            matrix = (b[:, offsets % n][:, :rows] @ skew[:, :, :cols]).sum(0)
        return self.scale * matrix

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact for the circulant, ``ΔW = s C(b ⊙ a)``, linear in the vector ``b ⊙ a``: the new one
        is ``a = Σ_i w_i s_i (b_i ⊙ a_i) / s``, ``b = 1``; and for LDR, ``ΔW = s Σ_j C(b_j) S(a_j)``:
        the parts' terms side by side (displacement rank ``Σ ρ_i``), each weight and scale folded
        into its b.

        Raises:
            ValueError: the parts have different structures, or a structure with no such form: the
                Toeplitz form ``T(b) T(a)`` and the Kronecker ``b ⊗ a`` are products of the two
                factors, and a sum of two products is not one (merge them instead).
        """
        structured = [(weight, as_method(cls, adapter)) for weight, adapter in parts]
        structures = sorted({adapter.structure for _, adapter in structured})
        first = structured[0][1]
        if structures not in (["circulant"], ["ldr"]):
            raise ValueError(
                f"SURM: structures {structures} have no exact combination (only circulant with circulant, or LDR "
                "with LDR: the Toeplitz and Kronecker forms are products of their two factors); merge the adapters "
                "instead (rankwise.set_active(model, names), rankwise.merge(model))"
            )
        check_configs_agree(cls, parts, folded=("structure", "alpha", "displacement_rank", "kron_factor"))
        ldr = structures == ["ldr"]
        config = first.config
        if ldr:
            config = dataclasses.replace(config, displacement_rank=sum(a.a.shape[0] for _, a in structured))
        new = cls(w0, config).to(device=w0.device, dtype=first.a.dtype)
        with torch.no_grad():
            if ldr:
                new.a.copy_(torch.cat([a.a for _, a in structured]))
                new.b.copy_(torch.cat([a.b * (w * a.scale / new.scale) for w, a in structured]))
            else:
                new.a.copy_(torch.stack([w * a.scale * (a.b * a.a) for w, a in structured]).sum(0) / new.scale)
                new.b.fill_(1.0)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure}, scale={self.scale:g}"


@register("surm_adapter", SURMAdapterConfig)
class SURMAdapter(OutputAdapter[SURMAdapterConfig]):
    """SURM adapter: h + GELU(M h) + β after a layer, M a structured d × d matrix; 3d parameters (circulant)."""

    double_backward = False  # the FFT backward keeps only the spectra (once_differentiable)
    # It maps the layer's output only, so an embedding's rows are as good an input as a Linear's.
    supported_bases = frozenset({"linear", "conv1d", "conv2d", "embedding"})

    def __init__(self, w0: Tensor, config: SURMAdapterConfig) -> None:
        super().__init__(w0, config)
        self.structure = config.structure
        a_shape, b_shape = self.factor_shapes(self.out_features, config)
        factory: dict[str, Any] = {"dtype": w0.dtype, "device": w0.device}
        self.a = nn.Parameter(torch.empty(a_shape, **factory).normal_(std=0.02))  # official init
        self.b = nn.Parameter(torch.zeros(b_shape, **factory))  # M = 0: h ← h + GELU(0) + 0 = h at step 0
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory))  # β
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @staticmethod
    def factor_shapes(width: int, config: SURMAdapterConfig) -> tuple[tuple[int, ...], ...]:
        """Shapes of ``a`` (random at init) and ``b`` (zero at init) for an output of width d."""
        if config.structure == "kronecker":
            f = config.kron_factor
            if width % f:
                raise ValueError(f"kron_factor={f} must divide the layer's out_features={width}")
            return (f, f), (width // f, width // f)
        return (width,), (width,)

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: SURMAdapterConfig) -> int:
        return out_features + sum(math.prod(shape) for shape in cls.factor_shapes(out_features, config))

    def forward(self, h: Tensor) -> Tensor:
        z = self.dropout(h)
        if self.structure == "kronecker":
            m = _kronecker_mul(self.b, self.a, z)
        else:
            dtype = at_least_fp32(z.dtype)  # FFTs, as in SURM.forward
            c, z = (self.b * self.a).to(dtype), z.to(dtype)
            m = _circulant_mul(c, z) if self.structure == "circulant" else _symmetric_toeplitz_mul(c, z)
        return h + F.gelu(m.to(h.dtype)) + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure}"
