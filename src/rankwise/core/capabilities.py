"""What a method may declare beyond its mathematics, as interfaces tools read instead of names.

A method's module class (:class:`rankwise.core.delta.Adapter`) declares, as class variables and
one class method:

* ``allocator``: the rank allocator that trains it (an :class:`AllocatorFactory`), or ``None``;
* ``initializer``: a data-driven start run once before training (an :class:`Initializer`), or ``None``;
* ``for_run(config, steps)``: its config for a run of ``steps`` optimizer steps (a per-step schedule);
* ``double_backward`` and ``exact_gradients``: what second derivatives and gradient checks may expect;
* ``example_config``: a small config for tests.

An adapter whose update is a trainable low-rank pair satisfies :class:`Factored`; one that adapts
an ``nn.Embedding`` (``"embedding"`` in its ``supported_bases``) satisfies :class:`EmbeddingAdapter`. The benchmark, the
optimizers and the tests read these; none of them names a method. Like torchtune's
``AdapterModule``, the interfaces are ``Protocol``s: anything with the right shape satisfies them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.optim import Optimizer

from .config import AdapterConfig


@runtime_checkable
class Factored(Protocol):
    """An adapter whose trainable update is a low-rank pair ``(A, B)`` with a scale ``s``.

    ``factors()`` returns ``(A, B, s)``, A of shape (rank, in_features) and B (out_features, rank):
    ``s · B A`` is the low-rank term the method adds to ``W0`` before anything else it does. For an
    additive method it is the whole update (``ΔW = s · B A``); for a method that then rescales the
    sum (DoRA's magnitude times the direction ``V = W0 + s · B A``) it is the update of that sum,
    and the adapted weight is not ``W0 + s · B A``. The gradients of A and B are then those of the
    sum, which is what optimizers that step the pair jointly (LoRA-Pro, LoRA+) work from.
    """

    def factors(self) -> tuple[nn.Parameter, nn.Parameter, float]: ...


@runtime_checkable
class EmbeddingAdapter(Protocol):
    """An adapter on an ``nn.Embedding``, seen as the (dim, num_embeddings) matrix ``W0 = weightᵀ``
    whose input is a one-hot token (:mod:`rankwise.core.geometry`).

    ``embed(ids, rows, base)`` is the adapted lookup: ``rows`` is the base's output ``W0ᵀ[ids]``,
    shape (..., dim), and the result is ``W'ᵀ[ids]``, computed from the rows of the method's factors
    for ``ids`` (:func:`rankwise.core.geometry.embedding_columns`, which keeps the embedding's
    ``padding_idx`` and ``scale_grad_by_freq``), never from ΔW. ``reset_for_embedding(padding_idx)``
    re-initializes a freshly built module for a one-hot input; it keeps step 0 the base model, and
    the padding token's column of the input-side factor starts at zero, so (getting no gradient)
    the padding token's update stays zero.
    """

    def embed(self, ids: Tensor, rows: Tensor, base: nn.Module) -> Tensor: ...

    def reset_for_embedding(self, padding_idx: int | None) -> None: ...


class Allocator(Protocol):
    """A rank allocator as a training loop drives it: after each ``optimizer.step()`` and before
    ``zero_grad()``, ``step(optimizer)``; ``penalty()`` added to the loss where ``has_penalty``."""

    @property
    def has_penalty(self) -> bool: ...

    def penalty(self) -> Tensor: ...

    def step(self, optimizer: Optimizer) -> bool:
        """Apply this step's decisions; True when parameters were replaced (ranks changed shape)."""
        ...


class AllocatorFactory(Protocol):
    """Builds the allocator for an adapted model and a run of ``total_steps`` optimizer steps (a
    :class:`rankwise.allocate.RankAllocator` subclass is one)."""

    def __call__(self, model: nn.Module, *, total_steps: int) -> Allocator: ...

    def layer_configs(self, model: nn.Module, config: AdapterConfig, paths: Sequence[str]) -> dict[str, AdapterConfig]:
        """Each target layer's config as the allocator, built on ``model`` with its defaults, sets
        it (ARD-LoRA gives attention projections one α per head): what a parameter budget counts."""
        ...


class Initializer(Protocol):
    """A one-off start from data, run on a freshly adapted model before the optimizer is built: it
    reads the gradients of ``loss_fn(model, batch)`` over ``batches`` and may replace the adapters
    (new ranks, new values). With its defaults it keeps the parameter count of the config the model
    was adapted with, so a config sized to a budget stays at that budget (GoRA warns where its
    smallest rank pushes the count over)."""

    def __call__(
        self, model: nn.Module, batches: Iterable[Any], *, loss_fn: Callable[[nn.Module, Any], Tensor], seed: int
    ) -> object: ...
