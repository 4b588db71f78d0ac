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

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoint import CheckpointError, check_sha256, file_sha256, write_files
from ..core.geometry import check_supported
from ..core.inject import replace_module
from ..core.targets import check_paths
from ..core.ties import shared_tensors
from ..version import __version__
from .layers import LowRankLayer, empty_like_layer

_FORMAT = "rankwise-compressed"
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

_WEIGHTS, COMPRESSION_LAYOUT = "model.safetensors", "compression.json"


def save_compressed(model: nn.Module, folder: str | Path) -> None:
    """Write a compressed model: ``model.safetensors`` (the whole state dict) and ``compression.json``
    (format, version, each low-rank layer's path and layout, and ``tensors_sha256``, the SHA-256 of
    ``model.safetensors``, so that a corrupted file refuses to load), so a reload needs no report.

    Tied tensors (an LM head sharing the embedding) are written under each of their keys, with
    equal values; loading copies them into the one shared parameter, so the tie survives.

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

    # The weights through a file, not bytes in memory: a whole model's state dict is large, so its
    # digest is read back from the written file. write_files writes in the order given: the layout,
    # holding that digest, after the weights; it is renamed last too, so it is the commit.
    def write_weights(temporary: Path) -> None:
        save_file(tensors, str(temporary), metadata={"save_id": save_id})
        layout["tensors_sha256"] = file_sha256(temporary)

    def write_layout(temporary: Path) -> None:
        temporary.write_bytes(json.dumps(layout, indent=2).encode())

    write_files({folder / _WEIGHTS: write_weights, folder / COMPRESSION_LAYOUT: write_layout})


def load_compressed(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load :func:`save_compressed`'s files into an uncompressed model of the same architecture.

    ``model.safetensors`` is checked against the SHA-256 in ``compression.json``; files saved before
    the digest was recorded have none and load unchecked. Every recorded layer is checked against
    the model (present, same type and shape, registered at one path only, as :func:`lord` requires)
    and every tensor against the rebuilt model (missing, unexpected and mis-shaped keys listed
    together; one value for the tensors the model shares) before the model is changed. Returns the
    same model object, compressed.

    Raises:
        CheckpointError: a missing, unreadable, truncated or corrupted file, or files from two
            saves; the files do not fit the model: a recorded layer it lacks, of another type or
            shape, or registered at two paths of it (replacing one would leave the other, or
            load one path's factors into both); missing, unexpected or mis-shaped tensors; different
            values in the file for tensors the model ties into one (the last would silently win).
    """
    folder = Path(folder)
    layout = read_layout(folder)
    weights = folder / _WEIGHTS
    try:
        with safe_open(weights, framework="pt") as file:
            weights_id = (file.metadata() or {}).get("save_id")
    except (OSError, SafetensorError) as error:  # missing, not safetensors
        raise CheckpointError(f"{folder} holds no readable compressed model: {error}") from None
    if layout.get("save_id") != weights_id:  # both absent in files from before save ids
        raise CheckpointError(
            f"{folder}: {_WEIGHTS} and {COMPRESSION_LAYOUT} come from two different saves "
            "(a save interrupted between its two renames); save the model again"
        )
    if "tensors_sha256" in layout:  # absent in files from before the digest was recorded
        check_sha256(weights, file_sha256(weights), layout["tensors_sha256"], COMPRESSION_LAYOUT)
    try:
        # What lord refuses for these layers, before any is rebuilt: one registered at two paths
        # would get one path's factors for both, or be replaced at one path and left at the other.
        check_paths(model, layout["layers"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{folder} does not fit the model: {error}") from None
    built = {path: _rebuild(model, path, entry) for path, entry in layout["layers"].items()}
    expected = {
        k: v.shape for k, v in model.state_dict().items() if not any(k.startswith(path + ".") for path in built)
    }
    for path, layer in built.items():
        expected |= {f"{path}.{k}": v.shape for k, v in layer.state_dict().items()}
    tensors = load_file(str(weights))
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
    _check_ties(model, tensors, weights)
    # The keys and shapes load_state_dict checks were checked above, and no layer is shared, so
    # the rebuilt model's keys are those expected: from here nothing is refused part-way.
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
    digest = layout.get("tensors_sha256", "")  # optional: files saved before it was recorded lack it
    if not isinstance(digest, str):
        raise CheckpointError(f"{path}: 'tensors_sha256' must be a string, not {json.dumps(digest)[:80]}")
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


def _check_ties(model: nn.Module, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """Refuse a file holding different values for tensors that share memory in ``model`` (a head
    tied to the embedding, a module registered at two paths): loading copies each key into that
    memory in turn, so the last would silently win. A tie saved from a tied model writes the same
    bytes under each key, so the criterion is bit equality."""
    shared = shared_tensors(model)
    differ = sorted(
        f"'{key}' and '{partner}'"
        for key in shared.keys() & tensors.keys()
        for partner in shared[key]
        if key < partner and partner in tensors and not _same_bits(tensors[key], tensors[partner])
    )
    if differ:
        raise CheckpointError(
            f"{weights} holds different values for {', '.join(differ)}, which this model ties to one tensor: "
            "loading would keep one of them. Load it into a model that holds them apart, as the saved model "
            "did: untie a tied parameter (module.weight = nn.Parameter(module.weight.detach().clone()); in a "
            "transformers model also config.tie_word_embeddings = False), give a module used at two paths a "
            "copy of its own at each"
        )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bytes, not values: torch.equal calls NaN unequal to itself and -0.0 equal to 0.0.
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


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
