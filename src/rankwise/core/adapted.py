"""``Adapted``: the one wrapper around a base layer and its adapter."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from . import geometry, quantized
from .capabilities import EmbeddingAdapter
from .config import AdapterConfig
from .delta import Adapter, Delta, MergeState, OutputAdapter, Reparam
from .geometry import BaseKind
from .precision import at_least_fp32

AdapterT = TypeVar("AdapterT", bound=Adapter)

DEFAULT = "default"  # the name of the adapter that one-adapter calls (``rw.adapt(model, config)``) make


class Adapted(nn.Module, Generic[AdapterT]):
    """A frozen base layer (child ``base``) plus named adapters (child ``adapters``, a ``ModuleDict``).

    The only place that merges, unmerges and maps layouts; the adapters supply the mathematics. A
    layer holds one or more adapters by name, each with the config it was added with, and runs the
    ``active`` ones: several active adapters add their effects as PEFT's do,
    ``y = base(x) + Σ_i (f_i(x) − base(x))`` with ``f_i`` the layer's output with adapter ``i`` alone
    (for an additive method ``f_i(x) − base(x)`` is its ``x ΔWᵀ``). Inactive adapters cost nothing
    in forward, and their parameters do not require grad.

    With one adapter active, ``delta`` and ``config`` are that adapter and its config, which is how
    code that knows one adapter per layer (allocators, optimizers) reads it.

    Args:
        base: the layer being adapted; its parameters are frozen by :func:`rankwise.adapt`.
        delta: the method's module, built for this layer.
        kind: the base's layout, from :func:`rankwise.core.geometry.base_kind`.
        config: the config given to :func:`rankwise.adapt`; ``delta.config`` may differ from it
            where a rank allocator resized this layer.
        name: the adapter's name.
        active: whether it starts active.
    """

    def __init__(
        self,
        base: nn.Module,
        delta: AdapterT,
        kind: BaseKind,
        config: AdapterConfig,
        name: str = DEFAULT,
        active: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig] = {}
        self.active: tuple[str, ...] = ()
        self.merged = False
        self.disabled = False
        # Set by rankwise.per_example for the length of its block: the batch size and, per adapter
        # name this layer holds, the rows that use it.
        self.rows: tuple[int, dict[str, Tensor]] | None = None
        # The adapters merged, in order, and what unmerge needs: the adapter's own MergeState
        # (Adapter.merged_with_state) when one was merged; a copy of the base weight when several
        # were: each W'_i is computed from W0, and an adapter's inverse undoes its own W' only, not
        # a sum with others (a Reparam's needs W0 itself). Set by merge, cleared by unmerge, read
        # by nothing else.
        self.merged_names: tuple[str, ...] = ()
        self._merge_state: MergeState = None
        # The merged adapters' parameters when they were merged, by adapter name: unmerge refuses if
        # they changed since, because the base weight holds the ΔW of these values, not of the new ones.
        self.merged_adapters: dict[str, dict[str, Tensor]] | None = None
        self.add(name, delta, config, active=active)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, so code that reads ``layer.weight`` (dtype, device) still works."""
        return geometry.layer_weight(self.base)

    @property
    def delta(self) -> AdapterT:
        """The one active adapter.

        Raises:
            ValueError: if several adapters or none are active (read ``adapters[name]`` then).
        """
        return cast(AdapterT, self.adapters[self._only_active("delta")])

    @property
    def config(self) -> AdapterConfig:
        """The config the one active adapter was added with (raises as :attr:`delta`)."""
        return self.configs[self._only_active("config")]

    @property
    def merged_adapter(self) -> dict[str, Tensor] | None:
        """The merged adapter's parameters at merge time where one adapter is merged (see
        ``merged_adapters``); ``None`` while unmerged.

        Raises:
            ValueError: several adapters are merged (read ``merged_adapters[name]``).
        """
        if self.merged_adapters is None:
            return None
        if len(self.merged_adapters) != 1:
            raise ValueError(
                f"adapters {list(self.merged_adapters)} are merged; read layer.merged_adapters[name] for one of them"
            )
        return next(iter(self.merged_adapters.values()))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A state dict saved before adapters were named keeps a layer's one adapter under "delta."
        # (a transformers Trainer checkpoint, say): it loads into a layer that holds one adapter.
        old = f"{prefix}delta."
        if len(self.adapters) == 1:
            new = f"{prefix}adapters.{next(iter(self.adapters))}."
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[new + key.removeprefix(old)] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapter(self, name: str) -> Adapter:
        """The adapter ``name`` (``adapters[name]``, typed)."""
        return cast(Adapter, self.adapters[name])

    def _only_active(self, what: str) -> str:
        if len(self.active) != 1:
            state = f"adapters {list(self.active)} are active" if self.active else "no adapter is active"
            raise ValueError(
                f"layer.{what} is the one active adapter's, but {state} (held: {list(self.adapters)}); "
                f"read layer.adapters[name] / layer.configs[name], or rankwise.set_active(model, name) first"
            )
        return self.active[0]

    def add(self, name: str, adapter: Adapter, config: AdapterConfig, active: bool) -> None:
        """Hold ``adapter`` under ``name``; an inactive one has its parameters frozen.

        Raises:
            ValueError: ``name`` is held already.
        """
        if name in self.adapters:
            raise ValueError(f"this layer already holds an adapter named {name!r}")
        self.adapters[name] = adapter
        self.configs[name] = config
        if active:
            self.active = (*self.active, name)
        else:
            adapter.requires_grad_(False)

    def remove(self, name: str) -> None:
        """Drop the adapter ``name`` (the model-level checks are :func:`rankwise.delete_adapter`'s)."""
        assert not self.merged and name in self.adapters  # checked by delete_adapter
        del self.adapters[name]
        del self.configs[name]
        self.active = tuple(n for n in self.active if n != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        """Run ``names`` (those this layer holds, in that order); only their parameters require grad."""
        assert not self.merged  # checked by rankwise.set_active
        self.active = tuple(n for n in names if n in self.adapters)
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in self.active)

    def replace_delta(self, adapter: AdapterT) -> None:
        """Put ``adapter`` in place of the one active adapter (an allocator's new ranks or layout)."""
        self.adapters[self._only_active("delta")] = adapter

    def view(self, name: str) -> Adapted[Any]:
        """A wrapper around the same base and the same adapter module ``name``, that adapter alone
        active, not installed anywhere: what code that reads one adapter per layer (checkpoints,
        PEFT export) reads. Nothing is copied or changed. The view is unmerged even where this
        layer is merged: read the base weight as it was (:meth:`restored_weight`) from this layer."""
        return Adapted(self.base, self.adapter(name), self.kind, self.configs[name], name)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            y = self.base(x)
            if self.merged and self.training and torch.is_grad_enabled():
                merged = [self.adapter(n) for n in self.merged_names]
                trainable = next((p for a in merged for p in a.parameters() if p.requires_grad), None)
                if trainable is not None:  # a training step would leave the adapter without a gradient
                    method = "+".join(self.configs[n].method for n in self.merged_names)
                    y = y + _NoGradientWhileMerged.apply(trainable, method)
            return y
        if self.rows is not None:
            return self._forward_per_example(x, *self.rows)
        if len(self.active) == 1:
            return self._forward_one(self.adapter(self.active[0]), x)
        # Several (or no) adapters: the base output once, then each adapter's difference to it.
        h = self.base(x)
        y = h
        for name in self.active:
            y = y + self._difference(self.adapter(name), x, h)
        return y

    def _forward_one(self, adapter: Adapter, x: Tensor) -> Tensor:
        """The output with ``adapter`` alone, each shape on its own fused path."""
        adapter_dtype = _dtype(adapter)
        if isinstance(adapter, OutputAdapter):
            h = self.base(x)
            channels_last = h.movedim(1, -1) if self.kind == "conv2d" else h
            # The input's dtype, or for token ids (an embedding) the looked-up rows'.
            y = adapter(channels_last.to(adapter_dtype)).to(x.dtype if x.is_floating_point() else h.dtype)
            return y.movedim(-1, 1) if self.kind == "conv2d" else y
        if self.kind == "embedding":  # x holds token ids: the method looks up its own rows for them
            assert isinstance(adapter, EmbeddingAdapter)  # find_targets admits only methods declaring it
            y = self.base(x)
            return adapter.embed(x, y.to(adapter_dtype), self.base).to(y.dtype)
        features = geometry.to_features(x, self.base, self.kind).to(adapter_dtype)
        if isinstance(adapter, Delta):
            y = self.base(x)
            if self.kind != "conv2d" and y.dtype == adapter_dtype:
                return adapter.add_to(y, features)
            return y + geometry.from_features(adapter(features), x, self.base, self.kind).to(y.dtype)
        assert isinstance(adapter, Reparam)  # the third shape, after OutputAdapter and Delta
        if quantized.is_quantized(self.base):
            # The base's quantized forward is x Ŵ0ᵀ + b, Ŵ0 its dequantized weight: adding
            # x (W' − Ŵ0)ᵀ keeps step 0 equal to that forward, which x W'ᵀ + b from Ŵ0 would not be
            # (the kernel rounds otherwise: bitsandbytes' int8 activations, its bf16 CPU scales).
            h = self.base(x)
            return h + self._difference(adapter, x, h)
        w0 = geometry.weight_matrix(self.base, self.kind)
        bias = geometry.layer_bias(self.base)
        if bias is not None and bias.dtype == adapter_dtype == x.dtype:
            y = adapter.output(features, w0, bias)
        else:
            y = geometry.add_bias(adapter(features, w0).to(x.dtype), self.base)
        return geometry.from_features(y, x, self.base, self.kind)

    def _difference(self, adapter: Adapter, x: Tensor, h: Tensor) -> Tensor:
        """``f(x) − base(x)`` for ``adapter`` alone, given ``h = base(x)``, in the output's layout.

        For a Reparam method it is ``x W'ᵀ − x W0ᵀ`` (the bias cancels); for an output adapter
        ``g(h) − h``. Computed in the adapter's dtype, returned in the output's.
        """
        adapter_dtype = _dtype(adapter)
        if isinstance(adapter, OutputAdapter):
            channels_last = (h.movedim(1, -1) if self.kind == "conv2d" else h).to(adapter_dtype)
            d = (adapter(channels_last) - channels_last).to(h.dtype)
            return d.movedim(-1, 1) if self.kind == "conv2d" else d
        if self.kind == "embedding":  # token ids: the method's own lookup, less the base's rows
            assert isinstance(adapter, EmbeddingAdapter)  # find_targets admits only methods declaring it
            rows = h.to(adapter_dtype)
            return (adapter.embed(x, rows, self.base) - rows).to(h.dtype)
        features = geometry.to_features(x, self.base, self.kind).to(adapter_dtype)
        if isinstance(adapter, Delta):
            d = adapter(features)
        else:
            assert isinstance(adapter, Reparam)  # the third shape, after OutputAdapter and Delta
            w0 = geometry.weight_matrix(self.base, self.kind)
            d = adapter(features, w0) - features @ w0.to(adapter_dtype).t()
        return geometry.from_features(d, x, self.base, self.kind).to(h.dtype)

    def _forward_per_example(self, x: Tensor, batch: int, rows: dict[str, Tensor]) -> Tensor:
        """Each row of the batch with its own adapter: the base output for all, then, per adapter
        name in the batch (not per example), its difference on its rows, added at those rows."""
        if x.shape[0] != batch:
            raise ValueError(
                f"rankwise.per_example was given {batch} adapter names, but an adapted layer's input has "
                f"{x.shape[0]} rows in dim 0 (the batch); give one name (or None) per example"
            )
        h = self.base(x)
        # h stays as the base layer returned it, for a forward hook on the base or an activation
        # cache that holds it: the first group's rows are added out of place (one new tensor, as
        # `h + difference` makes on the other paths), the later groups' into that new tensor.
        y = h
        for name, index in rows.items():
            difference = self._difference(self.adapter(name), x[index], h[index])
            y = h.index_add(0, index, difference) if y is h else y.index_add_(0, index, difference)
        return y

    @property
    def adapter_dtype(self) -> torch.dtype:
        return _dtype(self.delta)

    def merged_weight(self) -> Tensor:
        """The adapted weight ``W'`` as an (out, in) matrix in the base's dtype: what a merge of the
        active adapters would write (``W0 + Σ_i (W'_i − W0)``), or, on a merged layer, what it wrote.
        A query: nothing is changed.

        Raises:
            TypeError: if an active method has no merged form (its forward is not linear in x).
            ValueError: if it holds a NaN or an infinity.
        """
        if self.merged:
            return geometry.weight_matrix(self.base, self.kind).detach().clone()
        return self._merged_with_state()[0]

    def restored_weight(self) -> Tensor:
        """The base weight as an (out, in) matrix in its dtype: what an unmerge would write back,
        or, on an unmerged layer, the weight itself. A query: nothing is changed.

        Raises:
            ValueError: if it holds a NaN or an infinity.
        """
        w = geometry.weight_matrix(self.base, self.kind)
        if not self.merged:
            return w.detach().clone()
        if len(self.merged_names) > 1:
            assert isinstance(self._merge_state, Tensor)  # the base weight's copy, from merge
            return self._merge_state.clone()
        with torch.no_grad():
            restored = self.adapter(self.merged_names[0]).restore_weight(_compute_precision(w), self._merge_state)
        return _checked(restored, w.dtype, "unmerge")

    def merge(self) -> None:
        """Write :meth:`merged_weight` into the base layer and keep what unmerge needs; nothing
        is written if it raises (as :meth:`merged_weight`). A merged layer, or one with no active
        adapter, is left as it is."""
        if not self.merged and self.active:
            weight, state = self._merged_with_state()
            geometry.write_weight(self.base, self.kind, weight)
            self._merge_state, self.merged, self.merged_names = state, True, self.active
            self.merged_adapters = {
                name: {k: p.detach().clone() for k, p in self.adapter(name).named_parameters()} for name in self.active
            }

    def unmerge(self) -> None:
        """Write :meth:`restored_weight` back into the base layer; nothing is written if it raises.
        An unmerged layer is left as it is."""
        if self.merged:
            geometry.write_weight(self.base, self.kind, self.restored_weight())
            self._merge_state, self.merged, self.merged_names, self.merged_adapters = None, False, (), None

    def _merged_with_state(self) -> tuple[Tensor, MergeState]:
        for name in self.active:
            if not self.adapter(name).mergeable:
                method = self.configs[name].method
                raise TypeError(f"{method} (adapter {name!r}) has no merged form (its forward is not linear in x)")
        w0 = geometry.weight_matrix(self.base, self.kind)
        with torch.no_grad():
            if len(self.active) == 1:
                merged, state = self.adapter(self.active[0]).merged_with_state(_compute_precision(w0))
                return _checked(merged, w0.dtype, "merge"), state
            w = _compute_precision(w0)
            merged = w.clone()
            for name in self.active:
                merged += self.adapter(name).merged_weight(w).to(w.dtype) - w
        return _checked(merged, w0.dtype, "merge"), w0.detach().clone()

    def extra_repr(self) -> str:
        methods = ", ".join(f"{n}={c.method}" for n, c in self.configs.items())
        return f"adapters=({methods}), active={list(self.active)}, merged={self.merged}"


def _dtype(adapter: Adapter) -> torch.dtype:
    return next(adapter.parameters()).dtype


def _compute_precision(w: Tensor) -> Tensor:
    # Merging in half precision loses the small ΔW against a large W0; compute in fp32 instead.
    return w.to(at_least_fp32(w.dtype))


def _checked(matrix: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    matrix = matrix.to(dtype)
    if not torch.isfinite(matrix).all():
        bad = (~torch.isfinite(matrix)).sum().item()
        raise ValueError(f"{what} refused: the new weight would hold {bad} non-finite values")
    return matrix


class _NoGradientWhileMerged(torch.autograd.Function):
    """A zero whose backward raises: a merged layer's adapter is folded into the base weight, so
    a backward through it would give the adapter no gradient, and without this node the only
    error is autograd's "element 0 of tensors does not require grad"."""

    @staticmethod
    def forward(ctx: Any, trainable: Tensor, method: str) -> Tensor:
        ctx.method = method
        return trainable.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        raise RuntimeError(
            f"backward through a merged {ctx.method} layer: its adapter is folded into the base weight and gets "
            "no gradient. Call rankwise.unmerge(model) before training, or freeze the adapter "
            "(requires_grad_(False)) to train other parameters of the merged model"
        )
