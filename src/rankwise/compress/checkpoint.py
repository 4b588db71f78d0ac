"""Saving and loading a compressed model: the whole state dict plus each low-rank layer's layout, so
that an uncompressed model of the same architecture can be rebuilt from the files alone. For a
transformers model, :func:`save_pretrained` adds its ``config.json`` and :func:`from_pretrained`
builds the model from it: no base model needed."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoint import CheckpointError, write_files
from ..core.geometry import check_supported
from ..core.inject import replace_module
from ..version import __version__
from .layers import LowRankLayer, empty_like_layer

_FORMAT = "rankwise-compressed"
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

_WEIGHTS, COMPRESSION_LAYOUT = "model.safetensors", "compression.json"


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
    layout = {
        "format": _FORMAT,
        "format_version": 1,
        "rankwise_version": __version__,
        "save_id": save_id,
        "layers": {path: m.layout() for path, m in model.named_modules() if isinstance(m, LowRankLayer)},
    }
    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        # safetensors refuses tensors that share storage; a copy per key keeps both keys loadable.
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.detach().clone() if storage in seen else value.detach().contiguous()
        seen.add(storage)
    # The weights through a file, not bytes in memory: a whole model's state dict is large. The
    # layout last: it is the commit.
    write_files(
        {
            folder / _WEIGHTS: lambda temporary: save_file(tensors, str(temporary), metadata={"save_id": save_id}),
            folder / COMPRESSION_LAYOUT: json.dumps(layout, indent=2).encode(),
        }
    )


def load_compressed(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load :func:`save_compressed`'s files into an uncompressed model of the same architecture.

    Every recorded layer is checked against the model (present, same type and shape) and every
    tensor against the rebuilt model (missing, unexpected and mis-shaped keys listed together)
    before the model is changed. Returns the same model object, compressed.

    Raises:
        CheckpointError: the files do not fit the model.
    """
    folder = Path(folder)
    layout = read_layout(folder)
    try:
        with safe_open(folder / _WEIGHTS, framework="pt") as file:
            weights_id = (file.metadata() or {}).get("save_id")
    except (OSError, SafetensorError) as error:  # missing, not safetensors
        raise CheckpointError(f"{folder} holds no readable compressed model: {error}") from None
    if layout.get("save_id") != weights_id:  # both absent in files from before save ids
        raise CheckpointError(
            f"{folder}: {_WEIGHTS} and {COMPRESSION_LAYOUT} come from two different saves "
            "(a save interrupted between its two renames); save the model again"
        )
    built = {path: _rebuild(model, path, entry) for path, entry in layout["layers"].items()}
    expected = {
        k: v.shape for k, v in model.state_dict().items() if not any(k.startswith(path + ".") for path in built)
    }
    for path, layer in built.items():
        expected |= {f"{path}.{k}": v.shape for k, v in layer.state_dict().items()}
    tensors = load_file(str(folder / _WEIGHTS))
    problems = [f"missing {sorted(set(expected) - set(tensors))}"] if set(expected) - set(tensors) else []
    if set(tensors) - set(expected):
        problems.append(f"unexpected {sorted(set(tensors) - set(expected))}")
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k]
    ]
    if shapes:
        problems.append(f"mis-shaped {shapes}")
    if problems:
        raise CheckpointError(f"{folder} does not fit the model: " + "; ".join(problems))
    for path, layer in built.items():
        replace_module(model, path, layer)
    model.load_state_dict(tensors, strict=True)
    return model


def read_layout(folder: str | Path) -> dict[str, Any]:
    """The ``compression.json`` of a compressed-model folder: format, version and each layer's layout.

    Raises:
        CheckpointError: the file is missing, not JSON, or not this format.
    """
    path = Path(folder) / COMPRESSION_LAYOUT
    try:
        layout = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # missing, not JSON
        raise CheckpointError(f"{folder} holds no readable compressed model: {error}") from None
    if not isinstance(layout, dict) or layout.get("format") != _FORMAT or layout.get("format_version") != 1:
        raise CheckpointError(f"{path} is not a {_FORMAT} v1 file")
    return layout


def save_pretrained(model: PreTrainedModel, folder: str | Path) -> None:
    """:func:`save_compressed` for a transformers model, with its ``config.json`` first, so that
    :func:`from_pretrained` can rebuild it from the folder alone."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as transformers' own save_pretrained records it
    config.save_pretrained(folder)
    save_compressed(model, folder)


def from_pretrained(folder: str | Path) -> PreTrainedModel:
    """A transformers model, compressed, from a folder :func:`save_pretrained` wrote: the
    architecture from ``config.json``, the low-rank layers and weights from the compressed files.
    In eval mode, as transformers loads models.

    Raises:
        ValueError: the folder's ``config.json`` is missing or names no transformers architecture.
        CheckpointError: the compressed files are missing or do not fit the architecture.
    """
    model_class, config = transformers_class(folder)
    model = model_class(config)
    load_compressed(model, folder)
    return model.eval()


def transformers_class(folder: str | Path) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    """The transformers model class a model folder's ``config.json`` names, and the config.

    Raises:
        ValueError: no ``config.json``, or it names no architecture transformers has.
    """
    import transformers  # an optional dependency; only transformers folders need it

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a transformers model folder: it has no config.json")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if not config.architectures:
        raise ValueError(f"{folder}/config.json names no architecture; save the model with save_pretrained")
    model_class = getattr(transformers, config.architectures[0], None)
    if model_class is None:
        raise ValueError(f"{folder}: architecture {config.architectures[0]!r} is not a transformers class")
    return model_class, config


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
