"""SingLoRA: one matrix ``A`` and the symmetric update ``s · u(t) · A Aᵀ``, ramped in over T steps.

Bensaïd, Rotstein, Velich, Bensaïd, Kimmel, "SingLoRA: Low Rank Adaptation Using a Single Matrix",
https://arxiv.org/abs/2507.05566.

    D = max(in, out),  A ∈ R^{D × r},  A_in = A[:in],  A_out = A[:out]
    ΔW(t) = s · u(t) · A_out A_inᵀ,   u(t) = min(t / T, 1),   s = α / r

t is the number of optimizer steps taken, advanced by :func:`rankwise.step` or the hook
:func:`rankwise.step_with` installs (see :mod:`rankwise.core.steps`), never by forward calls.
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
from ..core.delta import Adapter, Delta, MergeState, add_product, as_method, check_configs_agree, low_rank_product
from ..core.registry import register
from ..core.steps import Stepped


@dataclass(frozen=True, kw_only=True)
class SingLoRAConfig(AdapterConfig):
    """SingLoRA's hyperparameters.

    Args:
        rank: r, the columns of ``A``; r >= 1.
        alpha: α; the update is scaled by ``α / r``; α > 0.
        ramp_steps: T, the optimizer steps over which ``u(t)`` rises from 0 to 1; T >= 1. Set it
            to about 10% of the run's optimizer steps (:meth:`SingLoRA.for_run` does).
        dropout: dropout probability on the adapter branch's input only; in [0, 1).
    """

    size_knob: ClassVar[str | None] = "rank"
    # kyegomez/SingLoRA's example, said to follow the paper (unverified; the paper's value was not
    # retrieved). LoRA's learning-rate grid is worth sweeping as well.
    recommended_lr: ClassVar[float] = 1e-3

    rank: int = 8  # kyegomez/SingLoRA and peft-singlora examples
    alpha: float = 8.0  # α = r, as in the kyegomez/SingLoRA and peft-singlora examples, so s = 1
    ramp_steps: int = 1000  # peft-singlora default; for a given run, ~10% of its optimizer steps
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "rank", 1)
        check_range(self, "alpha", 0, low_open=True)
        check_range(self, "ramp_steps", 1)
        check_range(self, "dropout", 0, 1, high_open=True)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@register("singlora", SingLoRAConfig)
class SingLoRA(Delta[SingLoRAConfig], Stepped):
    """SingLoRA: ΔW = s·u(t)·A_out A_inᵀ from one matrix A; half of LoRA's parameters at equal rank.

    On a square layer ΔW is positive semi-definite (times the sign of s): SingLoRA cannot express
    antisymmetric or indefinite updates. That is the method, not a defect. The model changes only
    once the step count advances: register :func:`rankwise.step_with` on the optimizer.
    """

    example_config = {"rank": 2}
    step: Tensor  # a buffer (register_buffer), declared for the type checker

    def __init__(self, w0: Tensor, config: SingLoRAConfig) -> None:
        super().__init__(w0, config)
        size = max(self.in_features, self.out_features)
        # LoRA's A distribution on the input side, U(−1/√in, 1/√in), so that x A_in has LoRA's
        # scale. (peft-singlora draws with fan-in r, which makes ‖A Aᵀ‖ grow like D / r.)
        bound = 1 / math.sqrt(self.in_features)
        self.A = nn.Parameter(torch.empty(size, config.rank, dtype=w0.dtype, device=w0.device).uniform_(-bound, bound))
        # t: persistent, so a checkpoint resumes the ramp where it was.
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=w0.device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        self.ramp_steps = config.ramp_steps

    @classmethod
    def num_params(cls, in_features: int, out_features: int, config: SingLoRAConfig) -> int:
        return config.rank * max(in_features, out_features)

    @classmethod
    def for_run(cls, config: SingLoRAConfig, steps: int) -> SingLoRAConfig:
        # The default ramp of 1000 steps (peft-singlora's) would keep the update near zero through
        # a run of a few dozen steps; a ramp of ~10% of the run leaves it fully on for the rest.
        return dataclasses.replace(config, ramp_steps=max(1, steps // 10))

    def advance(self) -> None:
        with torch.no_grad():
            self.step.add_(1)

    def ramp(self) -> Tensor:
        """``u(t) = min(t / T, 1)`` as a 0-dim tensor of A's dtype (a tensor, so compiled graphs
        read the current step instead of baking it in)."""
        return (self.step.to(self.A.dtype) / self.ramp_steps).clamp(max=1)

    def _hidden(self, x: Tensor) -> Tensor:
        """``s · u(t) · x A_in``, shape (..., rank): the scale goes on the narrowest tensor.

        ``A_inᵀ`` as a contiguous (rank, in) copy (rank × in numbers): with A's own row-major slice,
        autograd would form the backward products in orientations MKL runs several times slower at
        small rank (as for the up-projection, :class:`rankwise.core.delta._UpProjection`)."""
        down = self.A[: self.in_features].t().contiguous()
        return F.linear(self.dropout(x), down) * (self.scale * self.ramp())

    def forward(self, x: Tensor) -> Tensor:
        return low_rank_product(self._hidden(x), self.A[: self.out_features].t())

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return add_product(y, self._hidden(x), self.A[: self.out_features].t())

    def _delta_weight(self, ramp: Tensor) -> Tensor:
        return (self.scale * ramp) * (self.A[: self.out_features] @ self.A[: self.in_features].t())

    def delta_weight(self) -> Tensor:
        return self._delta_weight(self.ramp())

    def merged_with_state(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``W'`` and ``u(t)``: unmerge must subtract the ΔW that merge added, even if steps were
        counted in between."""
        ramp = self.ramp()
        return w0 + self._delta_weight(ramp).to(w0.dtype), ramp

    def restore_weight(self, merged: Tensor, ramp: MergeState) -> Tensor:
        assert isinstance(ramp, Tensor)  # what merged_with_state returned: u(t) at merge time
        return merged - self._delta_weight(ramp).to(merged.dtype)

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """Exact for non-negative weights, at the parts' current ramps: the columns side by side,
        ``A = [c_1 A_1, c_2 A_2, …]`` with ``c_i = √(w_i s_i u_i / (s u))``, rank ``Σ r_i``, so that
        ``s u A_out A_inᵀ = Σ_i w_i s_i u_i A_out,i A_in,iᵀ``. The new ramp starts at the furthest
        part's step (the parts' own ramps are folded into ``c_i``); steps counted later move it on.

        Raises:
            ValueError: a negative weight: ``A Aᵀ`` is positive semi-definite, so a difference of
                two updates is in general no SingLoRA update (merge the adapters instead).
        """
        singles = [(weight, as_method(cls, adapter)) for weight, adapter in parts]
        negative = [weight for weight, _ in singles if weight < 0]
        if negative:
            raise ValueError(
                f"SingLoRA: weights {negative} are negative; its update s·u·A Aᵀ has one sign, so only non-negative "
                "weights combine exactly; merge the adapters instead (rankwise.set_active(model, names), "
                "rankwise.merge(model))"
            )
        check_configs_agree(cls, parts, folded=("rank", "alpha", "ramp_steps"))
        first = max((adapter for _, adapter in singles), key=lambda adapter: int(adapter.step))
        rank = sum(adapter.A.shape[1] for _, adapter in singles)
        new = cls(w0, dataclasses.replace(first.config, rank=rank)).to(device=w0.device, dtype=first.A.dtype)
        with torch.no_grad():
            new.step.copy_(first.step)
            # All ramps at zero: every update is zero and stays so until steps are counted; the
            # columns then keep their weights relative to each other without the ramps.
            on = bool(new.ramp() > 0)
            one = torch.ones((), dtype=new.A.dtype, device=new.A.device)
            columns = [
                a.A * torch.sqrt(w * a.scale * (a.ramp() if on else one) / (new.scale * (new.ramp() if on else one)))
                for w, a in singles
            ]
            new.A.copy_(torch.cat(columns, 1))
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.A.shape[1]}, scale={self.scale:g}, ramp_steps={self.ramp_steps}"
