"""BoRA: DoRA's magnitude along both dimensions, one per output unit and one per input feature.

Wang, Fan, Bao, Jiang, Song, "BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation",
https://arxiv.org/abs/2412.06441.

    V = W0 + s B A,   a = m_r / ||V||_row,   H = diag(a) V,   c = m_c / ||H||_col
    W' = diag(a) V diag(c),   y = a ⊙ ((x ⊙ c) W0ᵀ + s ((x ⊙ c) Aᵀ) Bᵀ) + b

Row step first, then the column step (so the column norms of W' are exactly m_c); both norms
detached in backward by default, as DoRA does (DoRA paper §4.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import geometry
from ..core.delta import MergeState, Reparam
from ..core.precision import at_least_fp32
from ..core.registry import register
from .dora import DoRAConfig, floor_norm, scale_rows
from .lora import LowRank


@dataclass(frozen=True, kw_only=True)
class BoRAConfig(DoRAConfig):
    """BoRA's hyperparameters: DoRA's (LoRA's fields for the direction update), plus:

    Args:
        detach_norms: treat ``||V||_row`` and ``||H||_col`` as constants in backward (DoRA's
            memory-saving convention, the default); ``False`` back-propagates through them (an
            ablation: the full-size V is then kept for backward).
    """

    size_knob: ClassVar[str | None] = "rank"
    # The paper's value was not retrieved; DoRA's (LLaMA-7B commonsense) instead.
    recommended_lr: ClassVar[float] = 2e-4

    detach_norms: bool = True  # DoRA's convention (DoRA paper §4.3); the paper's was not verified


@register("bora", BoRAConfig)
class BoRA(LowRank[BoRAConfig], Reparam[BoRAConfig]):
    """BoRA: row and column magnitudes around a LoRA-updated direction; ≥ DoRA by small margins."""

    exact_gradients = False  # both norms are detached in backward, unless detach_norms=False
    # On an embedding (W0 = weightᵀ, (dim, num_embeddings)) the row magnitude is one per embedding
    # dimension and the column magnitude one per token.
    supported_bases = frozenset({"linear", "conv1d", "conv2d", "embedding"})

    def __init__(self, w0: Tensor, config: BoRAConfig) -> None:
        super().__init__(w0, config)
        dtype = at_least_fp32(w0.dtype)
        # m_r = ||W0||_row and m_c = ||W0||_col (a = 1 at init), so W' = W0 at step 0 (B = 0).
        self.row_magnitude = nn.Parameter(torch.linalg.vector_norm(w0, dim=1, dtype=dtype).to(w0.dtype))
        self.column_magnitude = nn.Parameter(torch.linalg.vector_norm(w0, dim=0, dtype=dtype).to(w0.dtype))
        self.detach_norms = config.detach_norms

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: BoRAConfig) -> int:
        return config.rank * (in_features + out_features) + in_features + out_features

    def gains(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, c)``, shapes (out,) and (in,), with ``W' = diag(a) V diag(c)``; norms in fp32 at least.

        The column norm of ``H = diag(a) V`` needs ``Σ_i a_i² V_ij²``; its W0 part alone needs an
        (out, in) temporary since ``a`` changes every step, so DoRA's expansion saves nothing
        here. We form V once instead: both norms are then exact (no cancellation between expanded
        terms), and with detached norms V is built under ``no_grad`` and freed before the matmul,
        so nothing of size out × in is kept for backward.
        """
        dtype = at_least_fp32(w0.dtype)
        exact = torch.is_grad_enabled() and not self.detach_norms
        with torch.set_grad_enabled(exact):
            v = torch.addmm(w0.to(dtype), self.B.to(dtype), self.A.to(dtype), alpha=self.scale)  # (out, in)
            row_norm = floor_norm(torch.linalg.vector_norm(v, dim=1))
            row_gain = (self.row_magnitude.to(dtype) / row_norm).unsqueeze(1)
            # In place when nothing is recorded: one full-size temporary instead of two.
            h = v * row_gain if exact else v.mul_(row_gain)
            column_norm = floor_norm(torch.linalg.vector_norm(h, dim=0))
        return self.row_magnitude / row_norm.to(w0.dtype), self.column_magnitude / column_norm.to(w0.dtype)

    def forward(self, x: Tensor, w0: Tensor) -> Tensor:
        return self.output(x, w0, None)

    def output(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        w0 = w0.to(x.dtype)
        row_gain, column_gain = self.gains(w0)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return scale_rows(self.direction(x * column_gain, w0), row_gain, bias)
        # With dropout, the base term keeps the clean input and the rest of W' − W0 sees the
        # dropped one, as DoRA (PEFT's convention): x W0ᵀ + x̃ (W' − W0)ᵀ.
        dropped = self.dropout(x)
        scaled = dropped * column_gain
        y = F.linear(x - dropped, w0) + row_gain * (F.linear(scaled, w0) + self.lowrank(scaled))
        return y if bias is None else y + bias

    def embed(self, ids: Tensor, rows: Tensor, base: nn.Module) -> Tensor:
        """``a ⊙ c[ids] (W0ᵀ[ids] + s · A[:, ids]ᵀ Bᵀ)``: the rows of ``W'ᵀ`` for ``ids``, from the
        base's rows; the token's column gain is looked up as the embedding looks up its weight
        (the padding token's gets no gradient)."""
        row_gain, column_gain = self.gains(geometry.weight_matrix(base, "embedding"))
        token_gain = geometry.embedding_columns(ids, column_gain.unsqueeze(0), base).to(rows.dtype)  # (..., 1)
        adapted = scale_rows((rows + self.lowrank_rows(ids, base)) * token_gain, row_gain.to(rows.dtype), None)
        mask = geometry.dropped_tokens(self.dropout, ids, rows)
        # With dropout a dropped token keeps its base row (x W0ᵀ + x̃ (W' − W0)ᵀ, as on a Linear).
        return adapted if mask is None else rows + mask * (adapted - rows)

    def merged_weight(self, w0: Tensor) -> Tensor:
        return self.merged_with_state(w0)[0]

    def merged_with_state(self, w0: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``W'`` and the gains ``(a, c)``: unmerge inverts both scalings with them, and ``W'``
        does not give them back."""
        row_gain, column_gain = self.gains(w0)
        direction = w0 + self.lowrank_weight().to(w0.dtype)
        return row_gain.unsqueeze(1) * direction * column_gain, (row_gain, column_gain)

    def restore_weight(self, merged: Tensor, gains: MergeState) -> Tensor:
        assert isinstance(gains, tuple)  # what merged_with_state returned: (row gain, column gain)
        row_gain, column_gain = (g.to(merged.dtype) for g in gains)
        return merged / column_gain / row_gain.unsqueeze(1) - self.lowrank_weight().to(merged.dtype)
