"""Select target layers, wrap them, freeze the rest; and the way back (merge, unwrap)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from . import geometry, quantized, registry, targets
from .adapted import DEFAULT, Adapted
from .capabilities import EmbeddingAdapter
from .config import AdapterConfig, matches
from .delta import Reparam
from .precision import at_least_fp32
from .ties import shared_tensors


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, Adapted]]:
    """Every ``Adapted`` layer of ``model`` with its path."""
    for path, module in model.named_modules():
        if isinstance(module, Adapted):
            yield path, module


def find_targets(model: nn.Module, config: AdapterConfig, adapted: bool = False) -> list[str]:
    """Paths of the layers ``config.targets`` selects (:func:`.targets.select`), in module order.

    The trainable modules are ``config.trainable`` and, on an adapted model, the model's own
    (:func:`model_trainable`): ``"all-linear"`` leaves them out and an explicit target overlapping
    them is refused, for an added adapter as for the first.

    Args:
        adapted: whether adapted layers may be selected (an adapter added beside others).

    Raises:
        ValueError: a target matches no module, or a selected layer is already adapted, shared
            with another path, or overlaps a trainable module.
        TypeError: a selected module is not a layer the method supports.
    """
    method = registry.for_config(config)
    # An added adapter names no trainable modules (check_can_add), but the model's stay trained in
    # full: wrapping one would freeze it under every adapter.
    trainable = (*config.trainable, *model_trainable(model))
    paths = targets.select(model, config.targets, trainable=trainable, embedding=True, adapted=adapted)
    for path in paths:
        module = base_of(model.get_submodule(path))
        kind = geometry.base_kind(module)
        if kind not in method.module_class.supported_bases:
            others = [name for name in registry.methods() if kind in registry.get(name).module_class.supported_bases]
            raise TypeError(
                f"{method.name} does not support {type(module).__name__} ('{path}'); "
                f"it supports {sorted(method.module_class.supported_bases)}; methods that support {kind}: {others}"
            )
        if kind == "conv2d" and module.kernel_size != (1, 1) and not method.module_class.spatial_conv:
            raise TypeError(f"{method.name} supports only 1 x 1 convolutions; '{path}' has kernel {module.kernel_size}")
    return paths


def build(
    model: nn.Module,
    path: str,
    config: AdapterConfig,
    module_config: AdapterConfig | None = None,
    name: str = DEFAULT,
) -> Adapted:
    """An ``Adapted`` around the layer at ``path`` (its base, if it is adapted already) holding one
    new adapter ``name``, not yet installed. The model is not changed.

    Args:
        module_config: this layer's own config where it differs from ``config`` (a rank allocator's
            per-layer rank); defaults to ``config``.
    """
    base = base_of(model.get_submodule(path))
    kind = geometry.check_supported(base, path, embedding=True)
    method = registry.for_config(config)
    # A Reparam method computes x W'ᵀ + b from the weight and never calls the base, so it would skip a
    # forward the layer's class defines (a fake-quantized matmul, a custom kernel): the adapted model
    # would differ from the user's at step 0, silently. Such a forward cannot carry every W' (Bat's
    # update multiplies W0's blocks; BoRA's column gain on a k × k kernel is no scaling of the input),
    # and PEFT answers both ways (its DoRA reuses the base's output only while no dropout is active,
    # its Bat never), so a refusal naming the layer is what a user can act on. The additive methods
    # add to that forward's output and accept the layer.
    # A quantized base is the exception: its forward is known to be x Ŵ0ᵀ + b for its dequantized
    # weight Ŵ0 (up to the kernel's rounding), so Adapted adds x (W' − Ŵ0)ᵀ to that forward.
    quantized_base = quantized.is_quantized(base)
    if issubclass(method.module_class, Reparam) and geometry.overrides_forward(base, kind) and not quantized_base:
        raise TypeError(
            f"{method.name} on '{path}': {type(base).__name__} defines its own forward, which {method.name} "
            "would bypass (it computes x W'ᵀ + b from the weight); use a method that adds to the layer's output"
        )
    weight = geometry.weight_matrix(base, kind)
    adapter_dtype = at_least_fp32(weight.dtype)  # fp32 adapters on a half-precision base
    try:
        delta = method.module_class(weight.detach().to(adapter_dtype), module_config or config)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{method.name} on '{path}': {error}") from error
    if kind == "embedding" and isinstance(delta, EmbeddingAdapter):  # an OutputAdapter needs no lookup
        assert isinstance(base, nn.Embedding)  # kind "embedding" (geometry.base_kind)
        delta.reset_for_embedding(base.padding_idx)
    wrapper = Adapted(base, delta.to(device=weight.device, dtype=adapter_dtype), kind, config, name)
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


def adapt(model: nn.Module, config: AdapterConfig, name: str = DEFAULT) -> nn.Module:
    """Wrap each layer ``config.targets`` selects with the method of ``config``, in place; or, on a
    model that has adapters already, add the adapter ``name`` to the layers its targets select.

    The first adapter of a model is active, and every other parameter is frozen, except the
    modules named in ``config.trainable``. An adapter added beside others is not activated (as in
    PEFT; :func:`set_active` switches): its layers that were adapted already hold it as one more
    named adapter, the others are wrapped, their base frozen.

    Args:
        model: any ``nn.Module``; a transformers model works as is.
        config: the method's config (its type selects the method).
        name: the adapter's name; one-adapter code leaves the default, ``"default"``.

    Returns:
        The same model object, adapted (a new ``Adapted`` only when ``model`` itself is the target).

    Raises:
        ValueError: a target or trainable name matches nothing, a layer's shape does not fit the
            method (the message names the layer), ``name`` is taken or not a valid name, the model
            is merged, or an added adapter names ``trainable`` modules (they are the model's, shared
            by its adapters: give them with the first adapter). The model is unchanged.
        TypeError: ``config`` is not a method config, or a target layer is of a type the method
            does not support.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"adapt() needs a method config such as LoRAConfig, got {type(config).__name__}")
    check_name(name)
    if any(True for _ in adapted_modules(model)):
        check_can_add(model, config, name)
        paths = find_targets(model, config, adapted=True)
        return add_wrappers(model, {path: build(model, path, config, name=name) for path in paths}, name)
    paths = find_targets(model, config)
    wrappers = {path: build(model, path, config, name=name) for path in paths}
    return install_wrappers(model, wrappers, config)


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` can name an adapter (a ``ModuleDict`` key, a folder)."""
    if not isinstance(name, str) or not name or "." in name or "/" in name or name.startswith("_"):
        raise ValueError(
            f"an adapter name must be a non-empty string without '.' or '/', not starting with '_'; got {name!r}"
        )


def check_can_add(model: nn.Module, config: AdapterConfig, name: str) -> None:
    """Refuse, before anything is built, an adapter ``name`` that an adapted ``model`` cannot take."""
    names = adapter_names(model)
    if name in names:
        raise ValueError(
            f"the model already has an adapter named {name!r} (adapters: {names}); choose another name, "
            "or rankwise.delete_adapter(model, name) first"
        )
    _refuse_merged(model, f"cannot add adapter {name!r} to a merged model")
    if config.trainable:
        raise ValueError(
            f"adapter {name!r} names trainable modules {list(config.trainable)}, but they belong to the model, "
            "not to one adapter: give them with the model's first adapter"
        )


def add_wrappers(model: nn.Module, wrappers: dict[str, Adapted], name: str) -> nn.Module:
    """Install the one-adapter ``wrappers`` (from :func:`build`) into an adapted model: a layer
    adapted already takes the adapter ``name`` as one more, inactive; a plain one is wrapped."""
    for path, wrapper in wrappers.items():
        module = model.get_submodule(path) if path else model
        adapter = wrapper.adapter(name)
        if isinstance(module, Adapted):
            module.add(name, adapter, wrapper.configs[name], active=False)
        else:
            wrapper.set_active(())
            wrapper.base.requires_grad_(False)
            model = replace_module(model, path, wrapper)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters ``model`` holds, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in adapted_modules(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters, in the order they were added (their effects add, so the
    order :func:`set_active` was given them does not matter)."""
    active = {name for _, layer in adapted_modules(model) for name in layer.active}
    return [name for name in adapter_names(model) if name in active]


def _refuse_merged(model: nn.Module, refusal: str) -> None:
    """Raise ``refusal``, naming the merged layers, if any layer of ``model`` is merged: a merged
    weight holds the active adapters' update, and unmerge undoes exactly those, so adding, switching
    or deleting adapters must wait for it."""
    merged = [path for path, layer in adapted_modules(model) if layer.merged]
    if merged:
        raise ValueError(f"{refusal} ({merged} are merged); unmerge first")


def set_active(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Run the adapters ``names`` (one name or several, whose effects add; ``[]`` for none).

    Only the active adapters' parameters require grad afterwards, and every inactive one's do not:
    build the optimizer after ``set_active`` so that it holds the parameters that train.

    Raises:
        ValueError: an unknown or repeated name, or a merged model (unmerge first). Nothing changes.
    """
    wanted = (names,) if isinstance(names, str) else tuple(names)
    known = adapter_names(model)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; the model holds {known}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"adapter names repeated in {list(wanted)}")
    _refuse_merged(model, "cannot switch adapters while merged")
    for _, layer in adapted_modules(model):
        layer.set_active(wanted)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from every layer; a layer left with no adapter is unwrapped back
    to its base layer. The other adapters, active or not, stay as they were.

    Returns:
        The model (its base layer when ``model`` itself was the only adapted layer).

    Raises:
        ValueError: an unknown name, or a merged model (unmerge first). Nothing changes.
    """
    known = adapter_names(model)
    if name not in known:
        raise ValueError(f"unknown adapter name {name!r}; the model holds {known}")
    _refuse_merged(model, f"cannot delete adapter {name!r} while merged")
    head = model_trainable(model)
    # Listed before the loop: unwrapping a layer replaces a module of the tree being walked.
    for path, layer in list(adapted_modules(model)):
        if name not in layer.adapters:
            continue
        if len(layer.adapters) == 1:
            model = replace_module(model, path, layer.base)
        else:
            layer.remove(name)
    remaining = adapter_names(model)
    if head and remaining and not model_trainable(model):
        # The trainable modules are the model's, recorded on the adapter that named them; when that
        # one goes, the next adapter records them, or a later save would leave the trained head out.
        heir = remaining[0]
        for _, layer in adapted_modules(model):
            if heir in layer.configs:
                layer.configs[heir] = dataclasses.replace(layer.configs[heir], trainable=head)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into their base weights; forward then costs what the base model costs.

    Several active adapters merge to ``W0 + Σ_i (W'_i − W0)``, each ``W'_i`` computed from ``W0``;
    such a layer keeps a copy of its base weight until unmerge, which writes the copy back (one
    active adapter is undone from its parameters, as its method defines).

    Everything is checked before any weight is written, so a refused merge leaves the whole model
    untouched. While merged, a backward through an adapted layer whose adapter requires grad
    raises (the adapter would get no gradient): train unmerged.

    Raises:
        ValueError: a new weight would hold a NaN or an infinity; a base weight is shared with
            another module (tied weights: the merge would change that module too); the call is
            inside ``with rankwise.disabled(model)`` or ``rankwise.per_example``; or a merged adapter
            changed since its merge.
        TypeError: a base layer is quantized (bitsandbytes, torchao): ``W0 + ΔW`` cannot be written
            into its weight; :func:`unwrap` with ``merge=True`` gives a float model instead.
    """
    return _set_merged(model, True)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore every base weight (within the dtype's rounding).

    Raises:
        ValueError: an adapter changed while merged (an optimizer step, a load, a direct write):
            the base weight holds the ΔW of its values at merge, so subtracting the new ΔW would
            leave it off. Nothing is written.
    """
    return _set_merged(model, False)


def unwrap(model: nn.Module, merge: bool = True, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Remove the wrappers: the plain model back, with its original module types and keys.

    A quantized model (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, torchao int8 weights) comes
    back as a float model with ``merge=True``, the way a QLoRA result ships: a quantized base
    cannot hold ``W0 + ΔW``, so each adapted one becomes an ``nn.Linear`` of weight ``Ŵ0 + ΔW``
    (``Ŵ0`` its dequantized weight, the sum computed in fp32) and its bias, and every other
    quantized linear an ``nn.Linear`` of ``Ŵ0``, all in ``dtype``. A transformers model also loses
    its record of the quantization (``hf_quantizer``, ``config.quantization_config``), so that
    ``save_pretrained`` writes a float checkpoint and ``.to(dtype)`` works. With ``merge=False``
    the quantized layers come back as they were.

    Args:
        merge: fold the adapters into the weights first; ``False`` drops them, restoring the base
            weights if they were merged.
        dtype: the dtype of the ``nn.Linear`` layers that replace quantized ones (e.g.
            ``torch.bfloat16``); default: the dtype each was quantized from (fp32 for bitsandbytes
            8-bit, which does not record it). The rest of the model keeps its dtypes (cast it with
            ``.to(dtype)`` to ship one dtype).

    Parameters stay frozen as :func:`adapt` left them; call ``requires_grad_(True)`` to train them.

    Raises:
        ValueError: as :func:`merge` (``merge=True``) or :func:`unmerge` (``merge=False``) would; a
            ``dtype`` with ``merge=False`` or on a model with no quantized layer.
        TypeError: ``merge=True`` on a model holding a quantized layer rankwise cannot read (it
            could not return a float model). Nothing is changed.
    """
    layers = list(adapted_modules(model))
    quantized_paths = [  # outside the wrappers (an Adapted's weight is its base's)
        path for path, m in targets.outer_modules(model) if not isinstance(m, Adapted) and quantized.is_quantized(m)
    ]
    quantized_bases = [(path, layer) for path, layer in layers if quantized.is_quantized(layer.base)]
    if dtype is not None and not (merge and (quantized_paths or quantized_bases)):
        raise ValueError(
            "unwrap(dtype=...) sets the dtype of the float layers that replace quantized ones when merging; "
            + ("this model has no quantized layer" if merge else "merge=False keeps the quantized layers")
        )
    replacements: dict[str, nn.Module] = {}
    if merge:  # every float replacement computed (and checked) before anything changes
        _check_not_disabled([(path, layer) for path, layer in quantized_bases if layer.active])
        for path in quantized_paths:  # not adapted: Ŵ0 as it is
            module = model.get_submodule(path)
            try:
                quantized.scheme(module, path)
            except TypeError as error:
                raise TypeError(f"unwrap(merge=True) returns a float model: {error}; nothing was changed") from None
            replacements[path] = quantized.float_linear(module, quantized.dequantized(module), dtype)
        for path, layer in quantized_bases:
            try:
                weight = layer.merged_weight() if layer.active else quantized.dequantized(layer.base)
                replacements[path] = quantized.float_linear(layer.base, weight, dtype)
            except ValueError as error:
                raise ValueError(f"'{path}': {error}; nothing was changed") from error
    _set_merged(model, merge, [(path, layer) for path, layer in layers if path not in replacements])
    for path, layer in layers:
        model = replace_module(model, path, replacements.pop(path, layer.base))
    for path, replacement in replacements.items():
        model = replace_module(model, path, replacement)
    if merge and (quantized_paths or quantized_bases):
        quantized.drop_transformers_record(model)
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model behaves as its base model (e.g. a DPO reference pass).

    Raises:
        ValueError: the adapters are merged (the base weights are not there to run), or the model
            has ``trainable`` modules (they are trained in place, so the base model's are gone).
    """
    layers = [layer for _, layer in adapted_modules(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("cannot disable merged adapters; call rankwise.unmerge(model) first")
    _refuse_trainable_as_base(model, "rankwise.disabled")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.disabled = state


@contextmanager
def per_example(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block each example of a batch runs with its own adapter: ``names[i]`` for row
    ``i`` of the batch (dim 0 of each adapted layer's input, also for a Conv2d), ``None`` for the
    base model. Each layer groups the rows by name and runs each adapter once on its rows, so an
    example's output is what it would be alone with that adapter active (up to float rounding).
    The active adapters are set aside inside the block. For inference: the adapters' parameters
    get gradients only through their own rows.

    Raises:
        ValueError: a name the model does not hold, a merged model, or a ``None`` row in a model
            with ``trainable`` modules (:func:`disabled`), before any forward; in the forward, an
            adapted layer whose batch differs from ``len(names)`` (both numbers named).
        TypeError: ``names`` is a string, not one name per example.
    """
    if isinstance(names, str):
        raise TypeError(f"per_example needs one adapter name (or None) per example, got the string {names!r}")
    rows = list(names)
    known = adapter_names(model)
    unknown = sorted({n for n in rows if n is not None and n not in known}, key=str)
    if unknown:
        raise ValueError(f"per_example: unknown adapter names {unknown}; the model holds {known}")
    if None in rows:
        _refuse_trainable_as_base(model, "rankwise.per_example with a None row (the base model)")
    layers = [layer for _, layer in adapted_modules(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("per_example needs unmerged adapters; call rankwise.unmerge(model) first")
    # One index tensor per distinct name (not per example), moved once per device.
    indices = {n: torch.tensor([i for i, m in enumerate(rows) if m == n]) for n in dict.fromkeys(rows) if n is not None}
    on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
    previous = [layer.rows for layer in layers]
    for layer in layers:
        device = layer.weight.device
        groups = {}
        for name, index in indices.items():
            if name in layer.adapters:
                groups[name] = on_device.setdefault((name, device), index.to(device))
        layer.rows = (len(rows), groups)
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.rows = state


def _refuse_trainable_as_base(model: nn.Module, what: str) -> None:
    # The trainable modules (a new head, say) are trained in place and shared by every adapter; no
    # copy of the base model's is kept, so turning the adapters off would still run them as trained.
    head = model_trainable(model)
    if head:
        raise ValueError(
            f"{what} cannot run the base model: its trainable modules {list(head)} are trained in place and "
            "no base copy of them is kept; run a separate copy of the base model instead (for a DPO "
            "reference, one loaded before rankwise.adapt)"
        )


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
        f.name: value for f in dataclasses.fields(own) if (value := getattr(own, f.name)) != getattr(shared, f.name)
    }


def _set_merged(model: nn.Module, merged: bool, layers: list[tuple[str, Adapted]] | None = None) -> nn.Module:
    # Two passes: check every layer and every new weight first, write only when all pass.
    layers = list(adapted_modules(model)) if layers is None else layers
    if merged:
        _check_not_quantized(layers)
    for path, layer in layers:
        _check_unchanged_since_merge(path, layer)
    # A layer with no active adapter has nothing to merge.
    layers = [(path, layer) for path, layer in layers if layer.merged != merged and (layer.active or not merged)]
    if merged and layers:
        _check_not_disabled(layers)
        _check_untied(model, layers)
    compute, write = (Adapted.merged_weight, Adapted.merge) if merged else (Adapted.restored_weight, Adapted.unmerge)
    for path, layer in layers:
        try:
            compute(layer)
        except ValueError as error:
            raise ValueError(f"'{path}': {error}; no weight was changed") from error
    for _, layer in layers:
        write(layer)
    return model


def _check_not_disabled(layers: list[tuple[str, Adapted]]) -> None:
    # Inside either block the layers do not run their active adapters (the base model, or each row
    # its own adapter), which a merge would fold in: the block's forward would silently change.
    for block, inside in (
        ("disabled(model)", [path for path, layer in layers if layer.disabled]),
        ("per_example(model, names)", [path for path, layer in layers if layer.rows is not None]),
    ):
        if inside:
            raise ValueError(
                f"cannot merge inside `with rankwise.{block}` ({inside} are in it); "
                "merge after the block; no weight was changed"
            )


def _check_not_quantized(layers: list[tuple[str, Adapted]]) -> None:
    for path, layer in layers:
        if quantized.is_quantized(layer.base):
            raise TypeError(
                f"cannot merge into '{path}': its base weight is quantized "
                f"({quantized.scheme(layer.base, path)}), which cannot hold W0 + ΔW without re-quantizing "
                "it and losing most of the adapter's update. Keep the adapter unmerged (the adapted model "
                "runs as it is), or call rankwise.unwrap(model, merge=True, dtype=torch.bfloat16) for a float "
                "model with the adapters merged into the dequantized weights; no weight was changed"
            )


def _check_unchanged_since_merge(path: str, layer: Adapted) -> None:
    # Parameters only: they are what an optimizer step or a load changes. Buffers hold constants
    # and counts, and a method whose ΔW follows a count (SingLoRA's step) keeps its merge-time value.
    if layer.merged_adapters is None:
        return
    one = len(layer.merged_adapters) == 1
    changed = []
    for name, then in layer.merged_adapters.items():
        now = dict(layer.adapters[name].named_parameters())
        keys = set(now) ^ set(then) | {k for k, v in then.items() if k in now and not torch.equal(now[k], v.to(now[k]))}
        changed += [f"{'delta' if one else f'adapters.{name}'}.{k}" for k in sorted(keys)]
    if changed:
        put_back = (
            "layer.delta.load_state_dict(layer.merged_adapter, strict=False)"
            if one
            else "for name, values in layer.merged_adapters.items(): layer.adapters[name].load_state_dict(values, "
            "strict=False)"
        )
        raise ValueError(
            f"'{path}': the adapter changed while merged ({', '.join(changed)}); the base weight holds "
            f"the ΔW of its values at merge, so unmerging now would leave the base weight off. Put them "
            f"back (layer = model.get_submodule({path!r}); {put_back}), then "
            "unmerge; train and edit adapters unmerged. No weight was changed"
        )


def _check_untied(model: nn.Module, layers: list[tuple[str, Adapted]]) -> None:
    """Refuse to merge a base weight that another module shares: the in-place write would reach it."""
    shared = shared_tensors(model)
    paths: dict[int, list[str]] = {}  # a layer registered twice is one layer, merged once
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    for path, layer in layers:
        own = {_key(p, "base.weight") for p in paths[id(layer)]}
        others = set().union(*(shared.get(name, set()) for name in own)) - own
        if others:
            raise ValueError(
                f"cannot merge '{path}': its weight is shared with {sorted(others)} (tied weights), so the merge "
                f"would add its ΔW to them too. Keep this adapter unmerged, or untie the layer first (base = "
                f"model.get_submodule({path!r}).base; base.weight = nn.Parameter(base.weight.detach().clone()); in a "
                "transformers model also config.tie_word_embeddings = False, which records it); "
                "no weight was changed"
            )


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def base_of(module: nn.Module) -> nn.Module:
    """The layer under a wrapper (an adapter added beside others is built for it), else the module."""
    return module.base if isinstance(module, Adapted) else module


def model_trainable(model: nn.Module) -> tuple[str, ...]:
    """The ``trainable`` modules of an adapted model: those its first adapter named (an added one
    names none, :func:`check_can_add`; :func:`delete_adapter` hands them on), trained in full and
    shared by all its adapters."""
    return next((c.trainable for _, layer in adapted_modules(model) for c in layer.configs.values() if c.trainable), ())


def trainable_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the modules ``config.trainable`` selects (outermost matches only)."""
    return targets.outermost_matches(dict(targets.outer_modules(model)), config.trainable)
