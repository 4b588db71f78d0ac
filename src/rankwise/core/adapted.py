"""``Adapted``: the one wrapper around a base layer and its adapter."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from . import geometry, quantized
from .config import AdapterConfig
from .delta import Adapter, Delta, MergeState, OutputAdapter, Reparam
from .geometry import BaseKind
from .precision import at_least_fp32

AdapterT = TypeVar("AdapterT", bound=Adapter)


class Adapted(nn.Module, Generic[AdapterT]):
    """A frozen base layer (child ``base``) plus an adapter (child ``delta``).

    The only place that merges, unmerges and maps layouts; the adapter supplies the mathematics.

    Args:
        base: the layer being adapted; its parameters are frozen by :func:`rankwise.adapt`.
        delta: the method's module, built for this layer.
        kind: the base's layout, from :func:`rankwise.core.geometry.base_kind`.
        config: the config given to :func:`rankwise.adapt`; ``delta.config`` may differ from it
            where a rank allocator resized this layer.
    """

    # Typed by the method, so that code which knows the method (an allocator) reads its parameters
    # as what they are rather than as nn.Module's ``Tensor | Module`` attribute type.
    delta: AdapterT

    def __init__(self, base: nn.Module, delta: AdapterT, kind: BaseKind, config: AdapterConfig) -> None:
        super().__init__()
        self.base = base
        self.delta = delta
        self.kind = kind
        self.config = config
        self.merged = False
        self.disabled = False
        # What the adapter's merge returned for its unmerge (Adapter.merged_with_state); set by
        # merge, cleared by unmerge, read by nothing else.
        self._merge_state: MergeState = None
        # The adapter's parameters when it was merged: unmerge refuses if they changed since,
        # because the base weight holds the ΔW of these values, not of the new ones.
        self.merged_adapter: dict[str, Tensor] | None = None

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, so code that reads ``layer.weight`` (dtype, device) still works."""
        return geometry.layer_weight(self.base)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            y = self.base(x)
            if self.merged and self.training and torch.is_grad_enabled():
                trainable = next((p for p in self.delta.parameters() if p.requires_grad), None)
                if trainable is not None:  # a training step would leave the adapter without a gradient
                    y = y + _NoGradientWhileMerged.apply(trainable, self.config.method)
            return y
        adapter_dtype = self.adapter_dtype
        if isinstance(self.delta, OutputAdapter):
            h = self.base(x)
            channels_last = h.movedim(1, -1) if self.kind == "conv2d" else h
            y = self.delta(channels_last.to(adapter_dtype)).to(x.dtype)
            return y.movedim(-1, 1) if self.kind == "conv2d" else y
        features = geometry.to_features(x, self.base, self.kind).to(adapter_dtype)
        if isinstance(self.delta, Delta):
            y = self.base(x)
            if self.kind != "conv2d" and y.dtype == adapter_dtype:
                return self.delta.add_to(y, features)
            return y + geometry.from_features(self.delta(features), x, self.base, self.kind).to(y.dtype)
        assert isinstance(self.delta, Reparam)  # the third shape, after OutputAdapter and Delta
        w0 = geometry.weight_matrix(self.base, self.kind)
        if quantized.is_quantized(self.base):
            # The base's quantized forward is x Ŵ0ᵀ + b, w0 = Ŵ0 its dequantized weight: adding
            # x (W' − Ŵ0)ᵀ keeps step 0 equal to that forward, which x W'ᵀ + b from w0 would not be
            # (the kernel rounds otherwise: bitsandbytes' int8 activations, its bf16 CPU scales).
            y = self.base(x)
            return y + (self.delta(features, w0) - features @ w0.T).to(y.dtype)
        bias = geometry.layer_bias(self.base)
        if bias is not None and bias.dtype == adapter_dtype == x.dtype:
            y = self.delta.output(features, w0, bias)
        else:
            y = geometry.add_bias(self.delta(features, w0).to(x.dtype), self.base)
        return geometry.from_features(y, x, self.base, self.kind)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(self.delta.parameters()).dtype

    def merged_weight(self) -> Tensor:
        """The adapted weight ``W'`` as an (out, in) matrix in the base's dtype: what a merge would
        write, or, on a merged layer, what it wrote. A query: nothing is changed.

        Raises:
            TypeError: if the method has no merged form (its forward is not linear in x).
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
        with torch.no_grad():
            restored = self.delta.restore_weight(_compute_precision(w), self._merge_state)
        return _checked(restored, w.dtype, "unmerge")

    def merge(self) -> None:
        """Write :meth:`merged_weight` into the base layer and keep what unmerge needs; nothing
        is written if it raises (as :meth:`merged_weight`). A merged layer is left as it is."""
        if not self.merged:
            weight, state = self._merged_with_state()
            geometry.write_weight(self.base, self.kind, weight)
            self._merge_state, self.merged = state, True
            self.merged_adapter = {k: p.detach().clone() for k, p in self.delta.named_parameters()}

    def unmerge(self) -> None:
        """Write :meth:`restored_weight` back into the base layer; nothing is written if it raises.
        An unmerged layer is left as it is."""
        if self.merged:
            geometry.write_weight(self.base, self.kind, self.restored_weight())
            self._merge_state, self.merged, self.merged_adapter = None, False, None

    def _merged_with_state(self) -> tuple[Tensor, MergeState]:
        if not self.delta.mergeable:
            raise TypeError(f"{self.config.method} has no merged form (its forward is not linear in x)")
        w0 = geometry.weight_matrix(self.base, self.kind)
        with torch.no_grad():
            merged, state = self.delta.merged_with_state(_compute_precision(w0))
        return _checked(merged, w0.dtype, "merge"), state

    def extra_repr(self) -> str:
        return f"method={self.config.method}, merged={self.merged}"


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
