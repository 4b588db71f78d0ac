"""AdaLoRA's allocator: a cubic budget schedule, and the weakest SVD triplets masked to it.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023,
https://arxiv.org/abs/2303.10512. The importance of a triplet (the paper's sensitivity, smoothed,
times its uncertainty), per entry:

    I = |w · g|,   Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   s = Ī · Ū
    S_i = s(e_i) + mean_j s(A_ij) + mean_j s(B_ji)

and the cubic budget schedule, as the official code and PEFT compute it:

    b(t) = b0                                              for t <= t_i
         = ⌊b_T + (b0 − b_T) (1 − (t − t_i)/(T − t_f − t_i))³⌋ for t_i < t < T − t_f (mask when t % ΔT = 0)
         = b_T                                             for t >= T − t_f (the pattern fixed)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.adalora import AdaLoRA
from ..core.checks import check_number
from ..core.distributed import from_rank_zero, mean_across_ranks
from .base import RankAllocator, migrate

ROLES = (("A", 0), ("e", 0), ("B", 1))  # each triplet parameter and its rank dimension


class Sensitivity:
    """Smoothed sensitivity Ī and uncertainty Ū of every entry of A, e and B (module docstring).

    Args:
        beta1: β1, the sensitivity EMA's decay; in (0, 1).
        beta2: β2, the uncertainty EMA's decay; in (0, 1).
    """

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.ema: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # path -> role -> (Ī, Ū)

    def update(self, path: str, module: AdaLoRA) -> None:
        """Fold this step's ``|w · g|`` into the EMAs; ``w`` after the step, ``g`` the step's gradient.

        Raises:
            RuntimeError: a parameter has no gradient (``step`` was called after ``zero_grad``).
        """
        entries = self.ema.setdefault(path, {})
        with torch.no_grad():
            for (role, _), p in zip(ROLES, module.triplets(), strict=True):
                if p.grad is None:
                    raise RuntimeError(
                        f"'{path}.delta.{role}' has no gradient: call the allocator's step() after "
                        "optimizer.step() and before optimizer.zero_grad()"
                    )
                sensitivity = (p * p.grad).abs()
                mean, spread = entries.get(role, (torch.zeros_like(p), torch.zeros_like(p)))
                mean = self.beta1 * mean + (1 - self.beta1) * sensitivity
                spread = self.beta2 * spread + (1 - self.beta2) * (sensitivity - mean).abs()  # the new Ī
                entries[role] = (mean, spread)

    def triplet_scores(self, path: str, module: AdaLoRA) -> Tensor:
        """``S_i`` for each triplet of the layer, shape (rank,); zeros before any update."""
        entries = self.ema.get(path, {})
        scores = []
        for (role, _), p in zip(ROLES, module.triplets(), strict=True):
            mean, spread = entries.get(role, (torch.zeros_like(p), torch.zeros_like(p)))
            scores.append(mean * spread)
        A, e, B = scores
        return e.view(-1) + A.mean(dim=1) + B.mean(dim=0)

    def resize(self, path: str, keep: Tensor, grown: int) -> None:
        """Slice the layer's EMAs as its parameters were; zeros for ``grown`` new triplets."""
        entries = self.ema.get(path, {})
        for role, dim in ROLES:
            if role in entries:
                importance, uncertainty = entries[role]
                entries[role] = (
                    _slice_and_pad(importance, dim, keep, grown),
                    _slice_and_pad(uncertainty, dim, keep, grown),
                )

    def clear(self) -> None:
        self.ema = {}


def _slice_and_pad(t: Tensor, dim: int, keep: Tensor, grown: int) -> Tensor:
    pad_shape = list(t.shape)
    pad_shape[dim] = grown
    return torch.cat([t.index_select(dim, keep.to(t.device)), t.new_zeros(pad_shape)], dim=dim)


class TripletAllocator(RankAllocator[AdaLoRA]):
    """What AdaLoRA and ElaLoRA share: the sensitivity EMAs and the orthogonality penalty.

    Args:
        beta1, beta2: the EMA decays of :class:`Sensitivity`.
        orth_weight: γ, the weight of the orthogonality penalty; >= 0.
        squared_orth: use the paper's squared norms instead of the code's plain ones.
    """

    module_class = AdaLoRA

    def __init__(
        self, model: nn.Module, total_steps: int, beta1: float, beta2: float, orth_weight: float, squared_orth: bool
    ) -> None:
        super().__init__(model, total_steps)
        name = type(self).__name__
        check_number(name, "beta1", beta1, 0, 1, low_open=True, high_open=True)
        check_number(name, "beta2", beta2, 0, 1, low_open=True, high_open=True)
        check_number(name, "orth_weight", orth_weight, 0)
        self.tracker = Sensitivity(beta1, beta2)
        self.orth_weight, self.squared_orth = orth_weight, squared_orth

    def penalty(self) -> Tensor:
        """``γ · mean over all A and B matrices of ||A Aᵀ − I||_F`` (resp. ``||Bᵀ B − I||_F``),
        all ``r_init`` triplets included, masked ones too, as in the official code and PEFT."""
        if self.orth_weight == 0:
            return super().penalty()
        terms = [layer.delta.orthogonality(self.squared_orth) for layer in self.layers.values()]
        return self.orth_weight * torch.stack(terms).sum() / (2 * len(terms))

    @property
    def has_penalty(self) -> bool:
        return self.orth_weight > 0

    def scores(self) -> list[Tensor]:
        """Every layer's triplet scores, averaged over processes before any decision uses them."""
        scores = [self.tracker.triplet_scores(path, layer.delta) for path, layer in self.layers.items()]
        shared = mean_across_ranks(torch.cat(scores))
        return list(shared.split([len(s) for s in scores]))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema": self.tracker.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tracker.ema = state["ema"]


class AdaLoRAAllocator(TripletAllocator):
    """AdaLoRA: shrink the total rank from N·r_init to ``budget`` on a cubic schedule, masking the
    triplets with the lowest importance; at the last step the masked triplets are removed.

    Masking is soft, as in the paper, the official code and PEFT: masked triplets keep training and
    compete again at the next mask; from ``T − t_final`` on the pattern is fixed and re-applied
    every step. After the last step the masked triplets are physically removed (the function does
    not change), so a checkpoint holds each layer's final rank.

    Args:
        model: a model adapted with ``AdaLoRAConfig`` (or ``ElaLoRAConfig``).
        total_steps: T, optimizer steps in the run.
        budget: b_T, the total rank at the end; in [0, N·r_init]. Default ``round(N·r_init / 1.5)``,
            the paper's rule b(0) ≈ 1.5·b(T) (PEFT's init_r = 12 → target_r = 8).
        t_init: t_i, warm-up steps before any masking; default ``T // 6`` (the README's 500 of 3000).
        t_final: t_f, steps trained with the final pattern; >= 1 (the final mask must happen);
            default ``T // 2`` (the README's 1500 of 3000).
        delta_t: ΔT, steps between masks in the budget phase; default 10 (README).
        beta1, beta2: EMA decays; 0.85 (official code and PEFT).
        orth_weight: γ; 0.1 (official code; PEFT's default is 0.5).
        squared_orth: the paper's squared norms in the penalty (the code's are not squared).

    Raises:
        ValueError: a value outside its range, or a schedule with no budget phase
            (``t_init >= T − t_final``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        budget: int | None = None,
        t_init: int | None = None,
        t_final: int | None = None,
        delta_t: int = 10,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_weight: float = 0.1,
        squared_orth: bool = False,
    ) -> None:
        super().__init__(model, total_steps, beta1, beta2, orth_weight, squared_orth)
        self.init_budget = sum(layer.delta.rank for layer in self.layers.values())
        budget = round(self.init_budget / 1.5) if budget is None else budget
        check_number("AdaLoRAAllocator", "budget", budget, 0, integer=True)
        if budget > self.init_budget:
            raise ValueError(f"AdaLoRAAllocator: budget={budget} exceeds the starting total rank {self.init_budget}")
        self.target_budget = budget
        self.t_init = total_steps // 6 if t_init is None else t_init
        self.t_final = total_steps // 2 if t_final is None else t_final
        check_number("AdaLoRAAllocator", "t_init", self.t_init, 0, integer=True)
        check_number("AdaLoRAAllocator", "t_final", self.t_final, 1, integer=True)
        check_number("AdaLoRAAllocator", "delta_t", delta_t, 1, integer=True)
        if self.t_init >= total_steps - self.t_final:
            raise ValueError(
                f"AdaLoRAAllocator: t_init={self.t_init} must be < total_steps - t_final = "
                f"{total_steps - self.t_final}, "
                "or there is no budget phase"
            )
        self.delta_t = delta_t
        self.masks = {path: torch.ones(layer.delta.rank, dtype=torch.bool) for path, layer in self.layers.items()}
        self._budget = self.init_budget

    def schedule(self, t: int) -> tuple[int, bool]:
        """``(b(t), mask at t)`` for step t of the budget phase (the final phase is handled apart)."""
        if t <= self.t_init:
            return self.init_budget, False
        final = self.total_steps - self.t_final
        if t > final:
            return self.target_budget, True
        progress = 1 - (t - self.t_init) / (final - self.t_init)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, t % self.delta_t == 0

    def _step(self, optimizer: torch.optim.Optimizer) -> bool:
        final = self.total_steps - self.t_final
        if self.t < final:
            for path, layer in self.layers.items():
                self.tracker.update(path, layer.delta)
            budget, mask_now = self.schedule(self.t)
            if mask_now:
                self._mask_to(budget)
        elif self.t == final:
            self._mask_to(self.target_budget)
            self.tracker.clear()  # frozen from here on (PEFT); nothing reads them again
        else:
            self._apply_masks()
        if self.t == self.total_steps - 1:
            self._remove_masked(optimizer)
            return True
        return False

    def _mask_to(self, budget: int) -> None:
        # Exactly init − b triplets are masked: a stable sort breaks ties by position, where
        # PEFT's `score <= kthvalue` would mask every tied triplet and undershoot the budget.
        scores = torch.cat(self.scores())
        masked = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
        masked[torch.argsort(scores, stable=True)[: self.init_budget - budget]] = 1
        masked = from_rank_zero(masked).cpu().bool()
        for path, chunk in zip(self.layers, masked.split([len(m) for m in self.masks.values()]), strict=True):
            self.masks[path] = ~chunk
        self._budget = budget
        self._apply_masks()

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for path, layer in self.layers.items():
                e = layer.delta.e
                e.masked_fill_(~self.masks[path].to(e.device).unsqueeze(1), 0.0)

    def _remove_masked(self, optimizer: torch.optim.Optimizer) -> None:
        for path, layer in self.layers.items():
            keep = self.masks[path].nonzero().view(-1)
            migrate(optimizer, layer.delta.resize(keep.to(layer.delta.A.device)), keep, 0)
            self.masks[path] = torch.ones(len(keep), dtype=torch.bool)

    def ranks(self) -> dict[str, float]:
        return {path: int(mask.sum()) for path, mask in self.masks.items()}

    @property
    def budget(self) -> int:
        return self._budget

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": self.masks, "budget": self._budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.masks, self._budget = state["masks"], state["budget"]


# The method declares the allocator that trains it; declared from here because allocate imports
# adapters, not the other way.
AdaLoRA.allocator = AdaLoRAAllocator
