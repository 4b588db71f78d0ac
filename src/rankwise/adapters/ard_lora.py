"""ARD-LoRA-style adapter: LoRA per head group, each group's rank set by a learnable scale α.

Shinwari & Usama, "ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of
Foundation Models with Heterogeneous Adaptation Needs", https://arxiv.org/abs/2506.18267. Only the
abstract was available: the form below is our reconstruction ("ARD-LoRA-style") of the per-head
ranks it describes.

    gate_i(α_g) = clamp((r0 α_g − i − 1/2) / RAMP + 1/2, 0, 1),  i = 0 … R−1   (Σ_i gate_i = r0 α_g)
    ΔW_g = s · m_g · B̂_g diag(gate(α_g)) Â_g,   s = lora_alpha / r0 (constant)

Â_g has A_g's rows and B̂_g has B_g's columns at unit norm, and m_g is one magnitude per group
(0 at the start, so step 0 is the base model). The gate multiplies components whose size the
optimizer cannot change one by one: with ``B diag(gate) A`` and a free B, the loss depends only on
``gate_i · B_i``, so ``gate_i ∂L/∂gate_i = ⟨B_i, ∂L/∂B_i⟩``, which is 0 once B is stationary, and
α learns nothing about the task. Here a slot's weight is ``s · m_g · gate_i``; m_g is shared by the
group's slots, so α (how many slots, and how much of the partial ones) still gets the task's
gradient at a stationary point of A, B and m.

A group is one head: with ``head_side="out"`` (q, k, v projections) head h owns rows
``h·d : (h+1)·d`` of ΔW and A_g sees the whole input; with ``"in"`` (the output projection) it owns
columns. ``heads=1`` is one group per matrix (MLPs). The penalties, α's update and the budget are
in ``rankwise.allocate.ARDLoRAAllocator``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_range
from ..core.delta import Delta
from ..core.registry import register

# Width, in rank units, of each slot's gate ramp. With 1 the gate is the plain clamp(r0 α − i, 0, 1),
# and α's gradient reaches only the one fractional slot: α stops where that slot has the magnitude it
# wants, even when the next direction would lower the loss. With 2 two or three slots are partly open
# at once, so α also feels the slot beyond. Σ_i gate_i stays r0 α between EDGE and slots − EDGE.
RAMP = 2.0
EDGE = RAMP / 2 - 0.5


@dataclass(frozen=True, kw_only=True)
class ARDLoRAConfig(AdapterConfig):
    """ARD-LoRA-style hyperparameters (our reconstruction; the paper's values were not available).

    Args:
        rank: r0, the rank every group starts at (α = 1); r0 >= 1.
        max_scale: α_max, the largest α; the rank of a group stays within [0, r0 · α_max]; > 0.
        alpha: lora_alpha; the branch is scaled by ``alpha / r0`` whatever the ranks become; > 0.
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
        heads: groups per layer, each with its own α (the layer's attention heads); >= 1 and must
            divide the split side. Set per layer by the allocator (``ARDLoRAAllocator(heads=...)``).
        head_side: which side the heads split: ``"out"`` (rows; q/k/v) or ``"in"`` (columns; o).
        slots: R, the rank components allocated per group; ``None`` means ``ceil(r0 · max_scale)``.
            The allocator lowers it at the end of training to the largest rank a group uses.
    """

    size_knob: ClassVar[str | None] = "rank"
    recommended_lr: ClassVar[float] = 5e-4  # no published value; LoRA's (RoBERTa-base GLUE)

    rank: int = 8  # r0: no published value; LoRA's default rank, our starting point
    max_scale: float = 2.0  # α_max: no published value; our starting point (R = 16 at r0 = 8)
    alpha: float = 16.0  # as LoRAConfig: α = 2 r0
    dropout: float = 0.0
    heads: int = 1
    head_side: Literal["out", "in"] = "out"
    slots: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)
        check_range(self, "max_scale", 0, low_open=True)
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "dropout", 0, 1, high_open=True)
        check_range(self, "heads", 1)
        if self.slots is not None:
            check_range(self, "slots", 0)

    @property
    def num_slots(self) -> int:
        return math.ceil(self.rank * self.max_scale + RAMP / 4) if self.slots is None else self.slots


@register("ard_lora", ARDLoRAConfig)
class ARDLoRA(Delta[ARDLoRAConfig]):
    """ARD-LoRA-style: LoRA per head, each head's rank r0·α learned through a gate (our reconstruction)."""

    example_config = {"rank": 2}

    def __init__(self, w0: Tensor, config: ARDLoRAConfig) -> None:
        super().__init__(w0, config)
        heads, side = config.heads, config.head_side
        split = self.out_features if side == "out" else self.in_features
        if split % heads:
            raise ValueError(f"heads={heads} must divide {side}_features={split}")
        self.group_in = self.in_features // heads if side == "in" else self.in_features
        self.group_out = self.out_features // heads if side == "out" else self.out_features
        slots = config.num_slots
        kwargs: dict[str, Any] = {"dtype": w0.dtype, "device": w0.device}
        # Only the directions of A's rows and B's columns matter (they are normalized in use), so
        # they may start random: the zero magnitude makes step 0 the base model.
        self.A = nn.Parameter(torch.randn(heads, slots, self.group_in, **kwargs))
        self.B = nn.Parameter(torch.randn(heads, self.group_out, slots, **kwargs))
        self.magnitude = nn.Parameter(torch.zeros(heads, **kwargs))  # m per group
        self.rank_scale = nn.Parameter(torch.ones(heads, **kwargs))  # α per group
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.alpha / config.rank

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: ARDLoRAConfig) -> int:
        heads = config.heads
        if config.head_side == "out":  # each head's A sees the whole input
            per_slot = heads * in_features + out_features
        else:  # each head's B writes the whole output
            per_slot = in_features + heads * out_features
        return config.num_slots * per_slot + 2 * heads  # + α and m per group

    def gates(self) -> Tensor:
        """``clamp((r0 α_g − i − 1/2) / RAMP + 1/2, 0, 1)``, shape (heads, slots): slot i ramps from
        0 to 1 as r0α crosses [i + 1/2 − RAMP/2, i + 1/2 + RAMP/2]."""
        slot = torch.arange(self.A.shape[1], dtype=self.rank_scale.dtype, device=self.rank_scale.device)
        return ((self.config.rank * self.rank_scale.unsqueeze(1) - slot - 0.5) / RAMP + 0.5).clamp(0, 1)

    def effective_rank(self) -> Tensor:
        """``Σ_i gate_i`` per group, shape (heads,): ``r0 α_g`` on :meth:`scale_range`."""
        return self.gates().sum(1)

    def scale_range(self) -> tuple[float, float]:
        """The α where ``Σ_i gate_i = r0 α`` and α <= α_max:
        ``[EDGE / r0, min(α_max, (slots − EDGE) / r0)]``."""
        r0 = self.config.rank
        return EDGE / r0, min(self.config.max_scale, (self.A.shape[1] - EDGE) / r0)

    def used_slots(self) -> int:
        """The slots whose gate is non-zero in some group."""
        return int((self.gates() > 0).any(0).sum())

    def forward(self, x: Tensor) -> Tensor:
        return self._sum(x, None).view(*x.shape[:-1], self.out_features)

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return self._sum(x, y.reshape(-1, self.out_features)).view(y.shape)

    def directions(self) -> tuple[Tensor, Tensor]:
        """``(Â, B̂)``: A's rows and B's columns at unit norm, shapes (heads, slots, in_g) and
        (heads, out_g, slots)."""
        return F.normalize(self.A, dim=2), F.normalize(self.B, dim=1)

    def coefficients(self) -> Tensor:
        """``s · m_g · gate_i(α_g)``, shape (heads, slots): the weight of each unit component."""
        return self.gates() * (self.scale * self.magnitude).unsqueeze(1)

    def _sum(self, x: Tensor, y: Tensor | None) -> Tensor:
        """``y + x ΔWᵀ`` (``x ΔWᵀ`` when y is None) as (tokens, out): plain products over column
        slices instead of einsum's permuted copies, the residual added inside each head's product
        (one concatenation of the heads' outputs when there are several)."""
        rows = self.dropout(x).reshape(-1, self.in_features)
        heads, slots = self.A.shape[:2]
        A, B = self.directions()
        # The coefficients ride on B̂, and B̂ᵀ is made contiguous (slots, out_g) per head for the
        # faster backward orientation (see rankwise.core.delta._UpProjection).
        up = (B * self.coefficients().unsqueeze(1)).transpose(1, 2).contiguous()
        if self.config.head_side == "in":  # every head writes the whole output: one sum over heads
            hidden = torch.cat(
                [F.linear(rows[:, h * self.group_in : (h + 1) * self.group_in], A[h]) for h in range(heads)], 1
            )
            up = up.reshape(heads * slots, self.out_features)
            return hidden @ up if y is None else torch.addmm(y, hidden, up)
        hidden = F.linear(rows, A.reshape(heads * slots, self.in_features))  # (tokens, heads · slots)
        blocks = []
        for h in range(heads):
            head_hidden, columns = (
                hidden[:, h * slots : (h + 1) * slots],
                slice(h * self.group_out, (h + 1) * self.group_out),
            )
            blocks.append(head_hidden @ up[h] if y is None else torch.addmm(y[:, columns], head_hidden, up[h]))
        return blocks[0] if heads == 1 else torch.cat(blocks, 1)

    def delta_weight(self) -> Tensor:
        A, B = self.directions()
        blocks = torch.einsum("hor,hr,hri->hoi", B, self.coefficients(), A)  # (heads, out_g, in_g)
        if self.config.head_side == "out":
            return blocks.reshape(self.out_features, self.in_features)
        return blocks.permute(1, 0, 2).reshape(self.out_features, self.in_features)

    def keep_slots(self, slots: int) -> list[tuple[nn.Parameter, nn.Parameter, int]]:
        """Drop every slot from ``slots`` on (the gates there are 0 when ``r0 α <= slots``).

        Returns:
            ``(old, new, slot_dim)`` for A and B, for moving optimizer state.
        """
        old_A, old_B = self.A, self.B
        with torch.no_grad():
            self.A = nn.Parameter(old_A[:, :slots].clone(), requires_grad=old_A.requires_grad)
            self.B = nn.Parameter(old_B[..., :slots].clone(), requires_grad=old_B.requires_grad)
        self.config = dataclasses.replace(self.config, slots=slots)
        return [(old_A, self.A, 1), (old_B, self.B, 2)]

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, rank={c.rank}, slots={self.A.shape[1]}, heads={c.heads} ({c.head_side})"
