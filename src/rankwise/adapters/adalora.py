"""AdaLoRA's adapter: ΔW in SVD form, ``s · B diag(e) A``, made of triplets an allocator can mask,
remove or add.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
https://arxiv.org/abs/2303.10512. The paper writes ``W = W0 + P Λ Q`` (P ↔ B, Λ ↔ diag(e), Q ↔ A).

    y = x W0ᵀ + b + s · ((drop(x) Aᵀ) ⊙ eᵀ) Bᵀ,   A: (r, in), e: (r, 1), B: (out, r)
    s = α / (r_init + 1e-5)   (constant for the whole run, as in the official code and PEFT)

The budget decisions live in :mod:`rankwise.allocate` (``AdaLoRAAllocator``, ``ElaLoRAAllocator``);
this file is the mathematics and the resize operations they use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import geometry
from ..core.config import AdapterConfig, check_range
from ..core.delta import Adapter, Delta, add_product, as_method, check_configs_agree, low_rank_product
from ..core.registry import register

INIT_STD = 0.02  # A, B ~ N(0, 0.02²): the official code and PEFT


@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA's adapter hyperparameters (the budget schedule is the allocator's).

    Args:
        rank: triplets this layer holds; r >= 0 (an allocator may prune a layer to 0). In the config
            given to :func:`rankwise.adapt` it is r_init, the starting rank of every layer.
        alpha: α in the scale ``α / r_init``; α > 0.
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
        init_rank: r_init in the scale when an allocator has changed ``rank`` (saved per layer, so a
            reload keeps the scale); ``None`` means ``rank``. Must be >= 1.
    """

    size_knob: ClassVar[str | None] = "rank"
    # Official AdaLoRA GLUE scripts: 5e-4 (MNLI, CoLA) to 1.2e-3 (RTE), DeBERTaV3-base.
    recommended_lr: ClassVar[float] = 5e-4

    rank: int = 12  # r_init: PEFT init_r and the official README example
    alpha: float = 16.0  # official scripts use 16 or 32; PEFT inherits LoRA's 8
    dropout: float = 0.0  # PEFT default
    init_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 0)
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "dropout", 0, 1, high_open=True)
        if self.init_rank is not None:
            check_range(self, "init_rank", 1)

    @property
    def scale(self) -> float:
        # The scale never follows the current rank: re-normalizing would make the output jump at
        # every rank event. The 1e-5 is the official code's and PEFT's.
        return self.alpha / ((self.init_rank or self.rank) + 1e-5)


@register("adalora", AdaLoRAConfig)
class AdaLoRA(Delta[AdaLoRAConfig]):
    """AdaLoRA: ΔW = s · B diag(e) A, triplets masked to a budget by ``rankwise.allocate.AdaLoRAAllocator``."""

    example_config = {"rank": 2}
    supported_bases = frozenset({"linear", "conv1d", "conv2d", "embedding"})

    def __init__(self, w0: Tensor, config: AdaLoRAConfig) -> None:
        super().__init__(w0, config)
        kwargs: dict[str, Any] = {"dtype": w0.dtype, "device": w0.device}
        self.A = nn.Parameter(torch.empty(config.rank, self.in_features, **kwargs).normal_(0, INIT_STD))
        # e = 0, so ΔW = 0 at step 0 while A and B start random (their gradients flow through e).
        self.e = nn.Parameter(torch.zeros(config.rank, 1, **kwargs))
        self.B = nn.Parameter(torch.empty(self.out_features, config.rank, **kwargs).normal_(0, INIT_STD))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: AdaLoRAConfig) -> int:
        return config.rank * (in_features + out_features + 1)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def triplets(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(A, e, B)``; the rank runs along dim 0 of A and e and dim 1 of B."""
        return self.A, self.e, self.B

    def _hidden(self, x: Tensor) -> Tensor:
        """``s · diag(e) A x`` as (tokens, rank). The scale and e go on A (rank × in numbers), so
        backward keeps one (tokens, rank) tensor instead of two."""
        rows = self.dropout(x).reshape(-1, self.in_features)  # before the product: rank may be 0
        return F.linear(rows, self.A * (self.e * self.scale))

    def forward(self, x: Tensor) -> Tensor:
        return low_rank_product(self._hidden(x), self.B.t()).view(*x.shape[:-1], self.out_features)

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return add_product(y, self._hidden(x), self.B.t())

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B @ (self.A * self.e))

    def reset_for_embedding(self, padding_idx: int | None) -> None:
        """Zero the padding token's column of A: it gets no gradient, so its update stays zero.
        The rest keeps the official init (A and B must start random for e to get a gradient)."""
        if padding_idx is not None:
            with torch.no_grad():
                self.A[:, padding_idx] = 0

    def embed(self, ids: Tensor, rows: Tensor, base: nn.Module) -> Tensor:
        """``rows + s · (A[:, ids]ᵀ ⊙ eᵀ) Bᵀ``: the base's rows for ``ids`` plus the rows of ΔWᵀ."""
        hidden = geometry.embedding_columns(ids, self.A * (self.e * self.scale), base)  # (..., rank)
        mask = geometry.dropped_tokens(self.dropout, ids, hidden)
        return add_product(rows, hidden if mask is None else hidden * mask, self.B.t())

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact: the triplets side by side, ``A = [A_1; …]``, ``B = [B_1, …]`` and
        ``e = [c_1 e_1; …]`` with ``c_i = w_i s_i / s`` (weight and scale folded into e), rank
        (and initial rank) ``Σ r_i``."""
        check_configs_agree(cls, parts, folded=("rank", "alpha", "init_rank"))
        triplets = [(weight, as_method(cls, adapter)) for weight, adapter in parts]
        rank = sum(adapter.rank for _, adapter in triplets)
        first = triplets[0][1]
        config = dataclasses.replace(first.config, rank=rank, init_rank=rank)
        new = cls(w0, config).to(device=w0.device, dtype=first.A.dtype)
        with torch.no_grad():
            new.A.copy_(torch.cat([adapter.A for _, adapter in triplets]))
            new.e.copy_(torch.cat([adapter.e * (weight * adapter.scale / new.scale) for weight, adapter in triplets]))
            new.B.copy_(torch.cat([adapter.B for _, adapter in triplets], 1))
        return new

    def orthogonality(self, squared: bool = False) -> Tensor:
        """``||A Aᵀ − I||_F + ||Bᵀ B − I||_F``, the paper's regularizer R(P, Q).

        Args:
            squared: square each norm, as the paper writes it; the official code and PEFT do not.
        """
        eye = torch.eye(self.rank, dtype=self.A.dtype, device=self.A.device)
        terms = [torch.linalg.matrix_norm(m - eye) for m in (self.A @ self.A.t(), self.B.t() @ self.B)]
        return sum(t.square() for t in terms) if squared else terms[0] + terms[1]

    def resize(
        self, keep: Tensor, grown: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> list[tuple[nn.Parameter, nn.Parameter, int]]:
        """Keep the triplets ``keep`` (indices, in order), then append ``grown``.

        New parameter objects replace A, e and B (their shapes change), and ``config`` records the
        new rank and r_init, so the scale stays and a checkpoint reloads the shapes.

        Args:
            keep: indices of the triplets to keep, shape (kept,).
            grown: the appended ``(a, e, b)`` rows: a (n, in), e (n, 1), b (out, n).

        Returns:
            ``(old, new, rank_dim)`` for A, e and B, for moving optimizer state.
        """
        old = (self.A, self.e, self.B)
        with torch.no_grad():
            A, e, B = self.A[keep], self.e[keep], self.B[:, keep]
            if grown is not None:
                A = torch.cat([A, grown[0].to(A)])
                e = torch.cat([e, grown[1].to(e)])
                B = torch.cat([B, grown[2].to(B)], dim=1)
        self.A, self.e, self.B = (
            nn.Parameter(t.contiguous(), requires_grad=o.requires_grad) for t, o in zip((A, e, B), old, strict=True)
        )
        config = self.config
        self.config = dataclasses.replace(config, rank=self.rank, init_rank=config.init_rank or config.rank)
        return [(old[0], self.A, 0), (old[1], self.e, 0), (old[2], self.B, 1)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"
