"""What every rank allocator shares: the training-loop interface, the rank history and optimizer-state
surgery for resized parameters. Decisions are taken from statistics all processes agree on
(``core.distributed``), so that every replica resizes identically.

The loop, for any allocator::

    loss = task_loss(model(x), y) + alloc.penalty()
    loss.backward()
    optimizer.step()                       # then the LR scheduler, if any
    if alloc.step(optimizer):              # True: parameter objects were replaced
        ddp_model = DistributedDataParallel(model)   # only under DDP: its reducer holds the old ones
    optimizer.zero_grad()
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal

import torch
from torch import Tensor, nn

from ..core.adapted import Adapted, AdapterT
from ..core.checks import check_number
from ..core.config import AdapterConfig
from ..core.delta import Adapter
from ..core.inject import adapted_modules

MomentFill = Literal["mean", "zero"]
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")  # new entries start at 0
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")  # new entries start at the fill value


@dataclass
class History:
    """Each layer's rank after every allocator step, with the total and the budget in force.

    Args:
        paths: the adapted layers, in model order.
        unit: what ``totals`` and ``budgets`` count: ``"rank"`` (the sum of the ranks) or
            ``"parameters"``.
    """

    paths: tuple[str, ...]
    unit: str = "rank"
    steps: list[int] = field(default_factory=list)
    ranks: list[tuple[float, ...]] = field(default_factory=list)  # one row per step, in ``paths`` order
    totals: list[float] = field(default_factory=list)
    budgets: list[float | None] = field(default_factory=list)

    def record(self, step: int, ranks: dict[str, float], total: float, budget: float | None) -> None:
        self.steps.append(step)
        self.ranks.append(tuple(ranks[path] for path in self.paths))
        self.totals.append(total)
        self.budgets.append(budget)

    def final(self) -> dict[str, float]:
        """The ranks after the last recorded step."""
        if not self.ranks:
            raise ValueError("the history is empty: no allocator step has run")
        return dict(zip(self.paths, self.ranks[-1], strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "paths": list(self.paths),
            "unit": self.unit,
            "steps": self.steps,
            "ranks": [list(r) for r in self.ranks],
            "totals": self.totals,
            "budgets": self.budgets,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(
            tuple(data["paths"]),
            data["unit"],
            list(data["steps"]),
            [tuple(r) for r in data["ranks"]],
            list(data["totals"]),
            list(data["budgets"]),
        )


class RankAllocator(abc.ABC, Generic[AdapterT]):
    """An allocator drives the adapters of one model during training (see the module docstring).

    Pass the model itself, not a ``DistributedDataParallel`` wrapper around it. Build the optimizer
    over the model's trainable parameters before the first :meth:`step`; the allocator moves the
    state of every parameter it replaces.

    Args:
        model: a model adapted with a method this allocator drives.
        total_steps: T, the number of optimizer steps of the run (not micro-batches): the
            schedules are functions of it, and a step past it raises.
    """

    module_class: ClassVar[type[Adapter]]  # the adapters this allocator drives
    # True when parameters are replaced before the last step (a DDP wrapper must be rebuilt then);
    # False when the only replacement happens at the last step, after the last backward.
    reshapes_during_training: ClassVar[bool] = False
    unit: ClassVar[str] = "rank"
    # Adapter parameters the allocator sets itself (ARD-LoRA's α), which an optimizer need not hold.
    owned_parameters: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError(f"{type(self).__name__} needs the model itself: pass ddp_model.module")
        check_number(type(self).__name__, "total_steps", total_steps, 1, integer=True)
        self.model = model
        self.layers: dict[str, Adapted[AdapterT]] = dict(adapted_modules(model))
        if not self.layers:
            raise ValueError(f"{type(self).__name__}: the model has no rankwise adapters; call rankwise.adapt first")
        wrong = {
            path: type(layer.delta).__name__
            for path, layer in self.layers.items()
            if not isinstance(layer.delta, self.module_class)
        }
        if wrong:
            raise TypeError(f"{type(self).__name__} drives {self.module_class.__name__} adapters; found {wrong}")
        # The adapter each layer runs now is the one driven to the end: its statistics, masks and
        # budget are that adapter's (rankwise.set_active must not hand them to another).
        self.names = {path: layer.active[0] for path, layer in self.layers.items()}
        self.total_steps = total_steps
        self.t = 0  # optimizer steps done so far; the step being processed in step()
        self.history = History(tuple(self.layers), self.unit)

    @classmethod
    def layer_configs(cls, model: nn.Module, config: AdapterConfig, paths: Sequence[str]) -> dict[str, AdapterConfig]:
        """Each target layer's config as this allocator, built with its defaults, sets it: what a
        parameter budget must count. ``config`` for every layer unless the allocator changes a
        layout on construction."""
        return dict.fromkeys(paths, config)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Update the statistics and apply this step's decisions.

        Call once per optimizer step, after ``optimizer.step()`` (which unscales AMP gradients) and
        before ``zero_grad()``: the gradients of this step are read.

        Returns:
            True when parameter objects were replaced (ranks changed shape): a
            ``DistributedDataParallel`` wrapper must then be rebuilt around the model.

        Raises:
            ValueError: past ``total_steps``, a replaced parameter is not in ``optimizer``, or the
                adapter it drives is no longer the active one (another adapter set active, or its
                own deleted), checked before anything changes.
            RuntimeError: a gradient the step reads is missing (called after ``zero_grad``).
        """
        held = {id(layer) for _, layer in adapted_modules(self.model)}
        moved = [
            path for path, layer in self.layers.items() if id(layer) not in held or layer.active != (self.names[path],)
        ]
        if moved:
            raise ValueError(
                f"{type(self).__name__}: the adapter it drives ({self.names[moved[0]]!r} on {moved}) is no longer the "
                "active one (rankwise.set_active, delete_adapter or unwrap since it was built); its statistics and "
                "budget are that adapter's: keep it active for the whole run, or build a new allocator (and optimizer)"
            )
        if self.t >= self.total_steps:
            raise ValueError(
                f"{type(self).__name__}: step {self.t + 1} is past total_steps={self.total_steps}; "
                "total_steps must count optimizer steps"
            )
        if self.t == 0:
            self._check_optimizer(optimizer)
        changed = self._step(optimizer)
        self.history.record(self.t, self.ranks(), self.total(), self.budget)
        self.t += 1
        return changed

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # An optimizer built before the adapters were rebuilt (ARD-LoRA splits heads on
        # construction) holds parameters no forward uses: the run would train nothing, silently.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            f"{path}.{name}"
            for path, layer in self.layers.items()
            for name, p in layer.delta.named_parameters()
            if p.requires_grad and name not in self.owned_parameters and id(p) not in held
        ]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the optimizer does not hold {len(missing)} adapter parameters "
                f"(e.g. {missing[:3]}); build it over the model's trainable parameters after adapting and "
                "after creating the allocator"
            )

    @abc.abstractmethod
    def _step(self, optimizer: torch.optim.Optimizer) -> bool: ...

    @abc.abstractmethod
    def ranks(self) -> dict[str, float]:
        """Each layer's current rank."""

    def total(self) -> float:
        """The quantity the budget bounds (in ``unit``)."""
        return sum(self.ranks().values())

    @property
    @abc.abstractmethod
    def budget(self) -> float | None:
        """The budget in force now (in ``unit``); ``None`` when unbounded."""

    def penalty(self) -> Tensor:
        """The allocator's term to add to the task loss (zero unless a subclass defines one)."""
        return torch.zeros((), device=next(iter(self.layers.values())).weight.device)

    @property
    def has_penalty(self) -> bool:
        """Whether :meth:`penalty` can be non-zero (the Trainer callback adds it only then)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to make the same decisions; ``torch.save``-able."""
        return {"t": self.t, "history": self.history.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into an allocator built on the resumed model."""
        history = History.from_dict(state["history"])
        if history.paths != self.history.paths:
            raise ValueError(
                f"the state is for layers {list(history.paths)}, this allocator has {list(self.history.paths)}"
            )
        self.t, self.history = state["t"], history


def migrate(
    optimizer: torch.optim.Optimizer,
    resized: list[tuple[nn.Parameter, nn.Parameter, int]],
    keep: Tensor,
    grown: int,
    fill: MomentFill = "mean",
) -> None:
    """Move optimizer state from replaced parameters to their replacements.

    Each new parameter takes the old one's place in its param group (same group, same position),
    so the group's ``lr`` and ``weight_decay`` and any LR scheduler stay attached. Its state is the
    old state sliced to ``keep`` along the rank dimension, with ``grown`` new entries appended:
    first moments (``exp_avg``, ``momentum_buffer``) at 0, second moments (``exp_avg_sq``,
    ``max_exp_avg_sq``) at ``fill``; ``step`` is kept.

    Args:
        resized: ``(old, new, rank_dim)`` per parameter, as an adapter's resize returns them.
        keep: indices kept along ``rank_dim``, in their new order.
        grown: entries appended after the kept ones.
        fill: ``"mean"``: new second moments start at the mean of the kept ones, which damps the
            ≈3× oversized first update a zero second moment gives at a large step count;
            ``"zero"``: start at 0 (a naive fresh start).

    Raises:
        ValueError: an old parameter is not in ``optimizer``.
        TypeError: the optimizer keeps per-parameter state this function does not know how to
            resize (only Adam/AdamW/SGD-style moments are supported).
    """
    for old, new, dim in resized:
        _replace_in_groups(optimizer, old, new)
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {
                key: _resize_state(optimizer, key, value, old.shape, dim, keep, grown, fill)
                for key, value in state.items()
            }


def _replace_in_groups(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                return
    raise ValueError(
        "a resized adapter parameter is not in the optimizer; build the optimizer over the model's "
        "trainable parameters after adapting (and after rankwise.allocate.gora)"
    )


def _resize_state(
    optimizer: torch.optim.Optimizer,
    key: str,
    value: Any,
    shape: torch.Size,
    dim: int,
    keep: Tensor,
    grown: int,
    fill: MomentFill,
) -> Any:
    if key == "step" or value is None:
        return value
    if key not in _FIRST_MOMENTS + _SECOND_MOMENTS or not isinstance(value, Tensor) or value.shape != shape:
        raise TypeError(
            f"cannot resize {type(optimizer).__name__}'s state {key!r}; supported: step, "
            f"{', '.join(_FIRST_MOMENTS + _SECOND_MOMENTS)} (Adam, AdamW, SGD)"
        )
    kept = value.index_select(dim, keep.to(value.device))
    pad_shape = list(shape)
    pad_shape[dim] = grown
    pad = torch.zeros(pad_shape, dtype=value.dtype, device=value.device)
    if key in _SECOND_MOMENTS and fill == "mean" and kept.numel():
        pad += kept.mean()
    return torch.cat([kept, pad], dim=dim)
