"""Adapter checkpoints: ``adapter.safetensors`` + ``adapter_config.json``, validated before any copy.

Format (``format_version`` 1)::

    adapter_config.json = {
      "format": "rankwise-adapter", "format_version": 1, "rankwise_version": "0.1.0",
      "method": "lora", "config": {...the config's fields...},
      "modules": {"<path>": {"base": "linear", "in_features": 64, "out_features": 64,
                             "weight_shape": [64, 64],
                             "config": {...fields that differ for this layer, e.g. its rank...}}},
      "trainable_modules": ["<path>", ...],
      "tensors_sha256": "<hex digest of adapter.safetensors>"
    }
    adapter.safetensors = {"<path>.delta.<name>": tensor, "<trainable path>.<name>": tensor}

No pickle: tensors are safetensors, everything else JSON.

``weight_shape`` is the base weight's shape in its layer's layout (``[out, in, kh, kw]`` for a
``Conv2d``, whose ``in_features`` is ``in·kh·kw``): a load compares it, so that an update saved on
one kernel is not applied to another with the same flattened size. Checkpoints written before
it was recorded lack it; they load as before, checked on ``base``, ``in_features`` and
``out_features`` only.

A model with several named adapters saves each in this format: ``save_adapter(model, folder,
name="b")`` writes adapter ``b`` in ``folder`` (its keys ``<path>.delta.<name>`` as a one-adapter
model's, so either loads as the other); ``save_adapter(model, folder)`` writes one subfolder per
adapter, ``folder/<adapter name>/``, as PEFT does for its non-default adapters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ..version import __version__
from . import geometry, registry
from .adapted import DEFAULT, Adapted
from .config import AdapterConfig
from .inject import (
    adapted_modules,
    adapter_names,
    add_wrappers,
    base_of,
    build,
    check_can_add,
    check_name,
    install_wrappers,
    model_trainable,
    module_overrides,
    trainable_paths,
)
from .targets import check_paths

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "rankwise-adapter"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """An adapter checkpoint that is unreadable or does not fit the model."""


def uncompiled(model: nn.Module) -> nn.Module:
    """The model ``torch.compile`` wrapped, whose module paths a checkpoint records; else ``model``.

    A compiled model's paths start with ``_orig_mod.``; a checkpoint saved with them would not load
    into the plain model, nor the other way round.
    """
    # torch.compile imports torch._dynamo: while it is not imported, no model is compiled, and
    # importing it here would cost every save a second.
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
        return model._orig_mod
    return model


def adapter_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, Adapted]]:
    """The layers holding the adapter ``name``, each as a view with that adapter alone
    (:meth:`Adapted.view`); ``name=None`` means the model's only adapter.

    Raises:
        ValueError: the model has no adapters, none named ``name``, or several and no name given.
    """
    model = uncompiled(model)
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no rankwise adapters; call rankwise.adapt first")
    if name is None:
        if len(names) > 1:
            raise ValueError(f"the model holds the adapters {names}; name one (name=...)")
        name = names[0]
    if name not in names:
        raise ValueError(f"unknown adapter name {name!r}; the model holds {names}")
    return [(path, layer.view(name)) for path, layer in adapted_modules(model) if name in layer.adapters]


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The tensors an adapter checkpoint holds: the adapter's tensors under ``<path>.delta.``, and
    the trainable modules'.

    Args:
        name: which adapter; ``None`` for the model's only one.

    Raises:
        ValueError: as :func:`adapter_layers`.
    """
    model = uncompiled(model)
    layers = adapter_layers(model, name)
    config = _saved_config(model, layers)
    state = {_key(path, "delta", key): t for path, layer in layers for key, t in layer.delta.state_dict().items()}
    for path in trainable_paths(model, config):
        state.update({_key(path, key): t for key, t in model.get_submodule(path).state_dict().items()})
    return state


def save_adapter(model: nn.Module, folder: str | os.PathLike, name: str | None = None) -> Path:
    """Write the adapter of ``model`` to ``folder`` (created if needed); returns the folder.

    Both files are written in full before either replaces an old one (:func:`write_files`), so a
    save that fails leaves the previous checkpoint in ``folder`` as it was. The paths recorded are
    the model's own, also for a model wrapped by ``torch.compile``.

    A folder holds one layout: a save of either layout into a folder holding the other's files is
    refused, since those would stay beside the new ones and :func:`load_adapter` could not tell
    which save is current.

    Args:
        name: the adapter to write in ``folder``. ``None`` writes a model's only adapter in
            ``folder``, and each adapter of a model with several in ``folder/<its name>/``.

    Raises:
        ValueError: the model has no adapters, or none named ``name``.
        CheckpointError: ``folder`` holds the other layout's checkpoint (one adapter's files, or
            adapter subfolders). Nothing is written.
    """
    model = uncompiled(model)
    folder = Path(folder)
    names = adapter_names(model)
    files, subfolders = _layouts(folder)
    if name is None and len(names) > 1:
        if files:
            raise CheckpointError(
                f"{folder} holds a one-adapter checkpoint ({', '.join(files)}); the adapters {names} would be "
                "written beside it, one per subfolder, and loading the folder could not tell which save is "
                f"current. Save to another folder, or remove {', '.join(files)} from it first"
            )
        for each in names:
            save_adapter(model, folder / each, each)
        return folder
    if subfolders:
        raise CheckpointError(
            f"{folder} holds adapters in the subfolders {list(subfolders)}; one adapter's files would be written "
            "beside them, and loading the folder could not tell which save is current. Save to another folder, "
            "or remove those subfolders from it first"
        )
    layers = adapter_layers(model, name)
    state = {k: _full(t).detach().to("cpu").contiguous().clone() for k, t in adapter_state_dict(model, name).items()}
    config = _saved_config(model, layers)
    tensors = safetensors.torch.save(state)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rankwise_version": __version__,
        "method": config.method,
        "config": config.to_dict(),
        "modules": {
            path: {
                "base": layer.kind,
                "in_features": layer.delta.in_features,
                "out_features": layer.delta.out_features,
                "weight_shape": list(geometry.weight_shape(layer.base)),
                "config": _jsonable(module_overrides(layer)),
            }
            for path, layer in layers
        },
        "trainable_modules": sorted(trainable_paths(model, config)),
        "tensors_sha256": hashlib.sha256(tensors).hexdigest(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    # The JSON last: it holds the tensors' checksum, so it is the commit (see write_files).
    write_files({folder / TENSORS_FILE: tensors, folder / CONFIG_FILE: (json.dumps(meta, indent=2) + "\n").encode()})
    return folder


def saved_adapters(folder: str | os.PathLike) -> dict[str, Path]:
    """The adapter checkpoints in ``folder``: ``{"": folder}`` for one written there, else each
    subfolder holding one, by name (the layout :func:`save_adapter` writes for several adapters).

    Raises:
        CheckpointError: ``folder`` holds both layouts (left by saves from before they were refused):
            which one is current cannot be told.
    """
    folder = Path(folder)
    files, subfolders = _layouts(folder)
    if files and subfolders:
        raise CheckpointError(
            f"{folder} holds both a one-adapter checkpoint ({', '.join(files)}) and adapters in the subfolders "
            f"{list(subfolders)}, from two saves; which is current cannot be told. Load a subfolder by its path, "
            f"or move the older save's files out of {folder}"
        )
    if CONFIG_FILE in files:
        return {"": folder}
    return subfolders


def _layouts(folder: Path) -> tuple[list[str], dict[str, Path]]:
    """The one-adapter checkpoint files in ``folder`` (either file counts: a save interrupted by a
    crash may leave one) and its subfolders holding an adapter checkpoint, by name."""
    if not folder.is_dir():
        return [], {}
    files = [name for name in (CONFIG_FILE, TENSORS_FILE) if (folder / name).is_file()]
    subfolders = {sub.name: sub for sub in sorted(folder.iterdir()) if (sub / CONFIG_FILE).is_file()}
    return files, subfolders


def read_adapter_config(folder: str | os.PathLike) -> tuple[dict[str, Any], AdapterConfig]:
    """The parsed ``adapter_config.json`` and the config it holds; ``CheckpointError`` if invalid."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    required = ("format", "format_version", "method", "config", "modules", "trainable_modules", "tensors_sha256")
    absent = [key for key in required if not isinstance(meta, dict) or key not in meta]
    if absent:
        raise CheckpointError(f"{path} lacks the fields {absent}; is it a rankwise adapter?")
    if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {meta['format']!r} version {meta['format_version']!r} is not "
            f"{FORMAT!r} version {FORMAT_VERSION}"
        )
    _check_types(meta, path)
    try:
        config = registry.get(meta["method"]).config_class.from_dict(meta["config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None
    return meta, config


def load_adapter(model: nn.Module, folder: str | os.PathLike, name: str = DEFAULT) -> nn.Module:
    """Adapt a base ``model`` as the checkpoint in ``folder`` says and load its tensors; on a model
    that has adapters already, add it as the adapter ``name`` (inactive, as :func:`rankwise.adapt`
    adds one).

    The whole checkpoint is read and checked against the model before anything is changed.

    Args:
        name: the name the adapter gets in the model.

    Raises:
        CheckpointError: a missing, truncated or corrupted file; an unknown method or config key;
            layers the model lacks or whose shapes differ (a convolution's kernel size too); layers
            ``rankwise.adapt`` would refuse (one registered at two paths, one that is, holds or lies
            in a trainable module: the model's own when adding); missing, unexpected or mis-shaped
            tensors (all of them listed); a folder holding several adapters (one per subfolder:
            load each by its folder), or both a one-adapter checkpoint and adapter subfolders.
        ValueError: the model holds an adapter ``name`` already, is merged, or the checkpoint has
            trainable modules and the model has adapters (those modules are the model's).
    """
    folder = Path(folder)
    check_name(name)
    several = saved_adapters(folder)
    if "" not in several and several:
        calls = ", ".join(f"load_adapter(model, '{path}', name='{sub}')" for sub, path in several.items())
        raise CheckpointError(f"{folder} holds several adapters, one per subfolder {list(several)}; load each: {calls}")
    meta, config = read_adapter_config(folder)
    state = _read_tensors(folder / TENSORS_FILE, meta["tensors_sha256"])
    compiled, model = model, uncompiled(model)
    adding = any(True for _ in adapted_modules(model))
    shared = False
    if adding:
        # The trainable modules saved with the adapter are the model's own where they are the ones it
        # has (save_adapter writes them with each adapter): checked equal below, not written.
        if config.trainable and set(config.trainable) == set(model_trainable(model)):
            shared, config = True, dataclasses.replace(config, trainable=())
        check_can_add(model, config, name)

    problems: list[str] = []
    wrappers: dict[str, Adapted] = {}
    for path, entry in meta["modules"].items():
        problem = _layer_mismatch(model, path, entry)
        if problem:
            problems.append(problem)
            continue
        try:
            layer_config = config.from_dict({**config.to_dict(), **entry["config"]})
            wrappers[path] = build(model, path, config, layer_config, name)
        except (ValueError, TypeError) as error:
            problems.append(f"'{path}': {error}")
    if not problems:
        # What rw.adapt refuses for these layers: one registered at two paths (the other use would
        # run bare), one that is or holds or lies in a module trained in full (the model's, when adding).
        try:
            in_full = (*config.trainable, *model_trainable(model))  # as find_targets selects
            check_paths(model, meta["modules"], trainable=in_full, adapted=adding)
        except (ValueError, TypeError) as error:
            problems.append(str(error))
    if problems:
        raise CheckpointError(f"{folder} does not fit this model:\n  " + "\n  ".join(problems))

    expected = {
        _key(path, "delta", key): t for path, w in wrappers.items() for key, t in w.adapters[name].state_dict().items()
    }
    trainable = {}
    for path in meta["trainable_modules"]:
        try:
            trainable[path] = model.get_submodule(path)
        except AttributeError:
            problems.append(f"trainable module '{path}' is not in the model")
            continue
        expected.update({_key(path, n): t for n, t in trainable[path].state_dict().items()})
    _compare(state, expected, problems)
    if problems:
        raise CheckpointError(f"{folder / TENSORS_FILE} does not fit this model:\n  " + "\n  ".join(problems))
    kept = [_key(path, n) for path, module in trainable.items() for n in module.state_dict()] if shared else []
    differ = [key for key in kept if not torch.equal(state[key].to(expected[key]), expected[key])]
    if differ:
        raise CheckpointError(
            f"{folder / TENSORS_FILE} holds other values for the trainable modules {sorted(trainable)} ({differ}) "
            f"than the model, whose adapters {adapter_names(model)} share them: adding adapter {name!r} would "
            "change them under those. Load it into the base model alone"
        )

    installed = add_wrappers(model, wrappers, name) if adding else install_wrappers(model, wrappers, config)
    with torch.no_grad():
        for key, target in expected.items():
            if key not in kept:
                target.copy_(state[key])
    return compiled if installed is model else installed


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in blocks: a whole model's tensor file
    need not fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, digest: str, recorded: str, record: str) -> None:
    """Refuse the tensor file at ``path``, whose SHA-256 is ``digest``, unless it is ``recorded``,
    the digest its checkpoint's ``record`` file holds (written from the same save, after the tensors).

    Raises:
        CheckpointError: the file is truncated or corrupted (the digests differ).
    """
    if digest != recorded:
        raise CheckpointError(f"{path} is truncated or corrupted: its checksum differs from the one in {record}")


def _read_tensors(path: Path, sha256: str) -> dict[str, Tensor]:
    # An adapter's file is small: read once, hashed and loaded from the same bytes.
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    data = path.read_bytes()
    check_sha256(path, hashlib.sha256(data).hexdigest(), sha256, CONFIG_FILE)
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error type for any malformed header
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
_FIELD_TYPES = {
    "format": str,
    "format_version": int,
    "method": str,
    "config": dict,
    "modules": dict,
    "trainable_modules": list,
    "tensors_sha256": str,
}
_LAYER_TYPES = {"base": str, "in_features": int, "out_features": int, "config": dict}


def _check_types(meta: dict[str, Any], path: Path) -> None:
    """Raise ``CheckpointError`` naming the first field of the wrong JSON type; fill each layer's
    optional ``config`` (no fields of its own) with ``{}``."""

    def check(value: Any, kind: type, where: str) -> None:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: {where} must be {_JSON_TYPES[kind]}, not {json.dumps(value)[:80]}")

    for field, kind in _FIELD_TYPES.items():
        check(meta[field], kind, f"'{field}'")
    for index, name in enumerate(meta["trainable_modules"]):
        check(name, str, f"trainable_modules[{index}]")
    for layer, entry in meta["modules"].items():
        check(entry, dict, f"modules['{layer}']")
        entry.setdefault("config", {})
        for field, kind in _LAYER_TYPES.items():
            if field not in entry:
                raise CheckpointError(f"{path}: modules['{layer}'] lacks '{field}'")
            check(entry[field], kind, f"modules['{layer}']['{field}']")
        if "weight_shape" in entry:  # optional: checkpoints written before it was recorded lack it
            check(entry["weight_shape"], list, f"modules['{layer}']['weight_shape']")
            for index, size in enumerate(entry["weight_shape"]):
                check(size, int, f"modules['{layer}']['weight_shape'][{index}]")


def _layer_mismatch(model: nn.Module, path: str, entry: dict[str, Any]) -> str | None:
    try:
        module = base_of(model.get_submodule(path))
    except AttributeError:
        return f"layer '{path}' is not in the model"
    kind = geometry.base_kind(module)
    if kind is None or kind != entry["base"]:  # entry["base"] is a string (_check_types)
        return f"layer '{path}' is a {type(module).__name__}, the checkpoint expects a {entry['base']}"
    out_features, in_features = geometry.matrix_shape(module, kind)
    if (in_features, out_features) != (entry["in_features"], entry["out_features"]):
        return (
            f"layer '{path}' is {in_features} -> {out_features}, the checkpoint expects "
            f"{entry['in_features']} -> {entry['out_features']}"
        )
    shape = geometry.weight_shape(module)
    if "weight_shape" in entry and shape != tuple(entry["weight_shape"]):  # a list of ints (_check_types)
        return (
            f"layer '{path}' has a weight of shape {shape}, the checkpoint expects {tuple(entry['weight_shape'])}: "
            f"the same {in_features} -> {out_features} flattened, but another kernel, whose inputs the saved "
            "update was not trained on"
        )
    return None


def _compare(state: dict[str, Tensor], expected: dict[str, Tensor], problems: list[str]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys: {misshaped}")


def _saved_config(model: nn.Module, layers: list[tuple[str, Adapted]]) -> AdapterConfig:
    """The adapter's config with the model's ``trainable`` modules: they are trained in full with
    every adapter of the model, so each adapter's checkpoint carries them (one added beside the
    first names none itself, and without them it would load onto an untrained head)."""
    configs = {layer.config for _, layer in layers}
    assert len(configs) == 1, "adapt() installs one config per adapter"
    return dataclasses.replace(configs.pop(), trainable=model_trainable(model))


def _full(tensor: Tensor) -> Tensor:
    # A tensor sharded by FSDP2 (a DTensor) is gathered: a collective, so under FSDP every rank
    # calls save_adapter; all of them write the same bytes, each through its own temporary file.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _key(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def write_files(files: dict[Path, bytes | Callable[[Path], None]]) -> None:
    """Replace files of one folder together, so that an error leaves every one of them as it was.

    Each file is first written in full to a temporary file beside it and fsynced: ``bytes``, or
    through ``write(temporary)`` for a library that writes to a path (safetensors' ``save_file``,
    which needs no copy of a large file in memory). Only when all are written are they renamed
    into place, in the order given, each old file first renamed aside (no data is copied). An
    exception at any step (a full disk, a failing rename) puts the old files back and removes the
    temporaries. A crash (power loss) between two renames can still leave a new file beside an old
    one, so the caller's format must refuse such a pair: the last file is the commit, holding a
    checksum or an id of the others.

    Raises:
        OSError: the write failed and the files are as they were (the message says so if putting
            them back failed too); or, after the last rename, an old version could not be removed
            (the message says the new files are in place and names the leftover).
    """
    temporaries: dict[Path, Path] = {}
    moved: list[tuple[Path, Path | None]] = []  # (path, where its old file went; None if there was none)
    try:
        for path, content in files.items():
            temporaries[path] = _write_temporary(path, content)
        for path, temporary in temporaries.items():
            moved.append((path, _move_aside(path)))
            os.replace(temporary, path)
    except BaseException as error:
        _put_back(moved, list(temporaries.values()), error)
        raise
    leftovers = []
    for _, old in moved:
        if old is not None:
            try:
                os.unlink(old)
            except OSError as error:
                leftovers.append(f"{old}: {error}")
    if leftovers:
        raise OSError(f"the new files are in place, but old versions could not be removed: {leftovers}")


def _write_temporary(path: Path, content: bytes | Callable[[Path], None]) -> Path:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        try:
            if isinstance(content, bytes):
                view = memoryview(content)
                while view:
                    view = view[os.write(handle, view) :]
            else:
                content(temporary)
        finally:
            os.close(handle)
        handle = os.open(temporary, os.O_RDONLY)  # a library may have written through its own handle
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _move_aside(path: Path) -> Path | None:
    """Rename ``path`` to a new temporary name, returned; ``None`` if there is no such file."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
    try:
        os.close(handle)
        os.replace(path, name)
    except BaseException as error:
        os.unlink(name)
        if isinstance(error, FileNotFoundError):  # a first save, or another rank of a distributed save moved it
            return None
        raise
    return Path(name)


def _put_back(moved: list[tuple[Path, Path | None]], temporaries: list[Path], error: BaseException) -> None:
    failures = []
    for path, old in reversed(moved):
        try:
            if old is None:
                path.unlink(missing_ok=True)  # the folder had no such file before
            else:
                os.replace(old, path)
        except OSError as failure:
            failures.append(f"{path.name} (its old file is {old}): {failure}")
    for temporary in temporaries:
        try:
            temporary.unlink(missing_ok=True)
        except OSError as failure:
            failures.append(f"{temporary}: {failure}")
    if failures:
        raise OSError(f"writing failed ({error}), and putting the old files back failed too: {failures}") from error
