"""Bat: a trainable r × r affine map per output block, applied to the frozen weight's own blocks.

Kang, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large
Language Models" (v1–v3 of https://arxiv.org/abs/2409.15371, where this form is called Bone; from v4
on, and in PEFT's ``MissConfig(init_weights="bat")``, it is called Bat). With ``W_ij`` the r × r
block of W0 at output block i and input block j:

    W'_ij = W_ij + W_ij D_i + D_i = W_ij (I + D_i) + D_i,    D ∈ R^{(out/r) × r × r}

The update depends on W0 ("weight guide"), so the module is a ``Reparam``: it receives W0 in forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_range
from ..core.delta import MergeState, Reparam
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class BatConfig(AdapterConfig):
    """Bat's hyperparameters. No α and no dropout: the forward runs on the materialized weight
    (PEFT's Bat has no dropout either), and the learning rate is the only scale.

    Args:
        rank: r, the block size; r >= 1 and r must divide in_features and out_features of every
            target (checked at attach time).
    """

    size_knob: ClassVar[str | None] = "rank"
    # Authors' scripts (JL-er/MiSS, MetaMathQA, AdamW, PiSSA's setting); PEFT's benchmark uses 1e-4.
    recommended_lr: ClassVar[float] = 2e-5

    rank: int = 64  # paper and PEFT MissConfig default

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)


@register("bat", BatConfig)
class Bat(Reparam[BatConfig]):
    """Bat: block affine W'_ij = W_ij (I + D_i) + D_i, weight-guided; r·out parameters, ≥ MiSS's quality."""

    # The r × r blocks of a flattened k × k kernel would cut across kernel taps and channels, a layout
    # neither paper nor PEFT defines; and since W' is non-linear in W0's blocks, the layout matters.
    spatial_conv = False
    example_config = {"rank": 2}

    def __init__(self, w0: Tensor, config: BatConfig) -> None:
        super().__init__(w0, config)
        rank = config.rank
        if self.in_features % rank or self.out_features % rank:
            raise ValueError(
                f"rank={rank} must divide in_features={self.in_features} and out_features={self.out_features}"
            )
        # Zero init: W' = W0 at step 0; the gradient W_ijᵀ·(...) + (...) is non-zero from the start.
        self.D = nn.Parameter(torch.zeros(self.out_features // rank, rank, rank, dtype=w0.dtype, device=w0.device))

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: BatConfig) -> int:
        return (out_features // config.rank) * config.rank**2

    def forward(self, x: Tensor, w0: Tensor) -> Tensor:
        return self.output(x, w0, None)

    def output(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        # Built once per call and used in one matmul (with the bias, one pass): a factored x ΔWᵀ
        # would need a (tokens, out/r, in) intermediate, larger than W' as soon as tokens > r.
        return F.linear(x, self.merged_weight(w0.to(x.dtype)), bias)

    def merged_weight(self, w0: Tensor) -> Tensor:
        blocks = self._row_blocks(w0)  # (out/r, r·in/r, r): row i·r + a, column j·r + b at [i, a·(in/r) + j, b]
        D = self.D.to(w0.dtype)
        merged = torch.baddbmm(blocks, blocks, D)  # W_ij + W_ij D_i
        # + D_i, the same for every j. Not in place: an in-place add on this view makes autograd
        # copy the full (out, in) gradient twice in backward (CopySlices).
        merged = merged.unflatten(1, (self.D.shape[1], -1)) + D.unsqueeze(2)
        return merged.reshape(self.out_features, self.in_features)

    def restore_weight(self, merged: Tensor, state: MergeState) -> Tensor:
        """``W_ij = (W'_ij − D_i)(I + D_i)^{-1}``, solved rather than inverted; D alone inverts
        the merge, so there is no merge state."""
        D = self.D.to(merged.dtype)
        shifted = (self._row_blocks(merged).unflatten(1, (D.shape[1], -1)) - D.unsqueeze(2)).flatten(1, 2)
        eye = torch.eye(D.shape[-1], dtype=D.dtype, device=D.device)
        try:
            restored = torch.linalg.solve(eye + D, shifted, left=False)  # X (I + D_i) = W'_ij − D_i
        except torch.linalg.LinAlgError as error:
            raise ValueError(f"Bat cannot unmerge: I + D_i is singular for some output block ({error})") from error
        return restored.reshape(self.out_features, self.in_features)

    def _row_blocks(self, w: Tensor) -> Tensor:
        rank = self.D.shape[-1]
        # reshape, not view: a Conv1D weight arrives as a transposed view
        return w.reshape(self.out_features // rank, -1, rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.D.shape[-1]}"
