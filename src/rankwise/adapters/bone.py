"""Bone / MiSS ("balance" form): one trainable r × out shard shared by every input block of ΔW.

Kang, "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure" (first
titled "Bone: Block-Affine Adaptation of Large Language Models"), https://arxiv.org/abs/2409.15371.
PEFT's ``MissConfig(init_weights=True)``; the affine form is :mod:`rankwise.adapters.bat`.

    x̄ = Σ_j x_j ∈ R^r  (x cut into ⌈in/r⌉ shards of length r, the last one zero-padded)
    Δy = x̄ D,   D ∈ R^{r × out},   ΔW = [Dᵀ Dᵀ … Dᵀ][:, :in]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_range
from ..core.delta import Adapter, Delta, add_product, summed_parameters
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class BoneConfig(AdapterConfig):
    """Bone's (MiSS's) hyperparameters. There is no α: the shard starts at zero and the learning
    rate is the only scale (PEFT refuses to rescale MiSS).

    Args:
        rank: r, the shard length along the input; r >= 1 and r <= in_features of every target
            (checked at attach time). An even r is recommended (PEFT's note).
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
    """

    size_knob: ClassVar[str | None] = "rank"
    # Authors' scripts (JL-er/MiSS, MetaMathQA, AdamW, PiSSA's setting); PEFT's benchmark uses 1e-4.
    recommended_lr: ClassVar[float] = 2e-5

    rank: int = 64  # paper and PEFT MissConfig default
    dropout: float = 0.0  # PEFT MissConfig default

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)
        check_range(self, "dropout", 0, 1, high_open=True)


@register("bone", BoneConfig)
class Bone(Delta[BoneConfig]):
    """Bone / MiSS: ΔW repeats one trainable r × out shard across the input; r·out parameters."""

    example_config = {"rank": 2}

    def __init__(self, w0: Tensor, config: BoneConfig) -> None:
        super().__init__(w0, config)
        if config.rank > self.in_features:
            raise ValueError(f"rank={config.rank} must be <= in_features={self.in_features}")
        # Zero init: ΔW = 0 at step 0, and the gradient is still non-zero since D is the only factor.
        self.D = nn.Parameter(torch.zeros(config.rank, self.out_features, dtype=w0.dtype, device=w0.device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: BoneConfig) -> int:
        return config.rank * out_features

    def forward(self, x: Tensor) -> Tensor:
        return self._shard_sum(x) @ self.D

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return add_product(y, self._shard_sum(x), self.D)

    def _shard_sum(self, x: Tensor) -> Tensor:
        """``x̄ = Σ_j x_j``, shape (..., rank)."""
        rank = self.D.shape[0]
        x = self.dropout(x)
        # Zero-padding the last shard is what truncating the last block of ΔW means (delta_weight).
        # Only when needed: F.pad copies the whole input even for a zero pad, and its backward
        # copies the gradient again.
        if self.in_features % rank:
            x = F.pad(x, (0, -self.in_features % rank))
        return x.unflatten(-1, (-1, rank)).sum(-2)  # (..., rank)

    def delta_weight(self) -> Tensor:
        rank = self.D.shape[0]
        return self.D.t().repeat(1, math.ceil(self.in_features / rank))[:, : self.in_features]

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact: ΔW is linear in the shards (of one rank), so they add, ``Σ_i w_i p_i``.

        Raises:
            ValueError: the parts' configs differ (:func:`~rankwise.core.delta.summed_parameters`).
        """
        return summed_parameters(cls, parts, w0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.D.shape[0]}"
