"""C3A: a block-circulant ΔW, applied by real FFT; its rank is not tied to its parameter count.

Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution",
https://arxiv.org/abs/2407.19342 (the paper's code is PEFT's ``tuners/c3a``). With block size b,
p = in/b input blocks x_j, q = out/b output blocks and one length-b kernel w_ij per block pair:

    Δy_i = (1 / in) · Σ_j C(w_ij) x_j = (1 / in) · irfft( Σ_j conj(rfft(w_ij)) ⊙ rfft(x_j) )
    C(v)[k, l] = v[(l − k) mod b]      (first-row circulant, PEFT's convention)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
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
class C3A(Delta):
    """C3A: block-circulant ΔW by FFT; in·out/b parameters at any rank, needs a large learning rate."""

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
        b = self.block_size
        # FFTs run in at least fp32: bf16 has no FFT, fp16 only for powers of two on GPU.
        dtype = torch.promote_types(x.dtype, torch.float32)
        spectrum = torch.fft.rfft(x.to(dtype).unflatten(-1, (-1, b)), n=b)  # (..., p, b//2+1)
        # The kernel's spectrum once per forward for all blocks, the 1/in scale folded into it
        # (q·p·(b/2+1) values, fewer than the activations' in most layers).
        kernel = torch.fft.rfft(self.kernel.to(dtype), n=b).conj() / self.in_features  # (q, p, b//2+1)
        # One batched product over blocks per frequency: the sum over input blocks j happens in the
        # frequency domain, so there is one inverse FFT per output block.
        mixed = torch.einsum("...jf,ijf->...if", spectrum, kernel)  # (..., q, b//2+1)
        return torch.fft.irfft(mixed, n=b).flatten(-2).to(x.dtype)  # (..., out)

    def delta_weight(self) -> Tensor:
        b = self.block_size
        k = torch.arange(b, device=self.kernel.device)
        shift = (k[None, :] - k[:, None]) % b  # C(v)[k, l] = v[(l − k) mod b]
        blocks = self.kernel[:, :, shift]  # (q, p, b, b): block (i, j), row k, column l
        return blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features) / self.in_features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"
