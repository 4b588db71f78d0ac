"""LoLDU: freeze the LU factors of W0 and train only their diagonal, r numbers per layer.

Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", https://arxiv.org/abs/2410.13618.

    W0 = P L U = P L diag(D) Ū                      (LU with partial pivoting, Ū = U / D row-wise)
    W' = W0 − σ0 P L_r diag(D_r) Ū_r + σ P L_r diag(z) Ū_r,   z = D_r and σ = σ0 = α / r at init
    ΔW = P L_r diag(σ z − σ0 D_r) Ū_r

with L_r, D_r, Ū_r the first r pivots' columns, entries and rows. W0 stays the frozen base and only
ΔW is this module (the paper's residual W0 − σ0 P L_r diag(D_r) Ū_r is the same model, but holds
W0 at step 0 only to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_range
from ..core.delta import Adapter, Delta, add_product, as_method, check_configs_agree, low_rank_product
from ..core.precision import at_least_fp32
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class LoLDUConfig(AdapterConfig):
    """LoLDU's hyperparameters.

    Args:
        rank: r, how many LU pivots (in elimination order) are adapted; 1 <= r <= min(in, out) of
            every target (checked at attach time, with the first r pivots non-zero).
        alpha: α; the branch is scaled by σ0 = α / r; α > 0.
        train_scale: also train σ (one more parameter per layer). The official code creates σ as a
            parameter but hands only z to the optimizer, so it stays frozen by default.
    """

    size_knob: ClassVar[str | None] = "rank"
    recommended_lr: ClassVar[float] = 1e-3  # official code's demo (SKDDJ/LoLDU, AdamW)

    rank: int = 16  # ours (64 or full rank are the larger options); the code's from_linear default is 4
    alpha: float = 1.0  # official code's lora_alpha default, σ0 = 1 / r
    train_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)
        check_range(self, "alpha", 0, low_open=True)


@register("loldu", LoLDUConfig)
class LoLDU(Delta[LoLDUConfig]):
    """LoLDU: the diagonal of W0's LU factors is trained, L and U frozen; r parameters per layer."""

    example_config = {"rank": 2}
    # Buffers (register_buffer), declared for the type checker; sigma is a Parameter instead when trained.
    L: Tensor
    U: Tensor
    initial: Tensor
    sigma: Tensor

    def __init__(self, w0: Tensor, config: LoLDUConfig) -> None:
        super().__init__(w0, config)
        rank = config.rank
        if rank > min(self.in_features, self.out_features):
            raise ValueError(
                f"rank={rank} must be <= min(in_features={self.in_features}, out_features={self.out_features})"
            )
        lower, diagonal, upper = _top_pivots(w0, rank)
        sigma0 = torch.tensor(config.alpha / rank, dtype=w0.dtype, device=w0.device)
        # L and U are buffers kept in the checkpoint: an LU recomputed on another device or LAPACK
        # may break a pivot tie the other way, and the trained z would then scale other directions.
        self.register_buffer("L", lower.to(w0.dtype))  # (out, rank): P L_r, rows in W0's order
        self.register_buffer("U", upper.to(w0.dtype))  # (rank, in): Ū_r, unit diagonal
        # σ0 D_r from the same σ0 tensor that σ starts at, so σ z − σ0 D_r is exactly 0 at init.
        self.register_buffer("initial", sigma0 * diagonal.to(w0.dtype))
        self.z = nn.Parameter(diagonal.to(w0.dtype))
        if config.train_scale:
            self.sigma = nn.Parameter(sigma0)
        else:
            self.register_buffer("sigma", sigma0)

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: LoLDUConfig) -> int:
        return config.rank + int(config.train_scale)

    def gain(self) -> Tensor:
        """``σ z − σ0 D_r``, the diagonal of ΔW between its frozen factors; shape (rank,)."""
        return self.sigma * self.z - self.initial

    def forward(self, x: Tensor) -> Tensor:
        return low_rank_product(self._hidden(x), self.L.t())

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return add_product(y, self._hidden(x), self.L.t())

    def _hidden(self, x: Tensor) -> Tensor:
        return F.linear(x, self.U) * self.gain()  # (..., rank)

    def delta_weight(self) -> Tensor:
        return (self.L * self.gain()) @ self.U

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact where the frozen factors are the same (the same layer's LU, the same rank):
        ``ΔW = L diag(g) U`` is linear in the gain ``g = σ z − σ0 D_r``, so the new one has
        ``g = Σ_i w_i g_i``, through ``z = (g + σ0 D_r) / σ``.

        Raises:
            ValueError: the parts' (or the new adapter's) L, U differ, e.g. different ranks.
        """
        check_configs_agree(cls, parts, folded=("rank", "alpha"))  # a rank's own L, U are checked below
        diagonals = [(weight, as_method(cls, adapter)) for weight, adapter in parts]
        first = diagonals[0][1]
        new = cls(w0, first.config).to(device=w0.device, dtype=first.z.dtype)
        if not all(torch.equal(a.L, new.L) and torch.equal(a.U, new.U) for _, a in diagonals):
            raise ValueError("LoLDU: the adapters' frozen factors L, U differ (another rank or base weight)")
        with torch.no_grad():
            gain = sum(w * a.gain() for w, a in diagonals)
            new.z.copy_((gain + new.initial) / new.sigma)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.z.shape[0]}"


def _top_pivots(w0: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(P L_r, D_r, Ū_r)`` of ``w0 = P L U``, in at least fp32 (an LU in half precision is too coarse).

    Raises:
        ValueError: if one of the first ``rank`` pivots is zero to working precision, below √eps
            of the largest (Ū would divide by it); if ``w0`` is on the meta device.
    """
    if w0.is_meta:
        # Not supported rather than deferred: buffers of the right shapes would hold no factors
        # until a later load filled them, and a model materialized without that load would run
        # on uninitialized memory.
        raise ValueError(
            "the weight is on the meta device, and LoLDU's factors come from its values; load the weights, then adapt"
        )
    w = w0.to(at_least_fp32(w0.dtype))
    # The _ex form: a zero pivot must reach our check below, not raise inside LAPACK's wrapper.
    packed, pivots, _ = torch.linalg.lu_factor_ex(w)
    diagonal = packed.diagonal()[:rank].clone()  # a copy: the packed (out, in) factor is dropped
    # A pivot comes from cancellations, so a zero one lands well above eps (1e-6 relative is
    # typical in fp32), and Ū = U / D multiplies its rounding by 1/D. Random Gaussian weights keep
    # every pivot above 1e-2 of the largest; below √eps (3e-4 in fp32) a row of Ū is rounding noise.
    tolerance = torch.finfo(w.dtype).eps ** 0.5 * packed.diagonal().abs().max()
    small = (diagonal.abs() <= tolerance).nonzero()
    if len(small):
        first = small[0].item()
        hint = f"use rank <= {first}" if first else "its first input column is zero to working precision"
        raise ValueError(
            f"rank={rank} needs {rank} non-zero LU pivots, but pivot {first} of the weight is "
            f"{diagonal[first].item():.3g} (a rank-deficient weight); {hint}"
        )
    lower = packed[:, :rank].tril(-1) + torch.eye(*packed[:, :rank].shape, dtype=w.dtype, device=w.device)
    upper = packed[:rank].triu() / diagonal.unsqueeze(1)
    # LAPACK's pivots are sequential row swaps (1-based): row t of L U is row order[t] of w0.
    order = list(range(w.shape[0]))
    for t, p in enumerate(pivots.tolist()):
        order[t], order[p - 1] = order[p - 1], order[t]
    permuted = torch.empty_like(lower)
    permuted[torch.tensor(order, device=w.device)] = lower
    return permuted, diagonal, upper
