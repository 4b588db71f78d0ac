"""LoRA-Pro: step LoRA's factors so that the low-rank update tracks the full fine-tuning gradient.

Wang, Liang, He, Wang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025,
https://arxiv.org/abs/2407.18242.

A LoRA step ``(A, B) ← (A − η g_A, B − η g_B)`` moves ``W = W0 + s B A`` by ``−η g̃`` to first order,
with the *equivalent gradient* ``g̃ = s B g_A + s g_B A``. LoRA-Pro picks ``(g_A, g_B)`` so that
``g̃`` is the closest such matrix to the full gradient ``g = ∂L/∂W``, using only the raw LoRA
gradients ``G_A = s Bᵀ g`` and ``G_B = s g Aᵀ`` (``g`` itself is never formed):

    g_A = (1/s²) (BᵀB)⁻¹ G_A + X A
    g_B = (1/s²) (I − P_B) G_B (AAᵀ)⁻¹ − B X,          P_B = B (BᵀB)⁻¹ Bᵀ
    g̃   = P_B g + (I − P_B) g P_A   for every X,       P_A = Aᵀ (AAᵀ)⁻¹ A

X is chosen to keep ``(g_A, g_B)`` closest to ``(G_A, G_B)``: the Sylvester equation
``(BᵀB) X + X (AAᵀ) = −(1/s²) (BᵀB)⁻¹ G_A Aᵀ``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..core.precision import at_least_fp32
from .factors import factor_pairs, other_parameter_groups

# Damping of the r × r Gram inverses, pinv(M + δI), as in the official code; it keeps step 0
# (B = 0, so BᵀB = 0) finite: there G_A = 0 and the damped inverse multiplies only zeros.
_DAMPING = 1e-8


class _Tangent:
    """The pair ``(A, B)`` at one step: the r × r Gram eigendecompositions every formula reuses.

    Computes in at least fp32: the Gram matrices square the factors' range.
    """

    def __init__(self, A: Tensor, B: Tensor, scale: float) -> None:
        self.dtype = at_least_fp32(A.dtype)
        self.A, self.B, self.scale = A.to(self.dtype), B.to(self.dtype), scale
        self.gram_B = _Gram(self.B.T @ self.B)
        self.gram_A = _Gram(self.A @ self.A.T)

    def least_squares(self, grad_A: Tensor, grad_B: Tensor) -> tuple[Tensor, Tensor]:
        """``(g_A, g_B)`` with X = 0."""
        grad_A, grad_B = grad_A.to(self.dtype), grad_B.to(self.dtype)
        g_A = self.gram_B.inverse @ grad_A / self.scale**2  # (rank, in)
        outside = grad_B - self.B @ (self.gram_B.inverse @ (self.B.T @ grad_B))  # (I − P_B) G_B, (out, rank)
        g_B = outside @ self.gram_A.inverse / self.scale**2  # (out, rank)
        return g_A, g_B

    def adjusted(self, grad_A: Tensor, grad_B: Tensor, X: Tensor | None) -> tuple[Tensor, Tensor]:
        g_A, g_B = self.least_squares(grad_A, grad_B)
        if X is None:
            X = self.sylvester(-g_A @ self.A.T)
        X = X.to(self.dtype)
        return g_A + X @ self.A, g_B - self.B @ X

    def equivalent(self, grad_A: Tensor, grad_B: Tensor) -> Tensor:
        g_A, g_B = self.least_squares(grad_A, grad_B)
        return (self.B @ g_A).addmm_(g_B, self.A).mul_(self.scale)  # (out, in), one full-size buffer

    def sylvester(self, rhs: Tensor) -> Tensor:
        """X with ``(BᵀB + δI) X + X (AAᵀ + δI) = rhs``: both sides are SPD, so in their eigenbases
        the equation is elementwise, ``X̂_ij (λ_i + μ_j) = Ĉ_ij`` (real ``eigh``, not a complex ``eig``)."""
        U, V = self.gram_B.vectors, self.gram_A.vectors
        denominator = self.gram_B.values[:, None] + self.gram_A.values[None, :]  # (rank, rank), ≥ 2δ
        return U @ ((U.T @ rhs @ V) / denominator) @ V.T


class _Gram:
    """Eigendecomposition of ``M + δI`` for a PSD r × r ``M``, and its pseudo-inverse.

    The inverse drops eigenvalues below ``r · eps · λ_max``, as ``torch.linalg.pinv(M + δI,
    hermitian=True)`` does: a rank-deficient ``B`` then gives the projection onto its range.
    """

    def __init__(self, matrix: Tensor) -> None:
        rank = matrix.shape[0]
        damped = matrix + _DAMPING * torch.eye(rank, dtype=matrix.dtype, device=matrix.device)
        values, self.vectors = torch.linalg.eigh(damped)
        keep = values > values.amax() * rank * torch.finfo(values.dtype).eps
        self.inverse = (self.vectors * torch.where(keep, values.reciprocal(), 0.0)) @ self.vectors.T
        # Rounding can leave a null direction's eigenvalue a little below δ; the Sylvester
        # denominators need it positive.
        self.values = values.clamp_min(_DAMPING)


def adjusted_gradients(
    A: Tensor, B: Tensor, scale: float, grad_A: Tensor, grad_B: Tensor, X: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted gradients ``(g_A, g_B)`` from the raw LoRA gradients.

    LoRA-Pro (https://arxiv.org/abs/2407.18242), for ``ΔW = s B A``:

        g_A = (1/s²) (BᵀB)⁻¹ G_A + X A,    g_B = (1/s²) (I − P_B) G_B (AAᵀ)⁻¹ − B X

    They minimize ``||s B g_A + s g_B A − g||_F`` for the full gradient ``g`` behind
    ``G_A = s Bᵀ g``, ``G_B = s g Aᵀ``; every X gives the same ``s B g_A + s g_B A``.

    Args:
        A: (rank, in) factor; B: (out, rank) factor; scale: s.
        grad_A: ``G_A``, shape of A; grad_B: ``G_B``, shape of B.
        X: (rank, rank). ``None`` solves the paper's Sylvester equation
            ``(BᵀB) X + X (AAᵀ) = −(1/s²) (BᵀB)⁻¹ G_A Aᵀ``, the X that keeps ``(g_A, g_B)``
            closest to ``(G_A, G_B)`` in Frobenius norm.

    Returns:
        ``(g_A, g_B)`` in at least fp32. Inverses are ``pinv(M + 1e-8 I)`` (the official damping).
    """
    return _Tangent(A, B, scale).adjusted(grad_A, grad_B, X)


def equivalent_gradient(A: Tensor, B: Tensor, scale: float, grad_A: Tensor, grad_B: Tensor) -> Tensor:
    """``g̃ = s B g_A + s g_B A = P_B g + (I − P_B) g P_A``: the projection of the full gradient
    onto the matrices a LoRA step can produce at ``(A, B)``, shape (out, in).

    The closest low-rank step to ``g``, computed from ``G_A``, ``G_B`` in O(r²(out + in) + r³)
    plus the (out, in) product. Args as in :func:`adjusted_gradients`.
    """
    return _Tangent(A, B, scale).equivalent(grad_A, grad_B)


class _FactorOptimizer(Optimizer, abc.ABC):
    """Steps each factor pair jointly (one param group per adapted layer) and every other trainable
    parameter on its own; subclasses supply both directions."""

    def __init__(self, model: nn.Module, defaults: dict[str, Any]) -> None:
        for name in ("lr", "weight_decay"):
            if defaults[name] < 0:
                raise ValueError(f"{type(self).__name__}: {name}={defaults[name]} must be >= 0")
        pairs = factor_pairs(model, type(self).__name__)
        # Each pair is its own group so that the pairing is explicit and survives state_dict
        # (the official code assumes A and B alternate in one list, which other orderings break).
        groups = [{"params": [pair.A, pair.B], "layer": pair.path, "scale": pair.scale} for pair in pairs]
        groups += other_parameter_groups(model, pairs, defaults["weight_decay"])
        # A group without a scale, including one added later with add_param_group, holds
        # parameters without factors.
        super().__init__(groups, {**defaults, "layer": None, "scale": None})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update. Gradient clipping, if any, belongs before this call, on the raw gradients
        (as the transformers ``Trainer`` does); the adjusted gradients are not clipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["scale"] is None:
                for p in group["params"]:
                    if p.grad is not None:
                        _descend(p, self._direction(self.state[p], p.grad, group), group)
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue
            if A.grad is None or B.grad is None:
                raise ValueError(f"{type(self).__name__}: '{group['layer']}' has a gradient for only one of A, B")
            g_A, g_B = self._pair_gradients(self.state[A], A, B, A.grad, B.grad, group)
            _descend(A, g_A, group)
            _descend(B, g_B, group)
        return loss

    @abc.abstractmethod
    def _direction(self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        """The step direction of a parameter without factors."""
        ...

    @abc.abstractmethod
    def _pair_gradients(
        self, state: dict[str, Any], A: Tensor, B: Tensor, G_A: Tensor, G_B: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """``(g_A, g_B)`` for one factor pair, from its gradients ``G_A = A.grad``, ``G_B = B.grad``."""
        ...


class LoRAPro(_FactorOptimizer):
    """LoRA-Pro with full-space AdamW: LoRA trained as if by full fine-tuning with AdamW.

    Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
    https://arxiv.org/abs/2407.18242. Per factor pair, each step (the official "lora-pro-full"):

        g̃ = equivalent_gradient(G_A, G_B)                       (out, in)
        M ← β1 M + (1 − β1) g̃,   V ← β2 V + (1 − β2) g̃²,   Ĝ = M̂ / (√V̂ + ε)
        (g_A, g_B) = adjusted_gradients(s Bᵀ Ĝ, s Ĝ Aᵀ)          Sylvester X
        A ← A (1 − η λ) − η g_A,   B ← B (1 − η λ) − η g_B

    Use it where LoRA's quality lags full fine-tuning and the optimizer memory of full fine-tuning
    is affordable: ``M`` and ``V`` are full-size, ``2 · out · in`` numbers per adapted layer (the
    paper's choice). :class:`LoRAProSGD` keeps no state. Every trainable parameter without factors
    (a classifier head, DoRA's magnitude) gets plain AdamW with the same hyperparameters.

    With the transformers ``Trainer``: ``Trainer(model, args, optimizers=(LoRAPro(model, lr), None))``
    (the Trainer builds the lr schedule on it and clips the raw gradients before each step).

    Args:
        model: adapted with a method whose adapter declares ``factors()`` (LoRA, rsLoRA, DoRA).
        lr: η; the official Llama-2-7B runs use 2e-5, a full fine-tuning rate, since ``Ĝ`` is
            Adam-normalized in the full space.
        betas: Adam's (β1, β2), each in [0, 1).
        eps: Adam's ε, ≥ 0.
        weight_decay: λ, decoupled, applied to A and B directly (and to other matrices); ≥ 0.

    Raises:
        ValueError: a hyperparameter is out of range, or the model has no trainable factors.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-5,  # official Llama-2-7B runs
        betas: tuple[float, float] = (0.9, 0.999),  # official code (hard-coded there)
        eps: float = 1e-8,  # official code
        weight_decay: float = 0.0,  # official runs
    ) -> None:
        for i, beta in enumerate(betas):
            if not 0 <= beta < 1:
                raise ValueError(f"LoRAPro: betas[{i}]={beta} must be in [0, 1)")
        if eps < 0:
            raise ValueError(f"LoRAPro: eps={eps} must be >= 0")
        super().__init__(model, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _direction(self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        return _adam_direction(state, grad, group)

    def _pair_gradients(
        self, state: dict[str, Any], A: Tensor, B: Tensor, G_A: Tensor, G_B: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        s = group["scale"]
        tangent = _Tangent(A, B, s)
        full = _adam_direction(state, tangent.equivalent(G_A, G_B), group)  # (out, in)
        return tangent.adjusted(s * tangent.B.T @ full, s * full @ tangent.A.T, None)


class LoRAProSGD(_FactorOptimizer):
    """LoRA-Pro with SGD: each factor pair steps by its adjusted gradients; no optimizer state.

    Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
    https://arxiv.org/abs/2407.18242, the SGD form:

        (g_A, g_B) = adjusted_gradients(G_A, G_B)   (Sylvester X)
        A ← A (1 − η λ) − η g_A,   B ← B (1 − η λ) − η g_B

    so ``W`` moves by ``−η (P_B g + (I − P_B) g P_A)``, the best rank-r-tangent step. Use it where
    :class:`LoRAPro`'s full-size moments do not fit. Parameters without factors get plain SGD.

    Args:
        model: adapted with a method whose adapter declares ``factors()``.
        lr: η, ≥ 0.
        weight_decay: λ, decoupled, on A, B and other matrices; ≥ 0.

    Raises:
        ValueError: a hyperparameter is out of range, or the model has no trainable factors.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(model, {"lr": lr, "weight_decay": weight_decay})

    def _direction(self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        return grad

    def _pair_gradients(
        self, state: dict[str, Any], A: Tensor, B: Tensor, G_A: Tensor, G_B: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        return adjusted_gradients(A, B, group["scale"], G_A, G_B)


def _adam_direction(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
    """Adam's bias-corrected ``M̂ / (√V̂ + ε)``, updating the moments in ``state`` (step t from 1)."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
    return denominator.reciprocal_().mul_(state["exp_avg"]).div_(1 - beta1**t)  # reuses the buffer


def _descend(p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
    """Decoupled decay, then the step: ``p ← p (1 − η λ) − η d``."""
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(direction.to(p.dtype), alpha=-group["lr"])
