"""Compute a transformer's frozen lower blocks once per example, not once per step.

When every trainable parameter and adapter sits in the upper blocks (the ``friends`` task adapts
layers 22 to 29 of 30), the lower blocks compute the same thing for an example in every step of
every run: their weights are frozen and, in eval mode as in training, nothing in them is random.
:class:`FrozenLayersCache` keeps, per example, the input of the first block that trains, and a
model attached to it starts its forward there: the blocks below are replaced by a pass-through,
and the cached states enter as ``inputs_embeds``. The forward and backward through the upper
blocks are unchanged, so the losses are those of the uncached run (to fp32 rounding).

It serves transformers decoders called as ``model(input_ids=...)`` (the language-model tasks),
and checks, on the model it is given, everything the shortcut relies on; :meth:`refusal` says
which check failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.adapted import Adapted

if TYPE_CHECKING:
    from .tasks import Task

SPLITS = ("train", "val", "test")
# The model run from cached states must reproduce the full model's logits this closely (fp32).
RTOL, ATOL = 1e-5, 1e-5


class _Skipped(nn.Module):
    """Stands in for a frozen block below the cached one: hands the hidden states on unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class _Captured(Exception):
    """Ends a forward pass once the input of the cached block is captured: the blocks above it
    and the output layer need not run to fill the cache."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the one ``nn.ModuleList`` with
    ``config.num_hidden_layers`` entries.

    Raises:
        ValueError: the model has no such config, or not exactly one such list.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and count and len(m) == count]
    if len(stacks) != 1:
        raise ValueError(f"found {len(stacks)} lists of config.num_hidden_layers={count} blocks; need one")
    return stacks[0]


def _first_trained(blocks: nn.ModuleList) -> int | None:
    for index, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()) or any(isinstance(m, Adapted) for m in block.modules()):
            return index
    return None


def _key(start: int, ids: Tensor) -> tuple[int, bytes]:
    return start, ids.cpu().numpy().tobytes()


@contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag on exit (a task may keep some layers in eval mode)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _capturing(block: nn.Module, stop: bool) -> Iterator[list[Tensor]]:
    """The hidden states entering ``block`` in the forward passes inside the block; with ``stop``
    each pass ends there (:class:`_Captured` is raised, and caught by the caller)."""
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        if stop:
            raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class FrozenLayersCache:
    """The input of a model's first trained block, per example, computed once and reused by every
    step and every run of a task that the checks allow.

    Keyed by the example itself (its token ids) and by the block, so runs that train from another
    block do not share entries. Nothing invalidates an entry: the blocks below are frozen.
    """

    def __init__(self) -> None:
        self._states: dict[tuple[int, bytes], Tensor] = {}

    def __len__(self) -> int:
        return len(self._states)

    def refusal(self, model: nn.Module, task: Task, device: torch.device) -> str | None:
        """Why ``model`` cannot run from the cache, or ``None`` when it can.

        It can when: the model has one stack of blocks; the first block that trains (a parameter
        that requires grad, or an adapter) is not the first; nothing that runs before that block
        trains; in training mode (``task.train_mode``) the block's input is what it is in eval
        mode (no dropout below it); and run from that input with the blocks below skipped, the
        model's logits equal the full model's. Checked on one training example; the model and
        the random number generators are left as they were.
        """
        plan = self._plan(model, task, device)
        return plan if isinstance(plan, str) else None

    def _plan(self, model: nn.Module, task: Task, device: torch.device) -> tuple[nn.ModuleList, int] | str:
        """The model's blocks and the index of the first that trains, or why it cannot be cached."""
        try:
            blocks = decoder_blocks(model)
        except ValueError as error:
            return str(error)
        start = _first_trained(blocks)
        if start is None:
            return "no block trains"
        if start == 0:
            return "block 0 trains: no frozen block below it"
        example = task.batch("train", torch.arange(1), device)["input_ids"]
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with rng, _modes_kept(model), torch.no_grad():
            reason = self._check(model, task, blocks, start, example)
        return (blocks, start) if reason is None else reason

    def _check(self, model: nn.Module, task: Task, blocks: nn.ModuleList, start: int, example: Tensor) -> str | None:
        order: list[nn.Module] = []
        handles = [m.register_forward_pre_hook(lambda module, args: order.append(module)) for m in model.modules()]
        model.eval()
        try:
            with _capturing(blocks[start], stop=False) as states:
                logits = model(input_ids=example).logits
        finally:
            for handle in handles:
                handle.remove()
        containing = {m for m in model.modules() if any(inner is blocks[start] for inner in m.modules())}
        below = [m for m in order[: order.index(blocks[start])] if m not in containing]
        if any(p.requires_grad for m in below for p in m.parameters()):
            return f"a module that runs before block {start} trains"
        task.train_mode(model)
        for seed in (1, 2):
            torch.manual_seed(seed)
            with _capturing(blocks[start], stop=True) as again, suppress(_Captured):
                model(input_ids=example)
            if not torch.equal(again[0], states[0]):
                return f"the blocks below block {start} are random in training mode (dropout)"
        model.eval()
        lower = [blocks[i] for i in range(start)]
        for i in range(start):
            blocks[i] = _Skipped()
        try:
            shortcut = model(inputs_embeds=states[0]).logits
        except Exception as error:  # the model's own code, run in a way it may not allow: any failure refuses
            return f"run from the input of block {start}, the model fails ({type(error).__name__}: {error})"
        finally:
            for i, block in enumerate(lower):
                blocks[i] = block
        if not torch.allclose(shortcut, logits, rtol=RTOL, atol=ATOL):
            return (
                f"run from the input of block {start}, the model does not reproduce its logits (it adds "
                "something to inputs_embeds before the blocks, such as position embeddings)"
            )
        return None

    def attach(self, model: nn.Module, task: Task, device: torch.device) -> nn.Module:
        """Fill the cache for every example of ``task``'s splits (those not there yet, computed by
        ``model`` in eval mode), then make ``model`` run from it: its blocks below the first
        trained one become pass-throughs, and a call ``model(input_ids=...)`` enters there with
        the cached states. Returns ``model``, changed in place.

        Raises:
            ValueError: :meth:`refusal` gives a reason.
        """
        plan = self._plan(model, task, device)
        if isinstance(plan, str):
            raise ValueError(f"the frozen-layer cache cannot serve this model: {plan}")
        blocks, start = plan
        with _modes_kept(model), torch.no_grad():
            model.eval()
            for split in SPLITS:
                for batch in task.eval_batches(split, device):
                    missing = [ids for ids in batch["input_ids"] if _key(start, ids) not in self._states]
                    if not missing:
                        continue
                    with _capturing(blocks[start], stop=True) as states, suppress(_Captured):
                        model(input_ids=torch.stack(missing))
                    for ids, state in zip(missing, states[0], strict=True):
                        self._states[_key(start, ids)] = state
        for i in range(start):
            blocks[i] = _Skipped()
        model.register_forward_pre_hook(self._entering(start), with_kwargs=True)
        return model

    def _entering(self, start: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if "input_ids" in kwargs:
                ids = kwargs.pop("input_ids")
            else:
                ids, args = args[0], args[1:]
            try:
                states = [self._states[_key(start, row)] for row in ids]
            except KeyError:
                raise ValueError(
                    "an example outside the task's splits reached a model run from the frozen-layer "
                    "cache; only the examples filled at attach are cached"
                ) from None
            kwargs["inputs_embeds"] = torch.stack(states)
            return args, kwargs

        return hook
