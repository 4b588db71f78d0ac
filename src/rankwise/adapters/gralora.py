"""GraLoRA: a k × k grid of sub-blocks, each with its own LoRA of rank r/k; optionally plus a LoRA.

Jung, Ahn, Kim, Kim, Park, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning", https://arxiv.org/abs/2505.20355. PEFT's ``GraloraConfig`` semantics: ``rank`` is the
GraLoRA part, the hybrid LoRA adds ``hybrid_rank`` on top.

    x = [x_0 … x_{k−1}] (input blocks of in/k),   ΔW_{jn} = s · B_{jn} A_{jn}  (block j, n of k × k)
    Δy_j = s · Σ_n B_{jn} A_{jn} x_n  (+ s · B_h A_h x, hybrid),   s = α / (rank + hybrid_rank)

Same parameters as a LoRA of rank ``rank + hybrid_rank``; ΔW's rank reaches k · rank (+ hybrid).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import AdapterConfig, check_range
from ..core.delta import Adapter, Delta, as_method, check_configs_agree
from ..core.precision import apply_in, compute_dtype
from ..core.registry import register


@dataclass(frozen=True, kw_only=True)
class GraLoRAConfig(AdapterConfig):
    """GraLoRA's hyperparameters (PEFT's semantics; the official code's ``r`` is our
    ``rank + hybrid_rank``).

    Args:
        rank: r, the GraLoRA part's rank, split as r/k per sub-block; r >= 1, divisible by k.
        alpha: α; the branch is scaled by ``α / (rank + hybrid_rank)``; α > 0.
        k: the grid is k × k blocks; k >= 1 must divide in_features and out_features of every
            target (checked at attach time). The paper: k = 2 for r <= 32, k = 4 for r >= 64.
        hybrid_rank: rank of a plain LoRA over the whole matrix added to the blocks (hybrid
            GraLoRA, for the low-rank regime); >= 0, 0 turns it off.
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
    """

    size_knob: ClassVar[str | None] = "rank"
    # Paper (Llama-3.1-8B code generation, Lion) and PEFT's benchmark (AdamW, r = 32): 2e-4.
    recommended_lr: ClassVar[float] = 2e-4

    rank: int = 32  # PEFT GraloraConfig default
    alpha: float = 64.0  # PEFT default; the paper uses α = 2 · (rank + hybrid_rank)
    k: int = 2  # PEFT default; the paper's choice for r <= 32
    hybrid_rank: int = 0  # PEFT default; the paper uses 8 + 8 hybrid only at total rank 16
    dropout: float = 0.0  # PEFT default

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "k", 1)
        check_range(self, "hybrid_rank", 0)
        check_range(self, "dropout", 0, 1, high_open=True)
        if self.rank % self.k:
            raise ValueError(f"{type(self).__name__}: rank={self.rank} must be divisible by k={self.k}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank + self.hybrid_rank)


@register("gralora", GraLoRAConfig)
class GraLoRA(Delta[GraLoRAConfig]):
    """GraLoRA: k × k blocks of rank r/k each (+ optional LoRA); LoRA's parameter count, rank up to k·r.

    Parameters, in PEFT's layout: ``A`` (k, in/k, r), where ``A[n]`` holds ``A_{jn}ᵀ`` for every
    output block j side by side (columns j·r/k …); ``B`` (k, r, out/k), where ``B[j]`` stacks
    ``B_{jn}ᵀ`` for every input block n; ``hybrid_A`` (hybrid_rank, in), ``hybrid_B`` (out,
    hybrid_rank) when ``hybrid_rank > 0``.
    """

    example_config = {"rank": 2, "k": 2}

    def __init__(self, w0: Tensor, config: GraLoRAConfig) -> None:
        super().__init__(w0, config)
        k = config.k
        for name, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % k:
                raise ValueError(f"k={k} must divide {name}={size}")
        factory: dict[str, Any] = {"dtype": w0.dtype, "device": w0.device}
        # Kaiming-uniform (a = √5) per input block: bound 1/√(in/k), as PEFT; B = 0, so ΔW = 0.
        bound = 1 / math.sqrt(self.in_features // k)
        self.A = nn.Parameter(torch.empty(k, self.in_features // k, config.rank, **factory).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(k, config.rank, self.out_features // k, **factory))
        self.hybrid_rank = config.hybrid_rank
        if self.hybrid_rank:
            bound = 1 / math.sqrt(self.in_features)
            hybrid_A = torch.empty(self.hybrid_rank, self.in_features, **factory).uniform_(-bound, bound)
            self.hybrid_A = nn.Parameter(hybrid_A)
            self.hybrid_B = nn.Parameter(torch.zeros(self.out_features, self.hybrid_rank, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.k, self.rank, self.scale = k, config.rank, config.scale

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: GraLoRAConfig) -> int:
        return (config.rank + config.hybrid_rank) * (in_features + out_features)

    def _sum(self, x: Tensor, y: Tensor | None) -> Tensor:
        """``y + x ΔWᵀ`` (``x ΔWᵀ`` when y is None) for x of shape (tokens, in) and y (tokens, out)."""
        out = apply_in(compute_dtype(x), _GridProduct.apply, x, self.A, self.B, self.scale, y)
        if self.hybrid_rank:
            hidden = F.linear(x, self.hybrid_A) * self.scale  # (tokens, hybrid_rank)
            out = torch.addmm(out, hidden, self.hybrid_B.t())
        return out

    def forward(self, x: Tensor) -> Tensor:
        out = self._sum(self.dropout(x).reshape(-1, self.in_features), None)
        return out.view(*x.shape[:-1], self.out_features)

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        out = self._sum(self.dropout(x).reshape(-1, self.in_features), y.reshape(-1, self.out_features))
        return out.view(y.shape)

    def delta_weight(self) -> Tensor:
        k = self.k
        A = self.A.view(k, self.in_features // k, k, -1)  # (n, i, j, r/k): A_{jn}ᵀ
        B = self.B.view(k, k, -1, self.out_features // k)  # (j, n, r/k, o): B_{jn}ᵀ
        blocks = torch.einsum("nijc,jnco->nijo", A, B)  # ΔW_{jn}ᵀ at [n, :, j, :]
        delta = blocks.reshape(self.in_features, self.out_features).t()
        if self.hybrid_rank:
            delta = delta + self.hybrid_B @ self.hybrid_A
        return self.scale * delta

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact for parts of one ``k``: each block's factors side by side (block (j, n) of rank
        ``Σ r_i / k``), the hybrid LoRAs' too, each weight and scale folded into B, ``c_i = w_i s_i / s``.

        Raises:
            ValueError: the parts have different ``k`` (their blocks do not line up).
        """
        grids = [(weight, as_method(cls, adapter)) for weight, adapter in parts]
        first = grids[0][1]
        ks = sorted({adapter.k for _, adapter in grids})
        if len(ks) > 1:
            raise ValueError(f"GraLoRA: the adapters have different k ({ks}), so their blocks do not line up")
        check_configs_agree(cls, parts, folded=("rank", "alpha", "hybrid_rank", "k"))
        k, block_in, block_out = first.k, first.in_features // first.k, first.out_features // first.k
        rank = sum(adapter.rank for _, adapter in grids)
        hybrid = sum(adapter.hybrid_rank for _, adapter in grids)
        new = cls(w0, dataclasses.replace(first.config, rank=rank, hybrid_rank=hybrid))
        new = new.to(device=w0.device, dtype=first.A.dtype)
        with torch.no_grad():
            # A (n, i, j·r/k): per output block j, the parts' columns side by side; B (j, n·r/k, o) likewise.
            new.A.copy_(torch.cat([a.A.view(k, block_in, k, -1) for _, a in grids], 3).view(k, block_in, rank))
            up = [a.B.view(k, k, -1, block_out) * (w * a.scale / new.scale) for w, a in grids]
            new.B.copy_(torch.cat(up, 2).view(k, rank, block_out))
            if hybrid:
                hybrids = [(w, a) for w, a in grids if a.hybrid_rank]
                new.hybrid_A.copy_(torch.cat([a.hybrid_A for _, a in hybrids]))
                new.hybrid_B.copy_(torch.cat([a.hybrid_B * (w * a.scale / new.scale) for w, a in hybrids], 1))
        return new

    def extra_repr(self) -> str:
        sizes = f"rank={self.rank}, k={self.k}, hybrid_rank={self.hybrid_rank}"
        return f"{super().extra_repr()}, {sizes}, scale={self.scale:g}"


class _GridProduct(torch.autograd.Function):
    """``y + x ΔWᵀ`` for the k × k grid, every full-size operand taken as column blocks:
    input block n is the column slice ``x[:, n]``, output block j the column slice ``y[:, j]``,
    and backward does the same with the gradients.

    Why: batched products over (k, tokens, ·) views need those views contiguous, so the batched
    form (PEFT's, and ours before) copies the input, the output and both of their gradients once
    per layer and step. Plain products accept column slices as they are; what remains is one
    concatenation each of the output and of the input gradient, and the permutation of the
    rank-sized hidden tensor between the two halves (the hybrid LoRA, when on, adds one addmm
    over the output in :meth:`GraLoRA._sum`). (Writing each block through ``out=`` a
    column slice would spare the concatenations, but ``torch.compile`` cannot trace a
    non-contiguous ``out=``, and the difference is within run-to-run noise.)

    Double backward works: backward is made of differentiable operations on the saved inputs, and
    under ``create_graph=True`` the saved hidden tensor is recomputed from x and A.
    """

    @staticmethod
    def hidden(x: Tensor, A: Tensor, scale: float) -> Tensor:
        """(k_j, tokens, rank): for output block j, ``s · x_n A[n][:, chunk j]`` for every n, what
        it multiplies by B[j]."""
        k, block_in, rank = A.shape
        tokens = x.shape[0]
        hidden = torch.stack([x[:, n * block_in : (n + 1) * block_in] @ A[n] for n in range(k)], dim=1)
        return (hidden * scale).view(tokens, k, k, rank // k).permute(2, 0, 1, 3).reshape(k, tokens, rank)

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor, scale: float, y: Tensor | None) -> Tensor:
        k, block_out = A.shape[0], B.shape[2]
        hidden = _GridProduct.hidden(x, A, scale)
        blocks = [
            hidden[j] @ B[j] if y is None else torch.addmm(y[:, j * block_out : (j + 1) * block_out], hidden[j], B[j])
            for j in range(k)
        ]
        out = torch.cat(blocks, dim=1)
        ctx.save_for_backward(x, A, B, hidden)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, hidden = ctx.saved_tensors
        if torch.is_grad_enabled():
            hidden = _GridProduct.hidden(x, A, ctx.scale)
        k, block_in, rank = A.shape
        block_out, tokens = B.shape[2], x.shape[0]
        needs_x, needs_A, needs_B, _, needs_y = ctx.needs_input_grad
        grad_blocks = [grad[:, j * block_out : (j + 1) * block_out] for j in range(k)]
        grad_B = torch.stack([hidden[j].t() @ grad_blocks[j] for j in range(k)]) if needs_B else None
        if not (needs_x or needs_A):
            return None, None, grad_B, None, grad if needs_y else None
        grad_hidden = torch.stack([grad_blocks[j] @ B[j].t() for j in range(k)])  # (j, tokens, rank)
        # Back to input-block order (tokens, n, rank), with the scale.
        grad_hidden = (
            (grad_hidden * ctx.scale).view(k, tokens, k, rank // k).permute(1, 2, 0, 3).reshape(tokens, k, rank)
        )
        grad_x = torch.cat([grad_hidden[:, n] @ A[n].t() for n in range(k)], dim=1) if needs_x else None
        # grad_A as (gradᵀ x)ᵀ: the (rank, in/k) orientation runs about twice as fast in MKL as the
        # (in/k, rank) one, and reads the same activations.
        grad_A = (
            torch.stack([(grad_hidden[:, n].t() @ x[:, n * block_in : (n + 1) * block_in]).t() for n in range(k)])
            if needs_A
            else None
        )
        return grad_x, grad_A, grad_B, None, grad if needs_y else None
