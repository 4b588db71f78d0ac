"""How each supported base layer's weight maps to an (out_features, in_features) matrix.

Methods are written once for ``y = x W0ᵀ + b`` with ``W0`` of shape (out, in). This file maps the
supported bases onto that form:

* ``linear``: ``nn.Linear``, weight (out, in).
* ``conv1d``: transformers ``Conv1D`` (GPT-2), weight stored transposed, (in, out).
* ``conv2d``: ``nn.Conv2d`` with ``groups=1``, weight (out, in, kh, kw) flattened to
  (out, in·kh·kw); the layer's input is seen as its patches (``F.unfold``), so any method that
  works on a Linear works on a convolution. A 1 × 1 convolution with stride 1 and no padding is a
  Linear over channels and skips the unfold.
* ``embedding``: ``nn.Embedding``, weight (num_embeddings, dim) seen as its transpose, (dim,
  num_embeddings): the lookup of token ``i`` is ``onehot(i) W0ᵀ``, so out = dim and in =
  num_embeddings, as PEFT's ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B``
  (dim, r) read it. The input is token ids, not features: a method that adapts an embedding
  declares it (``"embedding"`` in ``supported_bases``, :class:`.capabilities.EmbeddingAdapter`)
  and looks up its update's rows for the ids (:func:`embedding_columns`) without forming ΔW. Only
  :func:`rankwise.adapt` takes embeddings (``check_supported(..., embedding=True)``); the
  compressors, whose low-rank layers take features, do not.

A ``linear`` layer may hold a quantized weight (bitsandbytes 4-bit or 8-bit, torchao int8;
:mod:`rankwise.core.quantized`): its matrix is then the dequantized weight, computed when asked
for, and it cannot be written.
"""

from __future__ import annotations

import sys
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quantized

BaseKind = Literal["linear", "conv1d", "conv2d", "embedding"]


def _conv1d_type() -> type[nn.Module] | None:
    # A model holding a transformers Conv1D has imported transformers already, so rankwise never
    # imports it (an optional dependency that takes seconds to import).
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def base_kind(module: nn.Module) -> BaseKind | None:
    """The kind of a supported base layer, or ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def check_supported(module: nn.Module, path: str, *, embedding: bool = False) -> BaseKind:
    """The base kind of ``module``; ``TypeError`` for a layer no adapter can wrap.

    Args:
        embedding: accept ``nn.Embedding`` (adapters do; compressors, whose layers take features, do not).
    """
    kind = base_kind(module)
    if kind is None or (kind == "embedding" and not embedding):
        layers = (
            "nn.Linear, transformers Conv1D, nn.Conv2d and nn.Embedding"
            if embedding
            else ("nn.Linear, transformers Conv1D and nn.Conv2d")
        )
        raise TypeError(f"'{path}' is a {type(module).__name__}; this takes {layers}")
    if quantized.is_quantized(module):
        quantized.scheme(module, path)  # raises for a layout rankwise cannot read
    if kind == "embedding":
        assert isinstance(module, nn.Embedding)  # base_kind's "embedding"
        _check_embedding(module, path)
    if kind == "conv2d":
        if module.groups != 1:
            raise TypeError(f"'{path}': Conv2d with groups={module.groups} is not supported (groups must be 1)")
        if module.padding_mode != "zeros":
            raise TypeError(f"'{path}': Conv2d with padding_mode={module.padding_mode!r} is not supported")
        if isinstance(module.padding, str):
            raise TypeError(f"'{path}': Conv2d with padding={module.padding!r} is not supported; use integers")
    return kind


def _check_embedding(module: nn.Embedding, path: str) -> None:
    if module.max_norm is not None:
        # F.embedding renormalizes the looked-up rows of the weight in place during forward: the
        # frozen base would change as it runs, and a merged ΔW would be rescaled row by row.
        raise TypeError(
            f"'{path}': Embedding with max_norm={module.max_norm} rewrites its weight in forward, which an adapter "
            "cannot follow; adapt an Embedding with max_norm=None"
        )
    if overrides_forward(module, "embedding"):
        # A class that scales or otherwise changes its lookup (a scaled word embedding) would
        # apply that to W0's rows and not to the adapter's, so merged and unmerged models differ.
        raise TypeError(
            f"'{path}': {type(module).__name__} defines its own forward, so its output is not the weight's rows "
            "and an adapter's rows could not be added to it consistently with a merge; adapt a plain nn.Embedding"
        )


def overrides_forward(module: nn.Module, kind: BaseKind) -> bool:
    """Whether ``module``'s class replaces the forward of its kind (nn.Linear, Conv1D, nn.Conv2d,
    nn.Embedding), e.g. with a fake-quantized matmul: its output is then not known to be ``x W0ᵀ + b``."""
    standard = {"linear": nn.Linear, "conv1d": _conv1d_type(), "conv2d": nn.Conv2d, "embedding": nn.Embedding}[kind]
    assert standard is not None  # kind "conv1d" was found as transformers' Conv1D (base_kind)
    return type(module).forward is not standard.forward


def layer_weight(base: nn.Module) -> Tensor:
    """The weight of a supported base layer, as a tensor."""
    # nn.Module types every attribute as Tensor | Module; each base kind's weight is a Parameter.
    return cast(Tensor, base.weight)


def layer_bias(base: nn.Module) -> Tensor | None:
    """The bias of a supported base layer, ``None`` where it has none."""
    return cast("Tensor | None", base.bias)  # as layer_weight: a Parameter or None for each base kind


def weight_matrix(base: nn.Module, kind: BaseKind) -> Tensor:
    """The base weight as an (out_features, in_features) view, sharing storage with the layer; for
    a quantized weight, a new matrix of its dequantized values (at least fp32, no gradient)."""
    if quantized.is_quantized(base):
        return quantized.dequantized(base)
    return as_matrix(layer_weight(base), kind)


def matrix_shape(base: nn.Module, kind: BaseKind) -> tuple[int, int]:
    """(out_features, in_features) of :func:`weight_matrix`, without dequantizing a quantized weight."""
    if quantized.is_quantized(base):
        return quantized.shape(base)
    out_features, in_features = as_matrix(layer_weight(base), kind).shape
    return out_features, in_features


def weight_shape(base: nn.Module) -> tuple[int, ...]:
    """The shape of the layer's weight in its own layout: what :func:`matrix_shape` says and what it
    flattens, a convolution's kernel ((out, in, kh, kw): a 3 × 3 kernel on 4 channels and a 1 × 1
    on 36 have the same (out, 36) matrix, whose columns mean other inputs). A quantized weight,
    stored packed, gives the (out, in) of the ``nn.Linear`` it was quantized from."""
    if quantized.is_quantized(base):
        return quantized.shape(base)
    return tuple(layer_weight(base).shape)


def as_matrix(weight: Tensor, kind: BaseKind) -> Tensor:
    """A tensor in a layer's weight layout (the weight, its gradient) as an (out, in) view."""
    if kind in ("conv1d", "embedding"):
        return weight.t()
    if kind == "conv2d":
        return weight.flatten(1)
    return weight


def as_weight(matrix: Tensor, kind: BaseKind, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`as_matrix`: an (out, in) matrix in the layout of a weight of ``shape``."""
    return matrix.t() if kind in ("conv1d", "embedding") else matrix.reshape(shape)


def write_weight(base: nn.Module, kind: BaseKind, matrix: Tensor) -> None:
    """Copy an (out, in) matrix into the layer's weight, in its own layout and dtype."""
    # Callers refuse a quantized base first (rankwise.merge names the layer and what to do instead).
    assert not quantized.is_quantized(base), "a quantized weight cannot be written"
    weight = layer_weight(base)
    with torch.no_grad():
        weight.copy_(as_weight(matrix, kind, tuple(weight.shape)))


def embedding_columns(ids: Tensor, matrix: Tensor, base: nn.Module) -> Tensor:
    """``onehot(ids) matrixᵀ``: the columns ``ids`` of a (k, num_embeddings) matrix as rows (..., k),
    looked up as the embedding ``base`` looks up its own weight (PEFT's convention for
    ``lora_embedding_A``): the ``padding_idx`` column gets no gradient, and ``scale_grad_by_freq``
    scales the others'. An adapter's factor that reads the input goes through here.
    """
    assert isinstance(base, nn.Embedding)  # check_supported refuses max_norm, so the lookup is pure
    return F.embedding(ids, matrix.t(), padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)


def dropped_tokens(dropout: nn.Module, ids: Tensor, like: Tensor) -> Tensor | None:
    """Dropout on an embedding adapter's one-hot input, as a (..., 1) factor per token (0 or
    1 / (1 − p)), or ``None`` when no dropout is active. Dropping the one-hot input of a token drops
    its whole update, which is what a method's ``dropout`` on its branch input means here."""
    if isinstance(dropout, nn.Identity) or not dropout.training:
        return None
    return dropout(like.new_ones(*ids.shape, 1))


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def to_features(x: Tensor, base: nn.Module, kind: BaseKind) -> Tensor:
    """The layer input as rows of features: (..., in_features)."""
    if kind != "conv2d":
        return x
    assert isinstance(base, nn.Conv2d)  # kind "conv2d" is an nn.Conv2d (base_kind)
    if _is_pointwise(base):
        return x.movedim(1, -1)  # (batch, h, w, channels)
    patches = F.unfold(x, base.kernel_size, base.dilation, _padding(base), base.stride)
    return patches.transpose(1, 2)  # (batch, positions, in·kh·kw)


def from_features(y: Tensor, x: Tensor, base: nn.Module, kind: BaseKind) -> Tensor:
    """Inverse of :func:`to_features` for the output: (..., out_features) to the layer's layout."""
    if kind != "conv2d":
        return y
    assert isinstance(base, nn.Conv2d)  # kind "conv2d" is an nn.Conv2d (base_kind)
    if _is_pointwise(base):
        return y.movedim(-1, 1)
    height, width = _conv_output_size(x, base)
    return y.transpose(1, 2).reshape(y.shape[0], -1, height, width)


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    padding = conv.padding
    assert not isinstance(padding, str)  # check_supported refuses "same" and "valid"
    return padding


def _conv_output_size(x: Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    padding = _padding(conv)
    sizes = []
    for dim in (0, 1):
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        sizes.append((x.shape[2 + dim] + 2 * padding[dim] - span) // conv.stride[dim] + 1)
    return sizes[0], sizes[1]


def add_bias(y: Tensor, base: nn.Module) -> Tensor:
    """Add the layer's bias to a features-last output."""
    bias = layer_bias(base)
    return y if bias is None else y + bias
