"""The transformers ``Trainer`` driving a rank allocator: ``RankAllocationCallback``.

    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=args.max_steps, budget=...)
    trainer = transformers.Trainer(model=model, args=args, ..., callbacks=[RankAllocationCallback(alloc)])

Imports transformers, an optional dependency (``pip install rankwise[hf]``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .allocate.base import RankAllocator
from .core.distributed import world_size


class RankAllocationCallback(TrainerCallback):
    """Calls ``allocator.step(optimizer)`` at every optimizer step and adds ``allocator.penalty()``
    to the model's loss.

    The step runs in ``on_optimizer_step``: after ``optimizer.step()``, before ``zero_grad()``, so
    the gradients are still there (``on_step_end`` would see them zeroed). Set the allocator's
    ``total_steps`` to the Trainer's number of optimizer steps (``max_steps``, or epochs × steps
    per epoch after gradient accumulation).

    The penalty is added in a forward hook to the ``loss`` the model returns while training (as
    PEFT adds AdaLoRA's): with gradient accumulation it is added once per micro-batch.

    Args:
        allocator: any rank allocator, built on the model the Trainer trains.
        add_penalty: add ``allocator.penalty()`` to the model's ``loss``. With ``False``, or a
            custom loss outside the model, add it yourself.

    Raises:
        ValueError: at the start of training, when the allocator has not run the Trainer's
            completed steps (a resumed run needs ``allocator.load_state_dict`` first); at a
            forward, when the model returns no ``loss`` to add the penalty to.
        RuntimeError: at the start of training, for an allocator that replaces parameters during
            training under more than one process: the Trainer cannot rebuild its DDP wrapper.
    """

    def __init__(self, allocator: RankAllocator, add_penalty: bool = True) -> None:
        self.allocator = allocator
        self.add_penalty = add_penalty
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        name = type(self.allocator).__name__
        if state.global_step != self.allocator.t:
            raise ValueError(
                f"{name} has run {self.allocator.t} steps, the Trainer {state.global_step}: when resuming, "
                "load the allocator's state_dict() saved with the checkpoint first"
            )
        if self.allocator.reshapes_during_training and world_size() > 1:
            raise RuntimeError(
                f"{name} replaces parameters during training, and the Trainer cannot rebuild its DDP "
                "wrapper; use a training loop that re-wraps the model when allocator.step() returns True"
            )
        if self.add_penalty and self.allocator.has_penalty:
            self._hook = self.allocator.model.register_forward_hook(self._add_penalty)

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is None:
            raise ValueError("RankAllocationCallback: the Trainer passed no optimizer to on_optimizer_step")
        self.allocator.step(optimizer)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _add_penalty(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not module.training:
            return output
        if not isinstance(output, dict) or output.get("loss") is None:
            raise ValueError(
                f"{type(self.allocator).__name__}'s penalty needs the model to return a loss (pass labels); "
                "with a custom loss use RankAllocationCallback(allocator, add_penalty=False) and add "
                "allocator.penalty() to it"
            )
        output["loss"] = output["loss"] + self.allocator.penalty()
        return output
