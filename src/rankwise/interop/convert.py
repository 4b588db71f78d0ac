"""``to_peft`` and ``from_peft``: PEFT's files from the table in :mod:`.formats`, checked both ways.

PEFT writes ``adapter_model.safetensors`` (keys ``base_model.model.<path>.<PEFT's tensor name>``)
and ``adapter_config.json`` (``peft_type`` and that type's fields). Nothing here names a method.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core import geometry
from ..core.adapted import DEFAULT, Adapted
from ..core.checkpoint import CheckpointError, adapter_layers, uncompiled, write_files
from ..core.config import AdapterConfig, matches
from ..core.inject import (
    adapted_modules,
    adapter_names,
    add_wrappers,
    base_of,
    build,
    check_can_add,
    check_name,
    find_targets,
    install_wrappers,
    model_trainable,
    module_overrides,
    trainable_paths,
)
from ..core.ties import shared_tensors
from .formats import _ANY_TYPE, FORMATS, PeftFormat

PEFT_TENSORS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def to_peft(model: nn.Module, folder: str | os.PathLike, name: str | None = None) -> Path:
    """Write the adapter of ``model`` in PEFT's format to ``folder``; returns the folder.

    Args:
        name: the adapter to write in ``folder``. ``None`` writes a model's only adapter in
            ``folder``, and each adapter of a model with several in ``folder/<its name>/`` (the
            layout ``rankwise.save_adapter`` writes; PEFT loads each with ``load_adapter(path,
            adapter_name=name)``).

    An adapted embedding's base weight is written too, as PEFT's ``save_pretrained`` writes it
    (``save_embedding_layers``). On a merged model it is the weight ``rankwise.unmerge`` would
    restore (bit for bit what an export after ``unmerge`` writes), never the merged one, which
    PEFT would add ``ΔW`` to a second time. PEFT keeps its own copy of each module in
    ``modules_to_save``; where a trainable module shares a tensor with another module (an LM head
    tied to the embedding), that module is saved too, so that PEFT's copies hold what both hold here.

    Raises:
        ValueError: the model has no adapters, its method has no PEFT form, PEFT does not support
            one of its layers or would compute one differently (LoRA on a dilated ``nn.Conv2d``:
            PEFT's conv layer leaves out the dilation), its layers differ in a way PEFT cannot
            express, or a trainable module shares a tensor with an adapted layer. Nothing is written.
    """
    model = uncompiled(model)
    names = adapter_names(model)
    if name is None and len(names) > 1:
        for each in names:  # all checked before any is written: a refusal writes nothing
            _peft_format(model, adapter_layers(model, each))
        for each in names:
            to_peft(model, Path(folder) / each, each)
        return Path(folder)
    layers = adapter_layers(model, name)
    fmt = _peft_format(model, layers)
    # The model's trainable modules (a head given with its first adapter) are trained with every
    # adapter: each adapter's export carries them, or it would load onto an untrained head.
    config = dataclasses.replace(layers[0][1].config, trainable=model_trainable(model))
    trainable = trainable_paths(model, config)
    tied = _tied_modules(model, trainable, [path for path, _ in layers])
    peft_config = {
        "peft_type": fmt.peft_type,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "target_modules": _peft_targets(model, [path for path, _ in layers]),
        "modules_to_save": [*config.trainable, *tied] or None,
        "bias": "none",
        **fmt.write(config, any(layer.kind == "conv1d" for _, layer in layers)),
        **_write_patterns(fmt, config, layers),
    }
    tensors = {
        f"{_PREFIX}{path}.{name}": t.detach().reshape(shape)
        for path, layer in layers
        for name, (t, shape) in fmt.tensors(layer).items()
    }
    for path in [*trainable, *tied]:
        for name, tensor in model.get_submodule(path).state_dict().items():
            tensors[f"{_PREFIX}{path}.{name}"] = tensor.detach()
    installed = dict(adapted_modules(model))
    for path, layer in layers:  # as PEFT's save_pretrained does by default for an adapted embedding
        if layer.kind == "embedding":
            # The base weight W0, read from the model's layer: while merged it holds W0 + ΔW of the
            # merged adapters (any of them, not only this one), which that layer alone knows how to
            # undo; the view is built unmerged, so its restored weight would be the merged one.
            restored = installed[path].restored_weight()
            weight = geometry.as_weight(restored, layer.kind, tuple(layer.weight.shape))
            tensors[f"{_PREFIX}{path}.base_layer.weight"] = weight
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_files(
        {
            folder / PEFT_TENSORS: safetensors.torch.save(state),
            folder / PEFT_CONFIG: (json.dumps(peft_config, indent=2) + "\n").encode(),
        }
    )
    return folder


def from_peft(model: nn.Module, folder: str | os.PathLike, name: str = DEFAULT) -> nn.Module:
    """Adapt ``model`` with the PEFT adapter in ``folder`` and load its weights; on a model that
    has adapters already, add it as the adapter ``name`` (inactive, as ``rankwise.adapt`` adds one).
    PEFT saves each adapter but its ``"default"`` in a subfolder named after it: load each folder.

    Everything is read and checked before the model changes. The weight PEFT saves with an
    embedding it adapts (``save_embedding_layers``) is loaded into the base embedding, as PEFT
    loads it; when adding an adapter it must equal the model's (the base is the other adapters'
    too), and nothing is written into it. Names in ``modules_to_save`` that
    match no module of the model are skipped, as PEFT skips them (a sequence-classification
    adapter lists both ``classifier`` and ``score``); tensors saved for them are still refused.

    Raises:
        CheckpointError: missing or unreadable files, a PEFT type or option rankwise does not
            model, targets ``rankwise.adapt`` would refuse (when adding, also a target that is,
            holds or lies in one of the model's trainable modules), tensors that do not fit the
            model (all listed), a target PEFT's layer computes differently from rankwise's (LoRA
            on a dilated ``nn.Conv2d``), or a module to save whose tensor this model shares with
            another module (PEFT loads into a copy of it); when adding an adapter, an embedding base weight
            that differs from the model's.
        ValueError: as ``rankwise.adapt`` adding an adapter: a taken name, a merged model, or
            ``modules_to_save`` (they are the model's: give them with its first adapter).
    """
    folder = Path(folder)
    check_name(name)
    compiled, model = model, uncompiled(model)
    meta = _read_json(folder / PEFT_CONFIG)
    fmt = _format_of(meta, folder)
    paths = [path for path, _ in model.named_modules() if path]
    present = [name for name in meta.get("modules_to_save") or () if any(matches(path, name) for path in paths)]
    config = _config_from_peft(fmt, meta, folder, present)
    try:
        tensors = safetensors.torch.load_file(folder / PEFT_TENSORS)
    except Exception as error:  # safetensors' own error type for a malformed file; OSError if absent
        raise CheckpointError(f"{folder / PEFT_TENSORS} is missing or not a safetensors file: {error}") from None
    adding = any(True for _ in adapted_modules(model))
    saved_modules = config.trainable
    if adding:
        # Modules to save that are the model's own trainable ones (to_peft writes them with each
        # adapter) are checked equal below, not written; any others are refused by check_can_add.
        if config.trainable and set(config.trainable) == set(model_trainable(model)):
            config = dataclasses.replace(config, trainable=())
        check_can_add(model, config, name)
    try:
        paths = find_targets(model, config, adapted=adding)
        for path in paths:  # before any wrapper is built: PEFT's model would differ from the one we build
            _check_applied(fmt, path, base_of(model.get_submodule(path)))
        wrappers = {path: build(model, path, config, _layer_config(fmt, config, meta, path), name) for path in paths}
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{folder}: {error}") from None

    targets = {
        f"{_PREFIX}{path}.{name}": pair
        for path, wrapper in wrappers.items()
        for name, pair in fmt.tensors(wrapper).items()
    }
    for path, wrapper in wrappers.items():
        # PEFT saves the weight of an embedding it adapts (save_embedding_layers, on by default
        # there, for a resized vocabulary) and loads it into the base layer: so does this.
        key = f"{_PREFIX}{path}.base_layer.weight"
        if wrapper.kind == "embedding" and key in tensors:
            targets[key] = (wrapper.weight, tuple(wrapper.weight.shape))
    trainable = trainable_paths(model, dataclasses.replace(config, trainable=saved_modules))
    for path in trainable:
        for key, tensor in model.get_submodule(path).state_dict().items():
            targets[f"{_PREFIX}{path}.{key}"] = (tensor, tuple(tensor.shape))
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    misshaped = sorted(k for k in set(targets) & set(tensors) if tuple(tensors[k].shape) != targets[k][1])
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{folder / PEFT_TENSORS} does not fit this model: missing keys {missing}, unexpected keys "
            f"{unexpected}, mis-shaped keys {misshaped}"
        )
    _check_saved_modules_untied(model, trainable, tensors, folder)
    # Beside other adapters the base is theirs too: loading another embedding weight would change
    # the model they run, so it must be the one the model holds already (then nothing is written).
    shared = [key for key in targets if adding and key.endswith(".base_layer.weight")]
    if adding and saved_modules and not config.trainable:  # the model's own trainable modules
        shared += [f"{_PREFIX}{path}.{key}" for path in trainable for key in model.get_submodule(path).state_dict()]
    differ = [key for key in shared if not torch.equal(tensors[key].to(targets[key][0]), targets[key][0])]
    if differ:
        raise CheckpointError(
            f"{folder / PEFT_TENSORS} holds base or trainable-module tensors {differ} that differ from the model's; "
            f"adding adapter {name!r} would change them under the adapters the model holds "
            f"({adapter_names(model)}). Load it into the base model alone, or into one that holds these values"
        )
    installed = add_wrappers(model, wrappers, name) if adding else install_wrappers(model, wrappers, config)
    with torch.no_grad():
        for key, (target, _) in targets.items():
            if key not in shared:
                target.copy_(tensors[key].reshape(target.shape))
    return compiled if installed is model else installed


def _peft_format(model: nn.Module, layers: list[tuple[str, Adapted]]) -> PeftFormat:
    """The PEFT format of the adapter these layers (views, one adapter each) hold.

    Raises:
        ValueError: its method has no PEFT form, or PEFT does not support one of its layers or
            would compute one differently.
    """
    config = layers[0][1].config
    fmt = FORMATS.get(type(config))
    if fmt is None:
        supported = [f.config_class.method for f in FORMATS.values()]
        raise ValueError(f"PEFT export supports {supported}, not {config.method!r}; see docs/interop.md")
    for path, layer in layers:
        if layer.kind not in fmt.bases:
            raise ValueError(
                f"PEFT's {fmt.peft_type} does not support {type(layer.base).__name__} ('{path}'); "
                f"it supports {sorted(fmt.bases)}"
            )
        _check_applied(fmt, path, layer.base)
    return fmt


def _check_applied(fmt: PeftFormat, path: str, base: nn.Module) -> None:
    """Both directions: a layer PEFT's layer for ``fmt`` would compute differently is refused.

    Raises:
        ValueError: ``base`` has an attribute PEFT's layer leaves out (``PeftFormat.unapplied``).
    """
    unapplied = fmt.unapplied(base)
    if unapplied:
        found = ", ".join(f"{key}={value}" for key, value in unapplied.items())
        raise ValueError(
            f"'{path}': PEFT's {fmt.peft_type} layer for {type(base).__name__} does not apply the base layer's "
            f"{found}, so PEFT would compute another output than rankwise; leave this layer out of the targets"
        )


def _tied_modules(model: nn.Module, trainable: list[str], adapted: list[str]) -> list[str]:
    """Modules outside ``trainable`` that share a tensor with it (and so on), which PEFT must save too.

    Raises:
        ValueError: a shared tensor belongs to an adapted layer (PEFT's layer would keep the base
            model's value) or to the model itself (not a module PEFT can save).
    """
    shared = shared_tensors(model)
    modules = list(trainable)
    for path in modules:  # grows while it is read: what the added modules share is saved too
        for name in model.get_submodule(path).state_dict():
            for partner in sorted(shared.get(f"{path}.{name}", ())):
                owner = partner.rpartition(".")[0]
                if _inside(partner, modules):
                    continue
                if not owner or _inside(partner, adapted):
                    raise ValueError(
                        f"trainable '{path}' shares '{name}' with '{partner}'; PEFT would load it into its own copy "
                        f"of '{path}' and leave '{partner}' as in the base model. Untie them before rankwise.adapt"
                    )
                modules.append(owner)
    return modules[len(trainable) :]


def _check_saved_modules_untied(
    model: nn.Module, trainable: list[str], tensors: dict[str, torch.Tensor], folder: Path
) -> None:
    """PEFT loads ``modules_to_save`` into copies of them; loading here writes the model's own
    tensors, which is the same only where no other module shares them, or where every module
    sharing one is saved with the same values."""
    shared = shared_tensors(model)
    for path in trainable:
        for name in model.get_submodule(path).state_dict():
            key = f"{path}.{name}"
            for partner in sorted(shared.get(key, ())):
                if not _inside(partner, trainable):
                    raise CheckpointError(
                        f"{folder}: PEFT keeps its own copy of modules_to_save '{path}', but in this model '{key}' "
                        f"is tied to '{partner}', which loading would change too. Untie it first (module = "
                        f"model.get_submodule({path!r}); module.{name} = nn.Parameter(module.{name}.detach().clone()); "
                        "in a transformers model also config.tie_word_embeddings = False, which records it)"
                    )
                if not torch.equal(tensors[_PREFIX + key], tensors[_PREFIX + partner]):
                    raise CheckpointError(
                        f"{folder}: modules_to_save '{key}' and '{partner}' hold different values, but this model "
                        "ties them to one tensor; untie them first"
                    )


def _inside(path: str, modules: list[str]) -> bool:
    return any(path.startswith(f"{module}.") for module in modules)


def _peft_targets(model: nn.Module, paths: list[str]) -> list[str] | str:
    """The adapted paths as PEFT's ``target_modules``. PEFT, like rankwise, also selects every path
    that ends in ``.<name>``; where that would catch a layer we did not adapt ('1.0' for '0'), a
    regular expression (PEFT matches a string against the whole path) selects exactly ours."""
    adapted, inside = set(paths), tuple(f"{path}." for path in paths)  # inside: a wrapper's own children
    others = [name for name, _ in model.named_modules() if name not in adapted and not name.startswith(inside)]
    if any(name.endswith(f".{path}") for name in others for path in paths):
        return "|".join(re.escape(path) for path in paths)
    return paths


def _write_patterns(fmt: PeftFormat, config: AdapterConfig, layers: list[tuple[str, Adapted]]) -> dict[str, Any]:
    """PEFT's default and ``{path: value}`` overrides for each per-layer field.

    Raises:
        ValueError: a layer differs in a field PEFT has no pattern for, or PEFT would resolve a
            path to another layer's value.
    """
    expressible = {p.field for p in fmt.patterns}
    for path, layer in layers:
        other = sorted(set(module_overrides(layer)) - expressible)
        if other:
            raise ValueError(
                f"'{path}' differs from the shared config in {other}; PEFT's {fmt.peft_type} can vary "
                f"only {sorted(expressible)} per layer"
            )
    fields: dict[str, Any] = {}
    for p in fmt.patterns:
        values = {path: p.value(layer) for path, layer in layers}
        default = getattr(config, p.field)
        if default is None:  # a per-layer rule (C3A's gcd): the commonest value is the default
            default = Counter(values.values()).most_common(1)[0][0]
        pattern = {path: value for path, value in values.items() if value != default}
        wrong = [path for path, value in values.items() if _resolve(pattern, path, p.key_regex, default) != value]
        if wrong:
            raise ValueError(
                f"PEFT's {p.peft_pattern} {pattern} cannot give {wrong} their own {p.field}: "
                f"PEFT would read another layer's key for them"
            )
        fields[p.peft_field], fields[p.peft_pattern] = default, pattern
    return fields


def _resolve(pattern: dict[str, Any], path: str, key_regex: str, default: Any = None) -> Any:
    """PEFT's value for ``path``: the first key whose regex matches, else the exact path, else ``default``."""
    key = next((k for k in pattern if re.match(key_regex.format(k), path)), path)
    return pattern.get(key, default)


def _plain(value: Any) -> Any:
    return None if value in ({}, []) else value


def _format_of(meta: dict[str, Any], folder: Path) -> PeftFormat:
    peft_type = meta.get("peft_type")
    candidates = [f for f in FORMATS.values() if f.peft_type == peft_type]
    if not candidates:
        known = sorted({f.peft_type for f in FORMATS.values()})
        raise CheckpointError(f"{folder}: PEFT type {peft_type!r} is not supported; rankwise reads {known}")
    for fmt in candidates:
        if all(_plain(meta.get(k)) in values for k, values in fmt.variant.items()):
            return fmt
    found = {k: meta.get(k) for f in candidates for k in f.variant}
    allowed = {f.config_class.method: f.variant for f in candidates}
    raise CheckpointError(f"{folder}: PEFT {peft_type} with {found} has no rankwise form; rankwise reads {allowed}")


def _config_from_peft(fmt: PeftFormat, meta: dict[str, Any], folder: Path, trainable: list[str]) -> AdapterConfig:
    modelled = {**_ANY_TYPE, **fmt.refused}
    unsupported = {k: meta[k] for k, values in modelled.items() if _plain(meta.get(k, values[0])) not in values}
    if unsupported:
        raise CheckpointError(f"{folder}: PEFT options rankwise does not model: {unsupported}")
    targets = meta.get("target_modules")
    # PEFT reads a string as a regular expression matched against the whole path, a list as names.
    targets = (f"re:{targets}",) if isinstance(targets, str) else tuple(targets or ())
    try:
        return fmt.config_class(**fmt.read(meta), targets=targets, trainable=tuple(trainable))
    except KeyError as error:
        raise CheckpointError(f"{folder / PEFT_CONFIG}: {fmt.peft_type} field {error} is missing") from None
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{folder / PEFT_CONFIG}: {error}") from None


def _layer_config(fmt: PeftFormat, config: AdapterConfig, meta: dict[str, Any], path: str) -> AdapterConfig:
    """The layer's own config: PEFT's ``*_pattern`` values for ``path``, resolved as PEFT does."""
    changes = {}
    for p in fmt.patterns:
        value = _resolve(meta.get(p.peft_pattern) or {}, path, p.key_regex)
        if value is not None:
            changes[p.field] = p.cast(value)
    return type(config).from_dict({**config.to_dict(), **changes}) if changes else config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
