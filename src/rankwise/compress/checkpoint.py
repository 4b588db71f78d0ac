"""Saving and loading a compressed model: the whole state dict plus each low-rank layer's layout, so
that an uncompressed model of the same architecture can be rebuilt from the files alone."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoint import CheckpointError, write_files
from ..core.geometry import check_supported
from ..core.inject import replace_module
from ..version import __version__
from .layers import LowRankLayer, empty_like_layer

_FORMAT = "rankwise-compressed"
_WEIGHTS, _LAYOUT = "model.safetensors", "compression.json"


def save_compressed(model: nn.Module, folder: str | Path) -> None:
    """Write a compressed model: ``model.safetensors`` (the whole state dict) and ``compression.json``
    (format, version, and each low-rank layer's path and layout), so a reload needs no report.

    Tied tensors (an LM head sharing the embedding) are written under each of their keys; loading
    copies both into the one shared parameter, so the tie survives.

    Both files are written in full before either replaces an old one, so a save that fails leaves
    the previous files as they were; both carry one random ``save_id``, so a pair from two saves
    (a crash between the two renames) refuses to load.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    layout = {"format": _FORMAT, "format_version": 1, "rankwise_version": __version__, "save_id": save_id,
              "layers": {path: m.layout() for path, m in model.named_modules() if isinstance(m, LowRankLayer)}}
    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        # safetensors refuses tensors that share storage; a copy per key keeps both keys loadable.
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.detach().clone() if storage in seen else value.detach().contiguous()
        seen.add(storage)
    # The weights through a file, not bytes in memory: a whole model's state dict is large. The
    # layout last: it is the commit.
    write_files({
        folder / _WEIGHTS: lambda temporary: save_file(tensors, str(temporary), metadata={"save_id": save_id}),
        folder / _LAYOUT: json.dumps(layout, indent=2).encode(),
    })


def load_compressed(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load :func:`save_compressed`'s files into an uncompressed model of the same architecture.

    Every recorded layer is checked against the model (present, same type and shape) and every
    tensor against the rebuilt model (missing, unexpected and mis-shaped keys listed together)
    before the model is changed. Returns the same model object, compressed.

    Raises:
        CheckpointError: the files do not fit the model.
    """
    folder = Path(folder)
    try:
        layout = json.loads((folder / _LAYOUT).read_text())
        with safe_open(folder / _WEIGHTS, framework="pt") as file:
            weights_id = (file.metadata() or {}).get("save_id")
    except (OSError, ValueError, SafetensorError) as error:  # missing, not JSON, not safetensors
        raise CheckpointError(f"{folder} holds no readable compressed model: {error}") from None
    if not isinstance(layout, dict) or layout.get("format") != _FORMAT or layout.get("format_version") != 1:
        raise CheckpointError(f"{folder / _LAYOUT} is not a {_FORMAT} v1 file")
    if layout.get("save_id") != weights_id:  # both absent in files from before save ids
        raise CheckpointError(f"{folder}: {_WEIGHTS} and {_LAYOUT} come from two different saves "
                              "(a save interrupted between its two renames); save the model again")
    built = {path: _rebuild(model, path, entry) for path, entry in layout["layers"].items()}
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not any(k.startswith(path + ".") for path in built)}
    for path, layer in built.items():
        expected |= {f"{path}.{k}": v.shape for k, v in layer.state_dict().items()}
    tensors = load_file(str(folder / _WEIGHTS))
    problems = [f"missing {sorted(set(expected) - set(tensors))}"] if set(expected) - set(tensors) else []
    if set(tensors) - set(expected):
        problems.append(f"unexpected {sorted(set(tensors) - set(expected))}")
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
              for k, v in tensors.items() if k in expected and v.shape != expected[k]]
    if shapes:
        problems.append(f"mis-shaped {shapes}")
    if problems:
        raise CheckpointError(f"{folder} does not fit the model: " + "; ".join(problems))
    for path, layer in built.items():
        replace_module(model, path, layer)
    model.load_state_dict(tensors, strict=True)
    return model


def _rebuild(model: nn.Module, path: str, entry: dict[str, Any]) -> LowRankLayer:
    try:
        layer = model.get_submodule(path)
    except AttributeError as error:
        raise CheckpointError(f"compressed layer '{path}' is not in the model") from error
    kind = check_supported(layer, path)
    is_conv = entry["type"] == "LowRankConv2d"
    if is_conv != (kind == "conv2d"):
        raise CheckpointError(f"'{path}' is a {type(layer).__name__} in the model but a {entry['type']} in the file")
    scheme = entry.get("scheme", "channel")
    new = empty_like_layer(layer, kind, entry["rank"], scheme)
    if new.layout() != entry:
        raise CheckpointError(f"'{path}': the file's layer {entry} does not fit the model's {new.layout()}")
    return new
