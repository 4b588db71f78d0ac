"""Select target layers, wrap them, freeze the rest; and the way back (merge, unwrap)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import geometry, registry, targets
from .adapted import Adapted
from .config import AdapterConfig, matches


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, Adapted]]:
    """Every ``Adapted`` layer of ``model`` with its path."""
    for path, module in model.named_modules():
        if isinstance(module, Adapted):
            yield path, module


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the layers ``config.targets`` selects (:func:`.targets.select`), in module order.

    Raises:
        ValueError: a target matches no module, or a selected layer is already adapted, shared
            with another path, or overlaps a ``trainable`` module.
        TypeError: a selected module is not a layer the method supports.
    """
    method = registry.for_config(config)
    paths = targets.select(model, config.targets, trainable=config.trainable)
    for path in paths:
        module = model.get_submodule(path)
        kind = geometry.base_kind(module)
        if kind not in method.module_class.supported_bases:
            raise TypeError(
                f"{method.name} does not support {type(module).__name__} ('{path}'); "
                f"it supports {sorted(method.module_class.supported_bases)}"
            )
        if kind == "conv2d" and module.kernel_size != (1, 1) and not method.module_class.spatial_conv:
            raise TypeError(f"{method.name} supports only 1 x 1 convolutions; '{path}' has kernel {module.kernel_size}")
    return paths


def build(model: nn.Module, path: str, config: AdapterConfig, module_config: AdapterConfig | None = None) -> Adapted:
    """An ``Adapted`` around the layer at ``path``, not yet installed. The model is not changed.

    Args:
        module_config: this layer's own config where it differs from ``config`` (a rank allocator's
            per-layer rank); defaults to ``config``.
    """
    base = model.get_submodule(path)
    kind = geometry.check_supported(base, path)
    method = registry.for_config(config)
    weight = geometry.weight_matrix(base, kind)
    adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    try:
        delta = method.module_class(weight.detach().to(adapter_dtype), module_config or config)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{method.name} on '{path}': {error}") from error
    wrapper = Adapted(base, delta.to(device=weight.device, dtype=adapter_dtype), kind, config)
    return wrapper.train(base.training)  # a model adapted in eval mode stays in eval mode


def install_wrappers(model: nn.Module, wrappers: dict[str, Adapted], config: AdapterConfig) -> nn.Module:
    """Put the wrappers in place, freeze every other parameter, unfreeze ``config.trainable``."""
    modules = dict(targets.outer_modules(model))
    trainable = targets.outermost_matches(modules, config.trainable)
    missing = [entry for entry in config.trainable if not any(matches(p, entry) for p in modules if p)]
    if missing:
        raise ValueError(f"trainable modules {missing} match no module; some module names: {targets.examples(modules)}")
    if any(isinstance(m, Adapted) for m in modules.values()):
        raise ValueError("the model already has rankwise adapters; unwrap it before adapting again")
    model.requires_grad_(False)
    for path in trainable:
        modules[path].requires_grad_(True)
    for path, wrapper in wrappers.items():
        model = replace_module(model, path, wrapper)
    return model


def adapt(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap each layer ``config.targets`` selects with the method of ``config``, in place.

    Every other parameter is frozen, except the modules named in ``config.trainable``.

    Args:
        model: any ``nn.Module``; a transformers model works as is.
        config: the method's config (its type selects the method).

    Returns:
        The same model object, adapted (a new ``Adapted`` only when ``model`` itself is the target).

    Raises:
        ValueError: a target or trainable name matches nothing, a layer is already adapted, or a
            layer's shape does not fit the method (the message names the layer).
        TypeError: ``config`` is not a method config, or a target layer is of a type the method
            does not support.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"adapt() needs a method config such as LoRAConfig, got {type(config).__name__}")
    if any(True for _ in adapted_modules(model)):
        raise ValueError("the model already has rankwise adapters; unwrap it before adapting again")
    paths = find_targets(model, config)
    wrappers = {path: build(model, path, config) for path in paths}
    return install_wrappers(model, wrappers, config)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; forward then costs what the base model costs.

    All merged weights are computed and checked before any is written, so a merge that would
    write a NaN or an infinity raises ``ValueError`` and leaves the whole model untouched.
    """
    return _set_merged(model, True)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore every base weight (within the dtype's rounding)."""
    return _set_merged(model, False)


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the wrappers: the plain model back, with its original module types and keys.

    Args:
        merge: fold the adapters into the weights first; ``False`` drops them, restoring the base
            weights if they were merged.

    Parameters stay frozen as :func:`adapt` left them; call ``requires_grad_(True)`` to train them.
    """
    _set_merged(model, merge)
    for path, layer in list(adapted_modules(model)):
        model = replace_module(model, path, layer.base)
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves as its base model (e.g. a DPO reference pass).

    Raises:
        ValueError: if the adapters are merged (the base weights are not there to run).
    """
    layers = [layer for _, layer in adapted_modules(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("cannot disable merged adapters; call rankwise.unmerge(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.disabled = state


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path``; returns the model (``new`` itself when ``path`` is the root)."""
    if not path:
        return new
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)
    return model


def module_overrides(layer: Adapted) -> dict[str, object]:
    """The fields where this layer's own config differs from the one given to ``adapt``."""
    own, shared = layer.delta.config, layer.config
    return {
        f.name: value
        for f in dataclasses.fields(own)
        if (value := getattr(own, f.name)) != getattr(shared, f.name)
    }


def _set_merged(model: nn.Module, merged: bool) -> nn.Module:
    # Two passes: check every new weight first, write only when all are finite.
    layers = [(path, layer) for path, layer in adapted_modules(model) if layer.merged != merged]
    compute = Adapted.merged_weight if merged else Adapted.restored_weight
    for path, layer in layers:
        try:
            compute(layer)
        except ValueError as error:
            raise ValueError(f"'{path}': {error}; no weight was changed") from error
    for _, layer in layers:
        layer.write_weight(compute(layer), merged=merged)
    return model


def trainable_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the modules ``config.trainable`` selects (outermost matches only)."""
    return targets.outermost_matches(dict(targets.outer_modules(model)), config.trainable)
