"""DoRA: the adapted weight as a trainable magnitude times a unit-norm direction ``W0 + s B A``.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
https://arxiv.org/abs/2402.09353.

    V = W0 + s B A,   n = ||V||_row (detached),   W' = diag(m / n) V
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import geometry
from ..core.delta import MergeState, Reparam
from ..core.precision import apply_in, at_least_fp32
from ..core.registry import register
from .lora import LoRAConfig, LowRank

# Far below the norm of any row a weight uses, and a normal number in fp32 (smallest 1.2e-38).
_NORM_FLOOR = 1e-12


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(LoRAConfig):
    """DoRA's hyperparameters: LoRA's, for the direction update. The DoRA paper uses r = 32,
    α = 64, dropout 0.05 and a slightly lower learning rate than LoRA."""

    recommended_lr: ClassVar[float] = 2e-4  # DoRA paper, LLaMA-7B commonsense (LoRA used 3e-4 there)


@register("dora", DoRAConfig)
class DoRA(LowRank[DoRAConfig], Reparam[DoRAConfig]):
    """DoRA: magnitude × direction, the direction updated by LoRA; ≈ LoRA's quality, sometimes better."""

    # On an embedding, W0 = weightᵀ is (dim, num_embeddings): the magnitude is one per embedding
    # dimension, the norm over the vocabulary, as PEFT's DoRA embedding computes it.
    supported_bases = frozenset({"linear", "conv1d", "embedding"})
    exact_gradients = False  # the row norm is detached in backward (DoRA paper §4.3)

    def __init__(self, w0: Tensor, config: DoRAConfig) -> None:
        super().__init__(w0, config)
        # m = ||W0||_row, so W' = W0 at init (B = 0).
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(w0, dim=1, dtype=at_least_fp32(w0.dtype)).to(w0.dtype))

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: DoRAConfig) -> int:
        return super().num_params(in_features, out_features, config) + out_features

    def direction_norm(self, w0: Tensor) -> Tensor:
        """``||W0 + s B A||_row`` in fp32, detached (paper §4.3), without forming the (out, in) sum.

        ``||v_i||² = ||w0_i||² + 2s·⟨b_i, A w0_iᵀ⟩ + s²·b_i (A Aᵀ) b_iᵀ``: the cross terms cost
        one (out, in) × (in, rank) product and no full-size temporary, so nothing of size
        out × in stays alive for backward.
        """
        with torch.no_grad():
            dtype = at_least_fp32(w0.dtype)  # half-precision sums of squares lose the update against W0
            w0, A, B = w0.to(dtype), self.A.to(dtype), self.B.to(dtype)
            s = self.scale
            # (rank, out): 2s·A W0ᵀ + s²·(A Aᵀ) Bᵀ in one addmm, A W0ᵀ in MKL's faster orientation.
            cross = torch.addmm(A @ w0.t(), A @ A.t(), B.t(), beta=2 * s, alpha=s * s)
            squared = torch.linalg.vector_norm(w0, dim=1).square() + torch.linalg.vecdot(B.t(), cross, dim=0)
            return floor_norm(squared.clamp_min(0).sqrt())

    def forward(self, x: Tensor, w0: Tensor) -> Tensor:
        return self.output(x, w0, None)

    def output(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        w0 = w0.to(x.dtype)
        gain = (self.magnitude / self.direction_norm(w0)).to(x.dtype)  # (out,)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return scale_rows(self.direction(x, w0), gain, bias)
        # With dropout, the whole DoRA branch sees the dropped input while the base term keeps the
        # clean one (PEFT's convention): x W0ᵀ + (g − 1)·(x̃ W0ᵀ) + g · s·lora(x̃).
        dropped = self.dropout(x)
        y = F.linear(x, w0) + (gain - 1) * F.linear(dropped, w0) + gain * self.lowrank(dropped)
        return y if bias is None else y + bias

    def embed(self, ids: Tensor, rows: Tensor, base: nn.Module) -> Tensor:
        """``g ⊙ (W0ᵀ[ids] + s · A[:, ids]ᵀ Bᵀ)`` with ``g = m / ||W0 + s B A||_row``, from the base's
        rows for ``ids``; the direction's norm is computed without forming the (dim, vocabulary) sum."""
        gain = (self.magnitude / self.direction_norm(geometry.weight_matrix(base, "embedding"))).to(rows.dtype)
        lowrank = self.lowrank_rows(ids, base)
        mask = geometry.dropped_tokens(self.dropout, ids, rows)
        if mask is None:
            return scale_rows(rows + lowrank, gain, None)
        # As on a linear layer, the dropped input feeds the whole DoRA branch and the base term
        # keeps the clean one: a dropped token keeps its base row, the others get the full W'ᵀ row.
        return rows + mask * ((gain - 1) * rows + gain * lowrank)

    def merged_weight(self, w0: Tensor) -> Tensor:
        return self.merged_with_state(w0)[0]

    def merged_with_state(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``W'`` and the row norms of V: unmerge needs them, and ``W'`` does not give them back
        (its row norms are m)."""
        direction = w0 + self.lowrank_weight().to(w0.dtype)
        norm = floor_norm(torch.linalg.vector_norm(direction, dim=1, dtype=at_least_fp32(direction.dtype))).to(w0.dtype)
        return (self.magnitude.to(w0.dtype) / norm).unsqueeze(1) * direction, norm

    def restore_weight(self, merged: Tensor, norm: MergeState) -> Tensor:
        assert isinstance(norm, Tensor)  # what merged_with_state returned: the row norms of V
        gain = self.magnitude.to(merged.dtype) / norm.to(merged.dtype)
        return merged / gain.unsqueeze(1) - self.lowrank_weight().to(merged.dtype)


def floor_norm(norm: Tensor) -> Tensor:
    """``max(norm, 1e-12)``: every norm DoRA and BoRA divide a magnitude by goes through here.

    A zero row of V (a pruned unit: a zero row of W0, so its magnitude starts at zero too), or for
    BoRA a zero column, then gives a zero gain instead of 0 / 0 = NaN, and the unit stays at zero,
    as it was in the base model.
    """
    return norm.clamp_min(_NORM_FLOOR)


def scale_rows(direction: Tensor, gain: Tensor, bias: Tensor | None) -> Tensor:
    """``direction · gain + bias`` for direction (..., out) and gain, bias (out,): DoRA's and BoRA's
    row scaling, the bias added in the same pass."""
    # Under autocast the direction arrives in bf16/fp16 and the gain in fp32: the scaling runs in the
    # wider of the two, as PEFT's promoting multiply does.
    return apply_in(torch.promote_types(direction.dtype, gain.dtype), _ScaleRows.apply, direction, gain, bias)


class _ScaleRows(torch.autograd.Function):
    """:func:`scale_rows` with a written-out backward. Why: autograd's ``addcmul`` backward first
    multiplies the direction by ``value = 1`` (a full-size pass for nothing), and both it and
    ``mul``'s form the gain's gradient ``Σ_tokens grad · direction`` by materializing the product;
    ``vecdot`` reduces it without one."""

    @staticmethod
    def forward(ctx: Any, direction: Tensor, gain: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(direction, gain)
        ctx.has_bias = bias is not None
        return direction * gain if bias is None else torch.addcmul(bias, direction, gain)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        direction, gain = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_direction = grad * gain if ctx.needs_input_grad[0] else None
        grad_gain = torch.linalg.vecdot(rows, direction.reshape(rows.shape), dim=0) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_direction, grad_gain, grad_bias
