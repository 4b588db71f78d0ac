"""Size every method to one trainable-parameter budget.

A method declares which integer field sets its size (``config.size_knob``: ``"rank"``,
``"block_size"``, ...) and its count on an (out, in) layer (``num_params``). The budget is
counted over the task's target layers only; the task head trains in every row and is left out.

The search tries every integer value of the knob from 1 to the widest target dimension, keeps the
ones that construct a valid config, orders them by distance from the budget, and takes the first
that every target layer accepts (shape checks such as "block_size must divide in_features" run
when a layer's module is built, so each candidate is built on the real layers until one fits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core import geometry, registry
from ..core.config import AdapterConfig
from ..core.inject import build, find_targets

TOLERANCE = 0.1  # a count within 10% of the budget counts as matched
DEFAULT_BUDGET = ("lora", 8)  # the default budget: LoRA at rank 8 on the task's target layers


def within_budget(params: int, budget: int, tolerance: float = TOLERANCE) -> bool:
    """Whether ``params`` is within ``tolerance`` of ``budget``: the count is *matched*."""
    return abs(params - budget) <= tolerance * budget


@dataclass(frozen=True)
class Sizing:
    """A method's config at the budget.

    Args:
        config: the config to adapt with.
        value: the ``size_knob`` value chosen, ``None`` for a method whose size the layers fix.
        params: adapter parameters over the target layers (``num_params`` summed).
        budget: the parameters asked for.
        matched: ``params`` is within ``TOLERANCE`` of ``budget``; otherwise the method runs at
            its nearest setting. A method that lays its layers out again when it starts (GoRA's
            allocation from gradients) can train another count: the runner judges each run by the
            count it measured.
    """

    config: AdapterConfig
    value: int | None
    params: int
    budget: int
    matched: bool

    @property
    def label(self) -> str:
        """The size for tables, e.g. ``"rank=8"``; ``"fixed"`` without a knob."""
        knob = type(self.config).size_knob
        return f"{knob}={self.value}" if knob is not None else "fixed"


def layer_shapes(model: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """``{path: (in_features, out_features)}`` of the layers ``config`` targets, as the method sees
    them (a k x k convolution is (in·k·k) -> out)."""
    shapes = {}
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        out_features, in_features = geometry.weight_matrix(module, geometry.check_supported(module, path)).shape
        shapes[path] = (in_features, out_features)
    return shapes


def count(config: AdapterConfig, shapes: dict[str, tuple[int, int]], model: nn.Module | None = None) -> int:
    """Adapter parameters of ``config`` over the layers in ``shapes``; given ``model``, each layer
    as the method's allocator will lay it out there (ARD-LoRA's heads), which is what trains.

    Raises:
        ValueError: a layer's shape does not fit the config.
    """
    module_class = registry.for_config(config).module_class
    allocator = module_class.allocator
    if model is None or allocator is None:
        layers = dict.fromkeys(shapes, config)
    else:
        layers = allocator.layer_configs(model, config, list(shapes))
    return sum(module_class.num_params(i, o, layers[path]) for path, (i, o) in shapes.items())


def default_budget(model: nn.Module, targets: tuple[str, ...], trainable: tuple[str, ...]) -> int:
    """LoRA's parameter count at rank 8 on ``targets``: the budget when none is given."""
    method, rank = DEFAULT_BUDGET
    config = registry.make_config(method, rank=rank, targets=targets, trainable=trainable)
    return count(config, layer_shapes(model, config))


def size_to_budget(
    model: nn.Module,
    method: str,
    budget: int,
    *,
    targets: tuple[str, ...],
    trainable: tuple[str, ...] = (),
    tolerance: float = TOLERANCE,
) -> Sizing:
    """The config of ``method`` on ``targets`` whose parameter count is nearest ``budget``.

    ``model`` is read, never changed.

    Raises:
        ValueError: no value of the size knob (or, without a knob, the default config) fits the
            target layers; the message gives the last layer's complaint.
        TypeError: a target layer is of a kind the method does not support.
    """
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1")
    default = registry.make_config(method, targets=targets, trainable=trainable)
    shapes = layer_shapes(model, default)
    knob = type(default).size_knob
    candidates: list[tuple[int | None, AdapterConfig]] = []
    if knob is None:
        candidates.append((None, default))
    else:
        for setting in range(1, max(max(shape) for shape in shapes.values()) + 1):
            size: dict[str, Any] = {knob: setting}
            try:
                candidates.append((setting, dataclasses.replace(default, **size)))
            except ValueError:  # outside the field's range, e.g. a knob with a lower bound above 1
                continue
    counted = []
    for value, config in candidates:
        try:
            counted.append((abs(count(config, shapes, model) - budget), value, config))
        except ValueError:  # num_params refuses this layer shape at this value
            continue
    counted.sort(key=lambda item: (item[0], item[1] or 0))
    error: ValueError | None = None
    for _, value, config in counted:
        try:
            for path in shapes:
                build(model, path, config)
        except ValueError as refused:
            error = refused
            continue
        params = count(config, shapes, model)
        return Sizing(config, value, params, budget, within_budget(params, budget, tolerance))
    raise ValueError(f"{method}: no {knob or 'default'} setting fits the target layers ({error})")
