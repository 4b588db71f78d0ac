"""C3A: a block-circulant ΔW, applied by real FFT; its rank is not tied to its parameter count.

Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution",
https://arxiv.org/abs/2407.19342 (the paper's code is PEFT's ``tuners/c3a``). With block size b,
p = in/b input blocks x_j, q = out/b output blocks and one length-b kernel w_ij per block pair:

    Δy_i = (1 / in) · Σ_j C(w_ij) x_j = (1 / in) · irfft( Σ_j conj(rfft(w_ij)) ⊙ rfft(x_j) )
    C(v)[k, l] = v[(l − k) mod b]      (first-row circulant, PEFT's convention)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.config import AdapterConfig
from ..core.delta import Adapter, Delta, summed_parameters
from ..core.precision import at_least_fp32
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class C3AConfig(AdapterConfig):
    """C3A's hyperparameters. The scale is fixed at ``1 / in_features`` (PEFT), so the learning rate
    is much larger than LoRA's.

    Args:
        block_size: b, the side of each circulant block; it must divide in_features and
            out_features of every target (checked at attach time). ``None`` uses, per layer,
            ``gcd(in_features, out_features)``: the largest valid block, hence the fewest
            parameters (PEFT's advice when unsure; b = 768 on RoBERTa-base is the paper's GLUE run).
            A larger b means fewer parameters: ``in · out / b``.
        init: ``"zeros"``: ΔW = 0, so step 0 is the base model (the kernel is the only factor, so
            its gradient is not zero); ``"xavier_uniform"``: PEFT's default,
            ``U(±√(6 / (in + out)))``, a small non-zero ΔW at step 0.
    """

    size_knob: ClassVar[str | None] = "block_size"
    # PEFT's C3A RoBERTa GLUE example and its MetaMathQA benchmark (AdamW, weight decay 1e-5).
    recommended_lr: ClassVar[float] = 3e-1

    block_size: int | None = None  # per-layer gcd(in, out); PEFT's fixed default is 256
    init: Literal["zeros", "xavier_uniform"] = "zeros"  # PEFT: "xavier_uniform" (see docs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"C3AConfig: block_size={self.block_size} must be >= 1 (or None for gcd(in, out))")


def _block_size(in_features: int, out_features: int, config: C3AConfig) -> int:
    """The block size C3A uses on an (out, in) layer.

    Raises:
        ValueError: if ``config.block_size`` does not divide both dimensions.
    """
    if config.block_size is None:
        return math.gcd(in_features, out_features)
    if in_features % config.block_size or out_features % config.block_size:
        raise ValueError(
            f"block_size={config.block_size} must divide in_features={in_features} and "
            f"out_features={out_features}; common divisors of both work, gcd={math.gcd(in_features, out_features)}"
        )
    return config.block_size


@register("c3a", C3AConfig)
class C3A(Delta[C3AConfig]):
    """C3A: block-circulant ΔW by FFT; in·out/b parameters at any rank, needs a large learning rate."""

    example_config = {"block_size": 4}

    def __init__(self, w0: Tensor, config: C3AConfig) -> None:
        super().__init__(w0, config)
        self.block_size = _block_size(self.in_features, self.out_features, config)
        b = self.block_size
        self.kernel = nn.Parameter(
            torch.zeros(self.out_features // b, self.in_features // b, b, dtype=w0.dtype, device=w0.device)
        )
        if config.init == "xavier_uniform":
            bound = math.sqrt(6 / (self.in_features + self.out_features))
            nn.init.uniform_(self.kernel, -bound, bound)

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: C3AConfig) -> int:
        return in_features * out_features // _block_size(in_features, out_features, config)

    def forward(self, x: Tensor) -> Tensor:
        # FFTs run in at least fp32: bf16 has no FFT, fp16 only for powers of two on GPU.
        dtype = at_least_fp32(x.dtype)
        rows = x.reshape(-1, self.in_features).to(dtype)
        y = _BlockCirculant.apply(rows, self.kernel.to(dtype))  # (tokens, out)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def delta_weight(self) -> Tensor:
        b = self.block_size
        k = torch.arange(b, device=self.kernel.device)
        shift = (k[None, :] - k[:, None]) % b  # C(v)[k, l] = v[(l − k) mod b]
        blocks = self.kernel[:, :, shift]  # (q, p, b, b): block (i, j), row k, column l
        return blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features) / self.in_features

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact: ΔW is linear in the kernels (of one block size), so they add, ``Σ_i w_i p_i``.

        Raises:
            ValueError: the parts' configs differ (:func:`~rankwise.core.delta.summed_parameters`).
        """
        return summed_parameters(cls, parts, w0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


class _BlockCirculant(torch.autograd.Function):
    """``x ΔWᵀ`` for x of shape (tokens, in) and the kernel (q, p, b), with a written-out backward.

    With ``W = rfft(w) / in`` (q, p, b//2+1), ``X_j = rfft(x_j)`` and ``G_i = rfft(g_i)`` for the
    output gradient g:

        Δy_i = irfft(Σ_j conj(W_ij) X_j)         (cross-correlation: the first-row circulant)
        ∂x_j = irfft(Σ_i W_ij G_i)               (convolution: the transposed circulant)
        ∂w_ij = irfft(Σ_tokens conj(G_i) X_j) / in

    Why not autograd through rfft/einsum/irfft: for the kernel's gradient autograd keeps copies of
    the input's spectrum (two tensors as large as x per layer), where this keeps x alone, as PEFT
    does, and recomputes its spectrum in backward; rfft's backward runs a full complex FFT; and
    einsum hands bmm (tokens, block, frequency) operands that it copies batch by batch. Here each
    spectrum is transposed once to frequency-major (frequency, tokens, block), so every sum over
    blocks is one contiguous bmm.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Tensor) -> Tensor:
        _, p, b = kernel.shape
        weight = _kernel_spectrum(kernel, x.shape[1])  # (F, q, p)
        mixed = torch.bmm(_spectrum(x, p, b), weight.mH)  # (F, tokens, q)
        # The kernel's spectrum is recomputed in backward, not kept: one small FFT (in·out/b numbers)
        # against (b/2+1)·q·p complex numbers held per layer until backward, and under double
        # backward the recomputed spectrum keeps its graph to the kernel.
        ctx.save_for_backward(x, kernel)
        ctx.block_size = b
        return _signal(mixed, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, kernel = ctx.saved_tensors
        weight = _kernel_spectrum(kernel, x.shape[1])
        b, (frequencies, q, p) = ctx.block_size, weight.shape
        g = _spectrum(grad, q, b)  # (F, tokens, q)
        grad_x = _signal(torch.bmm(g, weight), b) if ctx.needs_input_grad[0] else None
        grad_kernel = None
        if ctx.needs_input_grad[1]:
            # Σ_tokens conj(G) X as one real bmm over (re, im) pairs: bmm would first copy a
            # conjugated complex operand. With G = a + ib, X = c + id: conj(G) X = (ac + bd) + i(ad − bc).
            g_real = torch.view_as_real(g).flatten(2).transpose(1, 2)  # (F, q·2, tokens)
            x_real = torch.view_as_real(_spectrum(x, p, b)).flatten(2)  # (F, tokens, p·2)
            m = torch.bmm(g_real, x_real).view(frequencies, q, 2, p, 2)
            cross = torch.complex(m[:, :, 0, :, 0] + m[:, :, 1, :, 1], m[:, :, 0, :, 1] - m[:, :, 1, :, 0])
            grad_kernel = torch.fft.irfft(cross.permute(1, 2, 0), n=b) / x.shape[1]
        return grad_x, grad_kernel


def _kernel_spectrum(kernel: Tensor, in_features: int) -> Tensor:
    """(q, p, b) kernel → (b//2+1, q, p) spectrum, with the 1/in scale of ΔW."""
    return _frequency_major(torch.fft.rfft(kernel, n=kernel.shape[-1]) / in_features)


def _frequency_major(t: Tensor) -> Tensor:
    """(a, b, F) → (F, a, b), contiguous. Written as one 2-D transpose because ``copy_`` tiles a 2-D
    transpose (cache-friendly, several times faster here) but walks a 3-D permute one frequency
    plane at a time."""
    a, b, frequencies = t.shape
    return t.reshape(a * b, frequencies).t().contiguous().view(frequencies, a, b)


def _spectrum(t: Tensor, blocks: int, b: int) -> Tensor:
    """(tokens, blocks·b) real → (b//2+1, tokens, blocks) complex: the FFT runs along contiguous
    memory, and one transpose makes each frequency a contiguous (tokens, blocks) matrix."""
    return _frequency_major(torch.fft.rfft(t.reshape(t.shape[0], blocks, b), n=b))


def _signal(spectrum: Tensor, b: int) -> Tensor:
    """Inverse of :func:`_spectrum`: (F, tokens, blocks) → (tokens, blocks·b); irfft needs n for odd b."""
    frequencies, tokens, blocks = spectrum.shape
    token_major = spectrum.reshape(frequencies, tokens * blocks).t().contiguous()  # 2-D transpose, as above
    return torch.fft.irfft(token_major, n=b).view(tokens, blocks * b)
