"""``combine``: a new named adapter from weighted existing ones: exact where the method has such a
form, or, on request, the best low-rank approximation of the weighted sum of the updates."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import geometry, registry
from .adapted import Adapted
from .capabilities import Factored
from .checks import check_number
from .config import AdapterConfig
from .delta import Adapter, Delta
from .inject import adapted_modules, adapter_names, check_name


def combine(
    model: nn.Module, weights: Mapping[str, float], name: str, approximate: AdapterConfig | None = None
) -> nn.Module:
    """Add the adapter ``name`` whose update on every layer is ``Σ_a weights[a] · ΔW_a``.

    Without ``approximate`` the sum is exact, in the method's own parameters (e.g. LoRA's factors
    side by side, rank ``r_a + r_b``): the method declares the form
    (:meth:`rankwise.core.delta.Adapter.combined`), and the adapters must be of one method on the
    same layers. With ``approximate``, the new adapter is of that config's method, an additive
    factored one (LoRA), and holds the truncated SVD of the sum at its rank: the best
    approximation of that rank in the Frobenius norm, of any mergeable adapters, on every layer
    holding one of them. Where neither fits, the adapters can still be merged together
    (``set_active`` then ``merge``), which writes the exact sum into the base weights.

    The new adapter is inactive, as one added by ``adapt``.

    Args:
        weights: adapter name -> weight, e.g. ``{"a": 0.7, "b": 0.3}``.
        name: the new adapter's name.
        approximate: the config of the approximating adapter, e.g. ``LoRAConfig(rank=16)``; its
            ``targets`` are not used (the layers are those of the adapters combined).

    Raises:
        ValueError: an unknown, taken or invalid name, no weights, a weight that is not a finite
            number, a merged model; for an exact combination, adapters of different methods or on
            different layers, or parts the method cannot combine exactly (e.g. other block sizes).
        TypeError: the method has no exact combination (the message says what works instead); or
            ``approximate`` is not the config of an additive factored method, or an adapter to
            approximate has no merged form.
        The model is unchanged in every case.
    """
    check_name(name)
    known = adapter_names(model)
    if name in known:
        raise ValueError(f"the model already has an adapter named {name!r} (adapters: {known}); choose another name")
    if not weights:
        raise ValueError("combine needs at least one adapter and its weight")
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model holds {known}")
    for adapter, weight in weights.items():
        check_number("combine", f"weights[{adapter!r}]", weight)
    layers = [(path, layer) for path, layer in adapted_modules(model) if any(n in layer.adapters for n in weights)]
    merged = [path for path, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"cannot combine adapters of a merged model ({merged} are merged); unmerge first")
    if approximate is None:
        built = _exact(layers, weights)
    else:
        built = [(layer, _approximation(path, layer, weights, approximate)) for path, layer in layers]
    config = built[0][1].config  # the shared config; a layer whose own differs records it (as an allocator's)
    if approximate is not None:
        first = next(layer.configs[n] for _, layer in layers for n in weights if n in layer.adapters)
        config = dataclasses.replace(config, targets=first.targets, trainable=())
    for layer, new in built:
        layer.add(name, new, config, active=False)
    return model


def _exact(layers: list[tuple[str, Adapted]], weights: Mapping[str, float]) -> list[tuple[Adapted, Adapter]]:
    methods = {n: next(layer.configs[n].method for _, layer in layers if n in layer.adapters) for n in weights}
    if len(set(methods.values())) > 1:
        raise ValueError(
            f"combine needs adapters of one method, got {methods}: no adapter of one method holds another's "
            "update exactly; keep them active together (rankwise.set_active(model, names)), merge them "
            "(then rankwise.merge(model)), or approximate the sum (combine(..., approximate=LoRAConfig(rank=k)))"
        )
    holding = {n: [path for path, layer in layers if n in layer.adapters] for n in weights}
    first = next(iter(weights))
    differ = {n: paths for n, paths in holding.items() if paths != holding[first]}
    if differ:
        raise ValueError(
            f"combine needs adapters on the same layers: {first!r} is on {holding[first]}, but "
            + "; ".join(f"{n!r} on {paths}" for n, paths in differ.items())
            + "; combine(..., approximate=LoRAConfig(rank=k)) takes each layer's sum of those it holds"
        )
    built = []
    for path, layer in layers:
        parts = [(float(w), layer.adapter(n)) for n, w in weights.items()]
        try:
            new = type(parts[0][1]).combined(parts, _w0(layer, parts[0][1]))
        except (ValueError, TypeError) as error:
            raise type(error)(
                f"combine on '{path}': {error}; no adapter was added (combine(..., approximate=LoRAConfig(rank=k)) "
                "gives the best rank-k approximation)"
            ) from error
        built.append((layer, new.train(parts[0][1].training)))
    return built


def _approximation(path: str, layer: Adapted, weights: Mapping[str, float], config: AdapterConfig) -> Adapter:
    """An adapter of ``config``'s method whose ``s · B A`` is the truncated SVD of the layer's
    ``Σ w_a (W'_a − W0)``."""
    parts = [(float(w), layer.adapter(n)) for n, w in weights.items() if n in layer.adapters]
    w0 = _w0(layer, parts[0][1])
    try:
        new = registry.for_config(config).module_class(w0, config)
    except (ValueError, TypeError) as error:
        raise type(error)(f"combine on '{path}': {error}") from error
    # Its whole update must be s · B A, so that the SVD factors are what it adds: an additive factored
    # method (a Reparam one rescales W0 + s·B A, which the factors alone do not give).
    if not (isinstance(new, Delta) and isinstance(new, Factored)):
        raise TypeError(
            f"combine(approximate=...) needs an additive method whose update is s·B·A (LoRA), not {config.method}"
        )
    target = torch.zeros_like(w0)
    with torch.no_grad():
        for weight, adapter in parts:
            if not adapter.mergeable:
                raise TypeError(f"combine on '{path}': {type(adapter).__name__} has no merged form to approximate")
            target += weight * (adapter.merged_weight(w0) - w0)
        A, B, scale = new.factors()
        rank = A.shape[0]
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        root = S[:rank].sqrt()
        A.zero_()[: len(root)].copy_(root[:, None] * Vh[:rank])
        B.zero_()[:, : len(root)].copy_(U[:, :rank] * (root / scale))
    return new.train(parts[0][1].training)


def _w0(layer: Adapted, adapter: Adapter) -> Tensor:
    """The base weight as an (out, in) matrix in the adapter's dtype, as a constructor takes it."""
    return geometry.weight_matrix(layer.base, layer.kind).detach().to(next(adapter.parameters()).dtype)
