"""ARD-LoRA-style allocator: α learned on the task loss with ℓ1 and total-variation penalties, by
a projected step of its own that a parameter budget can bound.

Shinwari & Usama, "ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of
Foundation Models with Heterogeneous Adaptation Needs", https://arxiv.org/abs/2506.18267. The
abstract names a meta-objective (task loss + ℓ1 sparsity + total variation) for per-layer and
per-head scaling factors; its form here is our reconstruction:

    min_α  L_task(θ*(α), α) + λ1 Σ_g |α_g| + λ_tv Σ_{m,h} Σ_l |α_{l+1,m,h} − α_{l,m,h}|_ε
    s.t.   α_lo <= α_g <= α_hi,   Σ_g r0 α_g (in_g + out_g) <= budget   (when a budget is given)

g runs over every (layer, head) group, the TV sum over layers l of one module type m (paths equal
up to their integer components, e.g. ``layers.*.self_attn.q_proj``), head by head;
``|x|_ε = √(x² + ε²) − ε`` is a smoothed |x|. θ (A, B, m) trains with the user's optimizer; the
allocator takes one projected step on α per optimizer step from the same batch's gradient (a
first-order, single-batch approximation of the bilevel problem, not a held-out meta-batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..adapters.ard_lora import ARDLoRA, ARDLoRAConfig
from ..core import geometry
from ..core.checks import check_number
from ..core.config import AdapterConfig, matches
from ..core.distributed import from_rank_zero
from .base import RankAllocator, migrate

_BISECTIONS = 100  # halvings of the budget projection's multiplier: far below float64 resolution
BETAS = (0.9, 0.999)  # α's moment decays: Adam's defaults
TV_SMOOTHING = 1e-3  # ε of the smoothed |Δα|: far below the α steps that matter (a rank of r0 · 1e-3)
HeadLayout = tuple[int, Literal["out", "in"]]  # (heads, the side they split)
_QUERY_NAMES = frozenset({"q_proj", "query", "q", "Wq", "q_lin"})
_KEY_VALUE_NAMES = frozenset({"k_proj", "v_proj", "key", "value", "k", "v", "Wk", "Wv", "k_lin", "v_lin"})
_OUTPUT_NAMES = frozenset({"o_proj", "out_proj", "o", "Wo", "out_lin"})


class ARDLoRAAllocator(RankAllocator[ARDLoRA]):
    """ARD-LoRA-style: each (layer, head) group's rank r0·α is learned on the task loss under ℓ1 and TV
    penalties (module docstring), within a parameter budget if one is given.

    The allocator owns α. Its step restores α to its own copy (undoing whatever an optimizer that
    holds α did, weight decay included), then, after the warm-up, moves it by
    ``scale_lr · m̂_g / √v̂``: Adam's bias-corrected first moment per group, one second moment for
    all groups (the mean of their squared gradients), so a group with a larger gradient moves
    faster, as the budget's trade needs. α is then projected (Euclidean) onto
    ``[EDGE / r0, min(α_max, (slots − EDGE) / r0)]`` (where the effective rank is ``r0 α``; EDGE =
    1/2 with the gate's ramp of 2) and, with a ``budget``, onto ``Σ_g r0 α_g (in_g + out_g) <=
    budget``; with a budget α starts at its projection (1 everywhere when that fits). During the
    warm-up α stays at its start: the magnitudes start at 0, so the task has no say yet, and ℓ1
    alone would shrink every rank. At the last step each layer keeps only the slots its gates use
    (the function does not change), so a checkpoint holds the final sizes.

    Build it right after :func:`rankwise.adapt` and before the optimizer: it rebuilds the adapters
    of the layers it splits into heads. α may or may not be in the optimizer.

    Args:
        model: a model adapted with ``ARDLoRAConfig``.
        total_steps: T, optimizer steps in the run.
        l1: λ1, weight of ``Σ |α|``; >= 0. 1e-3 (our starting point; no published value).
        tv: λ_tv, weight of the total variation ``Σ |Δα|_ε`` between adjacent layers; >= 0. 1e-2
            (our starting point; no published value). 0 for layers that are not a stack.
        warmup: T_w, steps with α frozen; default ``round(0.05 · T)`` (our choice: 5%).
        budget: the most adapter parameters the effective ranks may use,
            ``Σ_g r0 α_g (in_g + out_g)``; ``None`` leaves it to λ1 (the achieved count is in
            ``history``). At least the cost of every group at its least rank.
        heads: ``{target name: (heads, "out" | "in")}``: layers (matched as ``targets`` are) that
            get one α per attention head: ``"out"`` splits rows (q, k, v), ``"in"`` splits columns
            (the output projection), e.g. ``{"q_proj": (12, "out"), "o_proj": (12, "in")}``.
            ``None`` (default) reads them from the model's config (:func:`attention_heads`); ``{}``
            keeps one α per matrix.
        scale_lr: η_α, the step on α for a gradient of the groups' RMS size; > 0. 1e-2 (our choice:
            Adam's usual rate; r0 · η_α ranks per step).

    Raises:
        ValueError: a value outside its range; a budget below the least ranks' cost; a ``heads``
            name that matches no adapted layer; a layer already trained.
        RuntimeError: at a step, α has no gradient (``step`` called after ``zero_grad``).
    """

    module_class = ARDLoRA
    unit = "parameters"
    owned_parameters = frozenset({"rank_scale"})

    @classmethod
    def layer_configs(cls, model: nn.Module, config: AdapterConfig, paths: Sequence[str]) -> dict[str, AdapterConfig]:
        """With its default ``heads=None``, one α per attention head (:func:`attention_heads`): each
        head's own A (rows) or B (columns) makes a split layer cost more than one α per matrix."""
        assert isinstance(config, ARDLoRAConfig)  # the allocator ARD-LoRA declares is asked for its configs
        split = attention_heads(model, dict.fromkeys(paths))
        return {
            path: dataclasses.replace(config, heads=split[path][0], head_side=split[path][1])
            if path in split
            else config
            for path in paths
        }

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        l1: float = 1e-3,
        tv: float = 1e-2,
        warmup: int | None = None,
        budget: int | None = None,
        heads: Mapping[str, tuple[int, Literal["out", "in"]]] | None = None,
        scale_lr: float = 1e-2,
    ) -> None:
        super().__init__(model, total_steps)
        check_number("ARDLoRAAllocator", "l1", l1, 0)
        check_number("ARDLoRAAllocator", "tv", tv, 0)
        check_number("ARDLoRAAllocator", "scale_lr", scale_lr, 0, low_open=True)
        self.warmup = round(0.05 * total_steps) if warmup is None else warmup
        check_number("ARDLoRAAllocator", "warmup", self.warmup, 0, integer=True)
        if budget is not None:
            check_number("ARDLoRAAllocator", "budget", budget, 0, integer=True)
        self.l1, self.tv, self._budget = l1, tv, budget
        split = attention_heads(model, self.layers) if heads is None else self._resolve(heads)
        for path, (count, side) in split.items():
            self._split_heads(path, count, side)
        least = sum(
            m.scale_range()[0] * m.config.rank * (m.group_in + m.group_out) * m.config.heads
            for m in (layer.delta for layer in self.layers.values())
        )
        if budget is not None and budget < least:
            raise ValueError(f"ARDLoRAAllocator: budget={budget} is below {least:g}, the parameters of the least ranks")
        self.project()  # α = 1 may cost more than the budget: start (and stay, in the warm-up) within it
        self.scale_lr = scale_lr
        self.scales = {path: layer.delta.rank_scale.detach().clone() for path, layer in self.layers.items()}
        self.moments: dict[str, Any] = {"t": 0, "v": 0.0, "m": {}}
        self.chains = _chains({path: layer.delta for path, layer in self.layers.items()})

    def _resolve(self, heads: Mapping[str, HeadLayout]) -> dict[str, HeadLayout]:
        split = {}
        for pattern, value in heads.items():
            hits = [path for path in self.layers if matches(path, pattern)]
            if not hits:
                raise ValueError(
                    f"ARDLoRAAllocator: heads entry {pattern!r} matches no adapted layer; adapted: {list(self.layers)}"
                )
            split.update(dict.fromkeys(hits, value))
        return split

    def _split_heads(self, path: str, count: int, side: Literal["out", "in"]) -> None:
        layer = self.layers[path]
        old = layer.delta
        if old.config.heads == count and old.config.head_side == side:
            return
        if old.magnitude.detach().abs().max() > 0:
            raise ValueError(f"ARDLoRAAllocator: '{path}' has been trained; split heads right after rankwise.adapt")
        config = dataclasses.replace(old.config, heads=count, head_side=side)
        w0 = geometry.weight_matrix(layer.base, layer.kind).detach().to(old.A.dtype)
        try:
            layer.replace_delta(type(old)(w0, config).to(device=old.A.device, dtype=old.A.dtype))
        except ValueError as error:
            raise ValueError(f"ARDLoRAAllocator on '{path}': {error}") from error

    def penalty(self) -> Tensor:
        """``λ1 Σ|α| + λ_tv Σ |α_{l+1} − α_l|_ε``; zero during the warm-up (α is frozen then)."""
        if self.t < self.warmup or not self.has_penalty:
            return super().penalty()
        zero = super().penalty()  # on the adapters' device, so the sums below start there
        scales = {path: layer.delta.rank_scale for path, layer in self.layers.items()}
        sparsity = sum((s.abs().sum() for s in scales.values()), zero)
        variation = sum(
            (_smooth_abs(scales[b] - scales[a]).sum() for chain in self.chains for a, b in pairwise(chain)), zero
        )
        return self.l1 * sparsity + self.tv * variation

    @property
    def has_penalty(self) -> bool:
        return self.l1 > 0 or self.tv > 0

    def _step(self, optimizer: torch.optim.Optimizer) -> bool:
        with torch.no_grad():
            for path, layer in self.layers.items():
                scale = layer.delta.rank_scale
                if scale.grad is None:
                    raise RuntimeError(
                        f"ARDLoRAAllocator: '{path}.delta.rank_scale' has no gradient: call step() after "
                        "optimizer.step() and before optimizer.zero_grad()"
                    )
                scale.copy_(self.scales[path])  # undoes the optimizer's step and weight decay, if α is in it
                optimizer.state.pop(scale, None)
            if self.t >= self.warmup:
                self._update_scales()
            for path, layer in self.layers.items():
                layer.delta.rank_scale.grad = None  # consumed here, also when α is not in the optimizer
                self.scales[path] = layer.delta.rank_scale.detach().clone()
        if self.t == self.total_steps - 1:
            self._keep_used_slots(optimizer)
            return True
        return False

    def _update_scales(self) -> None:
        """One projected step on α: Adam's first moment per group, but one second moment shared by
        all groups, so that a group whose gradient is larger moves faster (per-group Adam would move
        every α at the same pace whatever its gradient, and the budget would then cancel the moves)."""
        grads = {}
        for path, layer in self.layers.items():
            grad = layer.delta.rank_scale.grad
            assert grad is not None  # step() checked every α has one before calling this
            grads[path] = grad.double()
        self.moments["t"] += 1
        t = self.moments["t"]
        square = torch.cat([g.square() for g in grads.values()]).mean()
        self.moments["v"] = BETAS[1] * self.moments["v"] + (1 - BETAS[1]) * square.item()
        rms = math.sqrt(self.moments["v"] / (1 - BETAS[1] ** t))
        for path, layer in self.layers.items():
            first = self.moments["m"].get(path, torch.zeros_like(grads[path]))
            first = BETAS[0] * first + (1 - BETAS[0]) * grads[path]
            self.moments["m"][path] = first
            if rms > 0:
                step = self.scale_lr * first / (1 - BETAS[0] ** t) / rms
                layer.delta.rank_scale.sub_(step.to(layer.delta.rank_scale.dtype))
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """The Euclidean projection of α onto each group's ``scale_range()`` and, with a budget,
        ``Σ_g r0 α_g (in_g + out_g) <= budget`` (what each step after the warm-up ends with).

        The solution is ``α = clamp(α̂ − λ·cost, lower, upper)`` with the smallest λ >= 0 that
        fits, found by bisection, keeping the feasible end.
        """
        modules = [layer.delta for layer in self.layers.values()]
        scales = torch.cat([m.rank_scale.double() for m in modules])
        upper = torch.cat([torch.full_like(m.rank_scale, m.scale_range()[1], dtype=torch.double) for m in modules])
        lower = torch.cat([torch.full_like(m.rank_scale, m.scale_range()[0], dtype=torch.double) for m in modules])
        projected = scales.maximum(lower).minimum(upper)
        if self._budget is not None:
            cost = torch.cat(
                [
                    torch.full_like(m.rank_scale, m.config.rank * (m.group_in + m.group_out), dtype=torch.double)
                    for m in modules
                ]
            )
            if (cost * projected).sum() > self._budget:
                low, high = 0.0, float((scales / cost).max())
                for _ in range(_BISECTIONS):
                    middle = (low + high) / 2
                    if (cost * (scales - middle * cost).maximum(lower).minimum(upper)).sum() > self._budget:
                        low = middle
                    else:
                        high = middle
                projected = (scales - high * cost).maximum(lower).minimum(upper)
        for module, values in zip(modules, projected.split([m.config.heads for m in modules]), strict=True):
            module.rank_scale.copy_(values.to(module.rank_scale.dtype))

    def _keep_used_slots(self, optimizer: torch.optim.Optimizer) -> None:
        used = torch.tensor([layer.delta.used_slots() for layer in self.layers.values()])
        used = from_rank_zero(used.to(next(iter(self.layers.values())).delta.A.device)).cpu()
        for layer, slots in zip(self.layers.values(), used.tolist(), strict=True):
            migrate(optimizer, layer.delta.keep_slots(slots), torch.arange(slots), 0)

    def ranks(self) -> dict[str, float]:
        """Each layer's effective rank, ``Σ_h Σ_i gate_i(α_h)``."""
        return {path: float(layer.delta.effective_rank().detach().sum()) for path, layer in self.layers.items()}

    def total(self) -> float:
        """Adapter parameters the effective ranks use, ``Σ_g (in_g + out_g) · r_g``."""
        return sum(
            float(m.effective_rank().detach().sum()) * (m.group_in + m.group_out)
            for m in (layer.delta for layer in self.layers.values())
        )

    @property
    def budget(self) -> int | None:
        return self._budget

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scales": self.scales, "moments": self.moments}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scales, self.moments = state["scales"], state["moments"]


def _smooth_abs(x: Tensor) -> Tensor:
    """``|x|_ε = √(x² + ε²) − ε``: |x| within ε, differentiable at 0 (plain |x| has no gradient to
    follow there, so equal neighbours would chatter)."""
    return (x.square() + TV_SMOOTHING**2).sqrt() - TV_SMOOTHING


def attention_heads(model: nn.Module, layers: Mapping[str, object]) -> dict[str, HeadLayout]:
    """One α per attention head for the adapted attention projections, the head counts read from
    ``model.config`` (``num_attention_heads`` or ``n_head``; ``num_key_value_heads`` for k and v).

    The projections are told by their names: q, k and v (``q_proj``, ``query``, ``q``, ...) split
    their rows, the output projection (``o_proj``, ``out_proj``, ``o``, BERT's
    ``attention.output.dense``, GPT-2's ``attn.c_proj``) its columns, GPT-2's fused ``c_attn`` its
    rows into 3 × heads groups. Empty when the model has no such config or no such layer.
    """
    config = getattr(model, "config", None)
    count = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not isinstance(count, int):
        return {}
    kv = getattr(config, "num_key_value_heads", None) or count
    found: dict[str, HeadLayout] = {}
    for path in layers:
        parts = path.split(".")
        name, parent = parts[-1], ".".join(parts[:-1])
        if name in _QUERY_NAMES:
            found[path] = (count, "out")
        elif name in _KEY_VALUE_NAMES:
            found[path] = (kv, "out")
        elif name == "c_attn":
            found[path] = (3 * count, "out")
        elif (
            name in _OUTPUT_NAMES
            or (name == "c_proj" and parent.endswith("attn"))
            or (name == "dense" and parent.endswith("attention.output"))
        ):
            found[path] = (count, "in")
    return found


def _chains(modules: dict[str, ARDLoRA]) -> list[list[str]]:
    """Layers of one type, ordered by their indices: paths equal up to their integer components,
    with the same head layout (heads are compared one to one)."""
    groups: dict[tuple[str, int, str], list[tuple[tuple[int, ...], str]]] = {}
    for path, module in modules.items():
        parts = path.split(".")
        pattern = ".".join("*" if part.isdigit() else part for part in parts)
        key = (pattern, module.config.heads, module.config.head_side)
        groups.setdefault(key, []).append((tuple(int(p) for p in parts if p.isdigit()), path))
    return [[path for _, path in sorted(members)] for members in groups.values() if len(members) > 1]


# The method declares the allocator that trains it (see rankwise.allocate.adalora).
ARDLoRA.allocator = ARDLoRAAllocator
