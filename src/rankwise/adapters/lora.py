"""LoRA: a frozen weight plus a trainable rank-r product ``s · B A``.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685;
rsLoRA scaling from Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
https://arxiv.org/abs/2312.03732.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import geometry
from ..core.config import AdapterConfig, check_range
from ..core.delta import Adapter, Delta, add_product, as_method, check_configs_agree, low_rank_product
from ..core.precision import apply_in, compute_dtype
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA's hyperparameters.

    Args:
        rank: r, the inner dimension of ``B A``; r >= 1.
        alpha: α; the branch is scaled by ``α / r`` (``α / √r`` with ``rslora``); α > 0.
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
        rslora: use the rank-stabilized scale ``α / √r``, so the update does not shrink as r grows.
        init: how ``A`` starts (``B`` is zero, so step 0 is the base model): ``"kaiming"`` is
            ``U(−1/√in, 1/√in)`` (PEFT's default, kaiming-uniform with a = √5); ``"gaussian"`` is
            ``N(0, (1/r)²)`` (PEFT's "gaussian").
    """

    size_knob: ClassVar[str | None] = "rank"
    recommended_lr: ClassVar[float] = 5e-4  # LoRA paper, RoBERTa-base on GLUE (Table 9): 4e-4 to 5e-4

    rank: int = 8  # LoRA paper and PEFT default
    alpha: float = 16.0  # α = 2r, common practice (DoRA paper); PEFT's default is α = r
    dropout: float = 0.0  # PEFT default; the LoRA paper uses 0.05–0.1 on GPT-2
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "dropout", 0, 1, high_open=True)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# LoRA's config or a variant's (DoRA, BoRA): the factors are sized from its rank alone.
LoRAConfigT = TypeVar("LoRAConfigT", bound=LoRAConfig)


class LowRank(Adapter[LoRAConfigT]):
    """The factors ``A`` (rank, in) and ``B`` (out, rank) and the branch ``s · B A x``.

    Shared by LoRA and the methods that build on its direction update (DoRA, BoRA); each is
    :class:`~rankwise.core.capabilities.Factored` through :meth:`factors`.
    """

    example_config = {"rank": 2}

    def __init__(self, w0: Tensor, config: LoRAConfigT) -> None:
        super().__init__(w0, config)
        self.A = nn.Parameter(torch.empty(config.rank, self.in_features, dtype=w0.dtype, device=w0.device))
        self.B = nn.Parameter(torch.zeros(self.out_features, config.rank, dtype=w0.dtype, device=w0.device))
        if config.init == "kaiming":
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.A, -bound, bound)
        else:
            nn.init.normal_(self.A, std=1 / config.rank)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: LoRAConfigT) -> int:
        return config.rank * (in_features + out_features)

    def factors(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """``(A, B, s)``, how optimizers such as LoRA-Pro find the factors. ``s · B A`` is LoRA's
        (and GoRA's) whole update ``ΔW``; for DoRA and BoRA it is the update of the direction
        ``V = W0 + s · B A``, which their magnitudes then rescale, so their ``ΔW`` is not ``s · B A``."""
        return self.A, self.B, self.scale

    def lowrank(self, x: Tensor) -> Tensor:
        """``s · x Aᵀ Bᵀ`` for x of shape (..., in); the scale is applied on the rank side, the
        narrowest tensor."""
        return low_rank_product(F.linear(x, self.A) * self.scale, self.B.t())

    def direction(self, x: Tensor, w0: Tensor) -> Tensor:
        """``x W0ᵀ + s·x Aᵀ Bᵀ``, shape (..., out), for the methods that scale the updated direction
        (DoRA, BoRA), which compute the base product themselves."""
        rows = x.reshape(-1, self.in_features)
        out = apply_in(compute_dtype(rows), _Direction.apply, rows, w0, self.A, self.B.t(), self.scale)
        return out.view(*x.shape[:-1], self.out_features)

    def lowrank_weight(self) -> Tensor:
        return self.scale * (self.B @ self.A)

    def reset_for_embedding(self, padding_idx: int | None) -> None:
        """``A = 0`` and ``B ~ N(0, 1)``, the embedding init of the official loralib and of PEFT.
        A one-hot input reads one column of A, so kaiming's bound 1/√num_embeddings would leave
        the branch and B's gradient tiny; B = 0 with A = 0 would give neither factor a gradient.
        The padding token's column of A is then zero and gets no gradient, so its update stays zero."""
        with torch.no_grad():
            self.A.zero_()
            self.B.normal_()

    def lowrank_rows(self, ids: Tensor, base: nn.Module) -> Tensor:
        """``s · A[:, ids]ᵀ Bᵀ``, the rows of the low-rank term's transpose for token ``ids``, shape
        (..., out), before dropout; the scale goes on the rank side, the narrowest tensor."""
        return low_rank_product(self.embedding_hidden(ids, base), self.B.t())

    def embedding_hidden(self, ids: Tensor, base: nn.Module) -> Tensor:
        """``s · A[:, ids]ᵀ``, shape (..., rank), looked up as ``base`` looks up its weight."""
        return geometry.embedding_columns(ids, self.A, base) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.A.shape[0]}, scale={self.scale:g}"


@register("lora", LoRAConfig)
class LoRA(LowRank[LoRAConfig], Delta[LoRAConfig]):
    """LoRA (and rsLoRA): ΔW = s · B A, rank r; the reference low-rank adapter."""

    supported_bases = frozenset({"linear", "conv1d", "conv2d", "embedding"})

    def forward(self, x: Tensor) -> Tensor:
        return self.lowrank(self.dropout(x))

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return add_product(y, F.linear(self.dropout(x), self.A) * self.scale, self.B.t())

    def delta_weight(self) -> Tensor:
        return self.lowrank_weight()

    def embed(self, ids: Tensor, rows: Tensor, base: nn.Module) -> Tensor:
        """``rows + s · A[:, ids]ᵀ Bᵀ``: the base's rows for ``ids`` plus the rows of ΔWᵀ (PEFT's
        ``lora_embedding_A/B`` lookup), as one ``addmm``."""
        hidden = self.embedding_hidden(ids, base)
        mask = geometry.dropped_tokens(self.dropout, ids, hidden)
        return add_product(rows, hidden if mask is None else hidden * mask, self.B.t())

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact: the factors side by side, ``A = [A_1; A_2; …]`` and ``B = [c_1 B_1, c_2 B_2, …]``
        with ``c_i = w_i s_i / s`` (each weight and scale folded into B), rank ``Σ r_i``."""
        check_configs_agree(cls, parts, folded=("rank", "alpha", "rslora", "init"))
        loras = [(weight, as_method(cls, adapter)) for weight, adapter in parts]
        rank = sum(adapter.A.shape[0] for _, adapter in loras)
        first = loras[0][1]
        new = cls(w0, dataclasses.replace(first.config, rank=rank)).to(device=w0.device, dtype=first.A.dtype)
        with torch.no_grad():
            new.A.copy_(torch.cat([adapter.A for _, adapter in loras]))
            new.B.copy_(torch.cat([adapter.B * (weight * adapter.scale / new.scale) for weight, adapter in loras], 1))
        return new


class _Direction(torch.autograd.Function):
    """``x W0ᵀ + s·(x Aᵀ) Bᵀ`` for x (tokens, in), with ``up = Bᵀ`` (rank, out) a view of B, saved as
    the view (no copy kept, as in :class:`rankwise.core.delta._UpProjection`). Written out so that
    each product accumulates into the one before it: forward, the low-rank term into the base
    product (one GEMM pass over it in place, no second full-size tensor, no add); backward, the
    low-rank input gradient into ``grad · W0`` the same way, where autograd would write it to a
    tensor of its own and then add the two.

    Double backward works: backward is made of differentiable operations on the saved inputs, and
    under ``create_graph=True`` (grad mode on in backward) the saved hidden tensor, a constant to
    autograd, is recomputed from x and A so that second-order terms through it are kept.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w0: Tensor, A: Tensor, up: Tensor, scale: float) -> Tensor:
        hidden = F.linear(x, A) * scale  # (tokens, rank)
        out = (x @ w0.t()).addmm_(hidden, up)
        ctx.save_for_backward(x, w0, A, up, hidden)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w0, A, up, hidden = ctx.saved_tensors
        if torch.is_grad_enabled():
            hidden = F.linear(x, A) * ctx.scale
        needs_x, needs_w0, needs_A, needs_up, _ = ctx.needs_input_grad
        # up.contiguous(): the fast orientation for this product, as in core.delta._UpProjection.
        grad_hidden = (grad @ up.contiguous().t()) * ctx.scale  # (tokens, rank)
        grad_x = (grad @ w0).addmm_(grad_hidden, A) if needs_x else None
        grad_w0 = grad.t() @ x if needs_w0 else None
        grad_A = grad_hidden.t() @ x if needs_A else None
        grad_up = hidden.t() @ grad if needs_up else None
        return grad_x, grad_w0, grad_A, grad_up, None
