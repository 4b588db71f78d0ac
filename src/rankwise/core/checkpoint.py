"""Adapter checkpoints: ``adapter.safetensors`` + ``adapter_config.json``, validated before any copy.

Format (``format_version`` 1)::

    adapter_config.json = {
      "format": "rankwise-adapter", "format_version": 1, "rankwise_version": "0.1.0",
      "method": "lora", "config": {...the config's fields...},
      "modules": {"<path>": {"base": "linear", "in_features": 64, "out_features": 64,
                             "config": {...fields that differ for this layer, e.g. its rank...}}},
      "trainable_modules": ["<path>", ...],
      "tensors_sha256": "<hex digest of adapter.safetensors>"
    }
    adapter.safetensors = {"<path>.delta.<name>": tensor, "<trainable path>.<name>": tensor}

No pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ..version import __version__
from . import geometry, registry
from .adapted import Adapted
from .config import AdapterConfig
from .inject import adapted_modules, build, install_wrappers, module_overrides, trainable_paths

TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "rankwise-adapter"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """An adapter checkpoint that is unreadable or does not fit the model."""


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an adapter checkpoint holds: each ``delta`` child, and the trainable modules."""
    layers = list(adapted_modules(model))
    if not layers:
        raise ValueError("the model has no rankwise adapters; call rankwise.adapt first")
    config = _shared_config(layers)
    state = {_key(path, "delta", name): t for path, layer in layers for name, t in layer.delta.state_dict().items()}
    for path in trainable_paths(model, config):
        state.update({_key(path, name): t for name, t in model.get_submodule(path).state_dict().items()})
    return state


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to ``folder`` (created if needed); returns the folder.

    Each file is written to a temporary name and renamed into place, so an interrupted save leaves
    no half-written file under the final names.
    """
    layers = list(adapted_modules(model))
    state = {k: _full(t).detach().to("cpu").contiguous().clone() for k, t in adapter_state_dict(model).items()}
    config = _shared_config(layers)
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
                "config": _jsonable(module_overrides(layer)),
            }
            for path, layer in layers
        },
        "trainable_modules": sorted(trainable_paths(model, config)),
        "tensors_sha256": hashlib.sha256(tensors).hexdigest(),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / TENSORS_FILE, tensors)
    atomic_write(folder / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return folder


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
    try:
        config = registry.get(meta["method"]).config_class.from_dict(meta["config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None
    return meta, config


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Adapt a fresh base ``model`` as the checkpoint in ``folder`` says and load its tensors.

    The whole checkpoint is read and checked against the model before anything is changed.

    Raises:
        CheckpointError: a missing, truncated or corrupted file; an unknown method or config key;
            layers the model lacks or whose shapes differ; missing, unexpected or mis-shaped
            tensors (all of them listed).
        ValueError: the model already has adapters.
    """
    folder = Path(folder)
    meta, config = read_adapter_config(folder)
    state = _read_tensors(folder / TENSORS_FILE, meta["tensors_sha256"])
    if any(True for _ in adapted_modules(model)):
        raise ValueError("the model already has rankwise adapters; load into a fresh base model")

    problems: list[str] = []
    wrappers: dict[str, Adapted] = {}
    for path, entry in meta["modules"].items():
        problem = _layer_mismatch(model, path, entry)
        if problem:
            problems.append(problem)
            continue
        try:
            layer_config = config.from_dict({**config.to_dict(), **entry.get("config", {})})
            wrappers[path] = build(model, path, config, layer_config)
        except (ValueError, TypeError) as error:
            problems.append(f"'{path}': {error}")
    if problems:
        raise CheckpointError(f"{folder} does not fit this model:\n  " + "\n  ".join(problems))

    expected = {_key(path, "delta", n): t for path, w in wrappers.items() for n, t in w.delta.state_dict().items()}
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

    model = install_wrappers(model, wrappers, config)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
    return model


def _read_tensors(path: Path, sha256: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{path} is truncated or corrupted: its checksum differs from the one in {CONFIG_FILE}"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error type for any malformed header
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def _layer_mismatch(model: nn.Module, path: str, entry: dict[str, Any]) -> str | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return f"layer '{path}' is not in the model"
    kind = geometry.base_kind(module)
    if kind != entry.get("base"):
        return f"layer '{path}' is a {type(module).__name__}, the checkpoint expects a {entry.get('base')}"
    out_features, in_features = geometry.weight_matrix(module, kind).shape
    if (in_features, out_features) != (entry.get("in_features"), entry.get("out_features")):
        return (
            f"layer '{path}' is {in_features} -> {out_features}, the checkpoint expects "
            f"{entry.get('in_features')} -> {entry.get('out_features')}"
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


def _shared_config(layers: list[tuple[str, Adapted]]) -> AdapterConfig:
    configs = {layer.config for _, layer in layers}
    assert len(configs) == 1, "adapt() installs one config per model"
    return configs.pop()


def _full(tensor: Tensor) -> Tensor:
    # A tensor sharded by FSDP2 (a DTensor) is gathered: a collective, so under FSDP every rank
    # calls save_adapter; all of them write the same bytes, each through its own temporary file.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _key(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_with`)."""
    atomic_write_with(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary)`` in the same folder, fsync it, then rename it
    over ``path``: a reader sees the old file or the whole new one, never part of one. For large
    files written by a library that takes a path (safetensors' ``save_file``), with no copy in
    memory."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
