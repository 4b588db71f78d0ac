"""The two shapes an adapter's mathematics can take.

* :class:`Delta` is additive: ``y = base(x) + delta(x)`` with an explicit ``ΔW`` (LoRA, C3A, ...).
* :class:`Reparam` re-parameterizes the weight: ``W' = f(W0, θ)`` (DoRA, BoRA), and computes the
  whole output itself from the frozen ``W0``.
* :class:`OutputAdapter` transforms the layer's output, ``y = g(base(x))`` (SURM's adapter form,
  ``h + σ(M h) + β``); it is not linear in x, so it has no merged weight.

Both see the base layer as ``y = x W0ᵀ + b`` with ``W0`` of shape (out_features, in_features) and
``x`` of shape (..., in_features); :mod:`rankwise.core.geometry` maps Conv1D and Conv2d onto that.
A method supplies the mathematics only: :class:`~rankwise.core.adapted.Adapted` owns freezing,
merging, the merged flag and layouts.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from .capabilities import AllocatorFactory, Initializer
from .config import AdapterConfig
from .geometry import BaseKind
from .precision import apply_in, compute_dtype

# What a merge must remember to be undone, beyond the parameters: e.g. the row norms a method
# divided by at merge time. ``None`` where the parameters alone invert the merge.
MergeState = Tensor | tuple[Tensor, ...] | None

# The method's own config class: a module takes, keeps and sizes itself from its method's config
# only (the registry pairs the two), e.g. ``class LoRA(Delta[LoRAConfig])``.
ConfigT = TypeVar("ConfigT", bound=AdapterConfig)


class Adapter(nn.Module, abc.ABC, Generic[ConfigT]):
    """What every method module declares.

    Subclasses are built as ``cls(w0, config)``: ``w0`` is the frozen base weight as an
    (out_features, in_features) matrix, passed so that a method can read its shape or derive its
    initialization from it (DoRA's magnitude, LoLDU's factors). A module must not keep ``w0``.
    """

    config_class: ClassVar[type[AdapterConfig]]  # set by the registry
    supported_bases: ClassVar[frozenset[BaseKind]] = frozenset({"linear", "conv1d", "conv2d"})
    identity_at_init: ClassVar[bool] = True  # step 0 reproduces the base model exactly
    mergeable: ClassVar[bool] = True  # has an explicit merged weight
    spatial_conv: ClassVar[bool] = True  # accepts k × k convolutions, not only 1 × 1 ("conv2d" bases)
    # The rank allocator that trains this method; without it the adapter keeps its initial ranks.
    # Set by the allocator's module (allocate imports adapters, not the other way).
    allocator: ClassVar[AllocatorFactory | None] = None
    # A start computed from data before training (new ranks and values); set like ``allocator``.
    initializer: ClassVar[Initializer | None] = None
    # Backward can itself be differentiated (``create_graph=True``: gradient penalties,
    # Hessian-vector products); False where it is once-differentiable, and differentiating it raises.
    double_backward: ClassVar[bool] = True
    # Gradients are the derivatives of forward; False where backward holds part of forward
    # constant by design (DoRA's detached norm), so a numerical gradient check does not apply.
    exact_gradients: ClassVar[bool] = True
    # Overrides of the config's defaults that give a small config for tests on narrow layers (any
    # width from 4 up that is a multiple of 4); the defaults are sized for real models.
    example_config: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, w0: Tensor, config: ConfigT) -> None:
        super().__init__()
        self.config = config
        self.out_features, self.in_features = w0.shape

    @classmethod
    @abc.abstractmethod
    def num_params(cls, in_features: int, out_features: int, config: ConfigT) -> int:
        """Trainable parameters of this method on an (out_features, in_features) layer."""
        ...

    @classmethod
    def for_run(cls, config: ConfigT, steps: int) -> ConfigT:
        """``config`` as a training run of ``steps`` optimizer steps should use it: a method with
        a schedule measured in steps (a :class:`~rankwise.core.steps.Stepped` ramp) fits it to the
        run; the others return ``config`` unchanged."""
        return config

    @abc.abstractmethod
    def merged_weight(self, w0: Tensor) -> Tensor:
        """The adapted weight ``W'`` as an (out, in) matrix, given the base weight ``w0``. A query:
        the module is left as it was."""
        ...

    def merged_with_state(self, w0: Tensor) -> tuple[Tensor, MergeState]:
        """``W'`` and what :meth:`restore_weight` will need to invert it (:data:`MergeState`).

        Also a query: the state is returned, not kept. :class:`~rankwise.core.adapted.Adapted`
        holds it from merge to unmerge, the only two places that touch it, so asking for
        :meth:`merged_weight` never changes what an unmerge writes back.
        """
        return self.merged_weight(w0), None

    @abc.abstractmethod
    def restore_weight(self, merged: Tensor, state: MergeState) -> Tensor:
        """Inverse of :meth:`merged_with_state`: the base weight back from the merged one and the
        state that merge returned."""
        ...

    @classmethod
    def combined(cls, parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
        """A new adapter of this method on the same layer whose update is the weighted sum of the
        parts' updates, ``W' − W0 = Σ_i w_i (W'_i − W0)``, exactly, in this method's own parameters
        (``rankwise.combine``). A method declares that it has such a form by overriding this; the
        default has none.

        Args:
            parts: ``(w_i, adapter_i)``, adapters of this class built for this layer.
            w0: the layer's base weight as an (out, in) matrix, as for the constructor.

        Raises:
            TypeError: the method has no exact combination (the message says what works instead).
            ValueError: these parts cannot be combined exactly (different fixed parts, e.g. block
                sizes); the message says which.
        """
        raise TypeError(
            f"{cls.__name__} has no exact combination in its parameters (its update is not linear in them); "
            "merge the adapters instead (rankwise.set_active(model, names), rankwise.merge(model)), which writes "
            "the sum of their updates into the base weight, or keep them active together"
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


AdapterT = TypeVar("AdapterT", bound=Adapter[Any])


def as_method(cls: type[AdapterT], adapter: Adapter[Any]) -> AdapterT:
    """``adapter`` typed as ``cls``: a part given to ``cls.combined`` (:meth:`Adapter.combined`)."""
    assert isinstance(adapter, cls)  # rankwise.combine passes adapters of one method only
    return adapter


def check_configs_agree(
    cls: type[Adapter[Any]], parts: Sequence[tuple[float, Adapter[Any]]], folded: Collection[str] = ()
) -> None:
    """Refuse parts of :meth:`Adapter.combined` whose configs differ in a field the combination
    cannot hold per part: every field but ``targets`` and ``trainable`` (where each applies is the
    caller's concern) and ``folded``, those ``cls.combined`` folds into the new adapter's parameters
    (LoRA's rank and scale). The new adapter takes the first part's config, so another field (a
    dropout, say) would otherwise silently be the first part's for all of them.

    Raises:
        ValueError: the configs differ in such a field (the message names the fields).
    """
    first = parts[0][1].config
    own = {"targets", "trainable", *folded}
    for _, other in parts[1:]:
        differ = [
            f.name
            for f in dataclasses.fields(first)
            if f.name not in own and getattr(other.config, f.name) != getattr(first, f.name)
        ]
        if differ:
            raise ValueError(
                f"{cls.__name__}: the adapters' configs differ in {differ} ({first} and {other.config}), which one "
                "adapter cannot hold for each part; merge them instead (rankwise.set_active(model, names), "
                "rankwise.merge(model))"
            )


def summed_parameters(cls: type[Adapter[Any]], parts: Sequence[tuple[float, Adapter[Any]]], w0: Tensor) -> Adapter[Any]:
    """``cls(w0, config)`` with every parameter ``Σ_i w_i p_i``: the exact combination
    (:meth:`Adapter.combined`) of a method whose update is linear in its parameters, for parts
    that agree on everything else (config and buffers), which is checked.

    Raises:
        ValueError: the parts' configs or buffers differ (the message names them).
    """
    check_configs_agree(cls, parts)
    (_, first), *rest = parts
    for _, other in rest:
        buffers = dict(other.named_buffers())
        differ = [k for k, v in first.named_buffers() if not torch.equal(v, buffers[k])]
        if differ:
            raise ValueError(f"{cls.__name__}: the adapters' fixed parts {differ} differ")
    new = cls(w0, first.config).to(device=w0.device, dtype=next(first.parameters()).dtype)
    with torch.no_grad():
        for key, target in new.named_parameters():
            target.copy_(torch.stack([weight * adapter.get_parameter(key) for weight, adapter in parts]).sum(0))
        for key, buffer in new.named_buffers():
            buffer.copy_(first.get_buffer(key))
    return new


def low_rank_product(hidden: Tensor, up: Tensor) -> Tensor:
    """``hidden @ up`` for hidden (..., r) and up (r, out): a factored method's up-projection, with
    its backward products in the fast orientation and no copy of ``up`` kept (:class:`_UpProjection`).
    ``up`` is typically a transposed view of a parameter, ``B.t()``."""
    return _up_project(None, hidden, up).view(*hidden.shape[:-1], up.shape[1])


def add_product(y: Tensor, hidden: Tensor, up: Tensor) -> Tensor:
    """``y + hidden @ up`` for y (..., out), hidden (..., r) and up (r, out), as one ``addmm`` over
    the flattened rows: the product accumulates into y's copy, with no full-size tensor for the
    branch and no separate add (a write and a read of y fewer). How the factored methods fuse
    :meth:`Delta.add_to`; ``up`` as in :func:`low_rank_product`."""
    return _up_project(y, hidden, up).view(y.shape)


def _up_project(y: Tensor | None, hidden: Tensor, up: Tensor) -> Tensor:
    """``[y +] hidden @ up`` over the flattened rows, shape (rows, out)."""
    # Both sizes given: with r = 0 (a pruned layer) a -1 could not be inferred.
    rows = hidden.shape[:-1].numel()
    flat_y = None if y is None else y.reshape(rows, up.shape[1])
    # Operands cast to one dtype (autocast's, if on): a backward run outside the autocast context
    # would otherwise multiply a bf16 gradient by the fp32 ``up`` (rankwise.core.precision).
    return apply_in(compute_dtype(hidden), _UpProjection.apply, flat_y, hidden.reshape(rows, up.shape[0]), up)


class _UpProjection(torch.autograd.Function):
    """``[y +] hidden @ up`` for hidden (rows, r) and up (r, out), with ``up`` read as a contiguous
    (r, out) matrix in forward and backward but not kept as one.

    Why: autograd picks the orientation of a product's backward from its operands' layout. With
    ``up = Bᵀ`` a transposed view of B (out, r), it forms ``grad_up`` as ``gradᵀ · hidden`` and
    ``grad_hidden`` as ``grad · B`` with B row-major, shapes MKL runs 10× and 2–3× slower than
    ``hiddenᵀ · grad`` and ``grad · upᵀ`` on a contiguous up, at rank 8 (1024 × 1024 layer, 1024
    tokens, one thread; each reads a full activation). A contiguous copy passed to a plain
    ``addmm`` would fix the orientation but stay saved for backward (r × out numbers per layer,
    1–5 MB over PEFT on docs/performance.md's workloads); here only the view is saved and the copy
    is made again in backward. Backward is made of differentiable operations on saved inputs, so
    double backward works.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor | None, hidden: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(hidden, up)
        up = up.contiguous()
        return hidden @ up if y is None else torch.addmm(y, hidden, up)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, up = ctx.saved_tensors
        needs_y, needs_hidden, needs_up = ctx.needs_input_grad
        grad_hidden = grad @ up.contiguous().t() if needs_hidden else None
        grad_up = hidden.t() @ grad if needs_up else None
        return grad if needs_y else None, grad_hidden, grad_up


class Delta(Adapter[ConfigT]):
    """An additive adapter: ``y = x W0ᵀ + b + delta(x)`` and ``W' = W0 + ΔW``."""

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """The factored path: ``x ΔWᵀ`` for x of shape (..., in_features), without forming ΔW."""
        ...

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """``y + x ΔWᵀ`` for the base output ``y``; a method may fuse the sum into its last matmul
        (:func:`add_product`)."""
        return y + self(x)

    @abc.abstractmethod
    def delta_weight(self) -> Tensor:
        """The explicit ``ΔW``, shape (out_features, in_features)."""
        ...

    def merged_weight(self, w0: Tensor) -> Tensor:
        return w0 + self.delta_weight().to(w0.dtype)

    def restore_weight(self, merged: Tensor, state: MergeState) -> Tensor:
        return merged - self.delta_weight().to(merged.dtype)


class Reparam(Adapter[ConfigT]):
    """A re-parameterized weight ``W' = f(W0, θ)``; the module computes the whole output."""

    @abc.abstractmethod
    def forward(self, x: Tensor, w0: Tensor) -> Tensor:
        """``x W'ᵀ`` without the bias, for x of shape (..., in_features) and ``w0`` (out, in)."""
        ...

    def output(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor:
        """``x W'ᵀ + b``; a method may fuse the bias into its last operation (one full-size pass
        fewer), as :meth:`Delta.add_to` fuses the residual sum."""
        y = self(x, w0)
        return y if bias is None else y + bias


class OutputAdapter(Adapter[ConfigT]):
    """A function of the base layer's output: ``y = g(base(x))``, applied to (..., out_features)."""

    mergeable = False

    def merged_weight(self, w0: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no merged weight: its forward is not linear in x")

    def restore_weight(self, merged: Tensor, state: MergeState) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no merged weight: its forward is not linear in x")

    @abc.abstractmethod
    def forward(self, h: Tensor) -> Tensor:
        """The adapted output for the base output ``h`` of shape (..., out_features)."""
        ...
