"""The optimizer step count, for modules whose forward depends on it (SingLoRA's ramp u(t)).

A module that depends on the number of optimizer steps taken declares it by subclassing
:class:`Stepped` and implementing :meth:`Stepped.advance`. The library advances every such module
once per optimizer step, either explicitly or through a hook on the optimizer::

    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    rw.step_with(optimizer, model)  # once: every optimizer.step() now advances the adapters
    ...
    rw.step(model)                  # or by hand, after each optimizer step, in a loop you own

Forward and backward calls never advance the count, so gradient accumulation, evaluation and
activation recomputation leave it unchanged, and a step that ``GradScaler`` skips (inf/NaN
gradients, ``optimizer.step()`` not called) is not counted either. An inactive named adapter
(:func:`rankwise.set_active`) does not train, so its count stays too.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .adapted import Adapted


class Stepped(abc.ABC):
    """A module whose forward depends on the number of optimizer steps taken.

    The module keeps its own count (a persistent buffer, so that checkpoints carry it) and says
    how one step changes it; :func:`step` finds it by this type, never by a name.
    """

    @abc.abstractmethod
    def advance(self) -> None:
        """Count one optimizer step."""
        ...


def step(model: nn.Module) -> int:
    """Advance every :class:`Stepped` module of ``model`` by one optimizer step, except those
    inside an inactive named adapter.

    Call it once after each ``optimizer.step()`` (or let :func:`step_with` do so). A module
    reachable along two paths is advanced once.

    Returns:
        How many modules were advanced (0 for a model whose adapters ignore the step, e.g. LoRA).
    """
    # An inactive adapter takes no optimizer step: counting steps for it would ramp in an adapter
    # added for later (SingLoRA's u(t) > 0 with its random A), so it would not start from the base
    # model once activated, and one trained before would resume further along its ramp.
    resting = {
        id(module)
        for layer in model.modules()
        if isinstance(layer, Adapted)
        for name, adapter in layer.adapters.items()
        if name not in layer.active
        for module in adapter.modules()
    }
    stepped = [module for module in model.modules() if isinstance(module, Stepped) and id(module) not in resting]
    for module in stepped:
        module.advance()
    return len(stepped)


def step_with(optimizer: Optimizer, model: nn.Module) -> RemovableHandle:
    """Advance ``model``'s step-dependent modules after every ``optimizer.step()``.

    Uses ``Optimizer.register_step_post_hook``. Register once per model: two hooks (or a hook and
    a manual :func:`step`) count every step twice.

    Returns:
        The hook's handle; ``handle.remove()`` stops it.
    """

    def advance(_optimizer: Optimizer, _args: tuple[Any, ...], _kwargs: dict[str, Any]) -> None:
        step(model)

    return optimizer.register_step_post_hook(advance)
