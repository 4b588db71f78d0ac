"""``combine``: a new named adapter from weighted existing ones, where the method has an exact form."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from . import geometry
from .adapted import Adapted
from .checks import check_number
from .delta import Adapter
from .inject import adapted_modules, adapter_names, check_name


def combine(model: nn.Module, weights: Mapping[str, float], name: str) -> nn.Module:
    """Add the adapter ``name`` whose update on every layer is ``Σ_a weights[a] · ΔW_a``, exactly,
    in the method's own parameters (e.g. LoRA's factors side by side, rank ``r_a + r_b``).

    The method declares the form (:meth:`rankwise.core.delta.Adapter.combined`); where it has
    none, the adapters can still be merged together (``set_active`` then ``merge``), which writes
    the same sum into the base weights. The new adapter is inactive, as one added by ``adapt``.

    Args:
        weights: adapter name -> weight, e.g. ``{"a": 0.7, "b": 0.3}``; adapters of one method on
            the same layers.
        name: the new adapter's name.

    Raises:
        ValueError: an unknown, taken or invalid name, no weights, a weight that is not a finite
            number, adapters of different methods or on different layers, a merged model, or parts
            the method cannot combine exactly (e.g. other block sizes).
        TypeError: the method has no exact combination (the message says what works instead).
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
    layers = list(adapted_modules(model))
    merged = [path for path, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"cannot combine adapters of a merged model ({merged} are merged); unmerge first")
    methods = {n: next(layer.configs[n].method for _, layer in layers if n in layer.adapters) for n in weights}
    if len(set(methods.values())) > 1:
        raise ValueError(
            f"combine needs adapters of one method, got {methods}: no adapter of one method holds another's "
            "update exactly; keep them active together (rankwise.set_active(model, names)) or merge them "
            "(then rankwise.merge(model))"
        )
    holding = {n: [path for path, layer in layers if n in layer.adapters] for n in weights}
    first = next(iter(weights))
    differ = {n: paths for n, paths in holding.items() if paths != holding[first]}
    if differ:
        raise ValueError(
            f"combine needs adapters on the same layers: {first!r} is on {holding[first]}, but "
            + "; ".join(f"{n!r} on {paths}" for n, paths in differ.items())
        )

    built: list[tuple[Adapted, Adapter]] = []
    for path, layer in layers:
        if first not in layer.adapters:
            continue
        parts = [(float(w), layer.adapter(n)) for n, w in weights.items()]
        method = type(parts[0][1])
        w0 = geometry.weight_matrix(layer.base, layer.kind).detach().to(next(parts[0][1].parameters()).dtype)
        try:
            new = method.combined(parts, w0)
        except (ValueError, TypeError) as error:
            raise type(error)(f"combine on '{path}': {error}; no adapter was added") from error
        built.append((layer, new.train(parts[0][1].training)))
    config = built[0][1].config  # the shared config; a layer whose own differs records it (as an allocator's)
    for layer, new in built:
        layer.add(name, new, config, active=False)
    return model
