"""Hugging Face PEFT's adapter format, both ways, for the methods whose parameters map one to one.

PEFT writes ``adapter_model.safetensors`` (keys ``base_model.model.<path>.lora_A.weight``, ...) and
``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``, ...). :func:`to_peft` writes that
format so ``peft.PeftModel.from_pretrained`` loads a rankwise adapter with the same outputs;
:func:`from_peft` reads a PEFT LoRA / rsLoRA / DoRA adapter into rankwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from .adapters import DoRAConfig, LoRAConfig
from .core.checkpoint import CheckpointError, atomic_write
from .core.inject import adapted_modules, build, find_targets, install, module_overrides, trainable_paths

PEFT_TENSORS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
# PEFT config fields whose non-default values change the maths in ways rankwise does not model.
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "layers_to_transform": None, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                "alora_invocation_tokens": None, "use_bdlora": None}


def to_peft(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the LoRA or DoRA adapter of ``model`` in PEFT's format to ``folder``.

    Raises:
        ValueError: the model has no adapters, or its method is not LoRA or DoRA.
    """
    layers = list(adapted_modules(model))
    if not layers:
        raise ValueError("the model has no rankwise adapters; call rankwise.adapt first")
    config = layers[0][1].config
    if type(config) not in (LoRAConfig, DoRAConfig):
        raise ValueError(f"PEFT export supports lora and dora, not {config.method!r}")
    tensors: dict[str, Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for path, layer in layers:
        A, B = layer.delta.A.detach(), layer.delta.B.detach()
        if layer.kind == "conv2d":  # PEFT keeps A as a convolution kernel and B as a 1 x 1 one
            A, B = A.reshape(A.shape[0], *layer.base.weight.shape[1:]), B[..., None, None]
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = B
        if isinstance(config, DoRAConfig):
            tensors[f"{_PREFIX}{path}.lora_magnitude_vector"] = layer.delta.magnitude.detach()
        overrides = module_overrides(layer)
        unknown = sorted(set(overrides) - {"rank", "alpha"})
        if unknown:
            raise ValueError(f"'{path}' differs from the shared config in {unknown}; PEFT can express only rank and alpha")
        if "rank" in overrides:
            rank_pattern[path] = overrides["rank"]
        if "alpha" in overrides:
            alpha_pattern[path] = overrides["alpha"]
    for path in trainable_paths(model, config):
        for name, tensor in model.get_submodule(path).state_dict().items():
            tensors[f"{_PREFIX}{path}.{name}"] = tensor.detach()
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rslora, "use_dora": isinstance(config, DoRAConfig),
        # Full paths: PEFT matches a target against the end of a module's path, like rankwise.
        "target_modules": [path for path, _ in layers], "modules_to_save": list(config.trainable) or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(layer.kind == "conv1d" for _, layer in layers), "bias": "none", "init_lora_weights": True,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(folder / PEFT_TENSORS, safetensors.torch.save(state))
    atomic_write(folder / PEFT_CONFIG, (json.dumps(peft_config, indent=2) + "\n").encode())
    return folder


def from_peft(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Adapt ``model`` with the PEFT LoRA / rsLoRA / DoRA adapter in ``folder`` and load its weights.

    Everything is read and checked before the model changes.

    Raises:
        CheckpointError: missing or unreadable files, a PEFT feature rankwise does not model, or
            tensors that do not fit the model (all listed).
    """
    folder = Path(folder)
    meta = _read_json(folder / PEFT_CONFIG)
    config = _config_from_peft(meta, folder)
    try:
        tensors = safetensors.torch.load_file(folder / PEFT_TENSORS)
    except Exception as error:  # safetensors' own error type for a malformed file; OSError if absent
        raise CheckpointError(f"{folder / PEFT_TENSORS} is missing or not a safetensors file: {error}") from None
    try:
        paths = find_targets(model, config)
        wrappers = {path: build(model, path, config, _layer_config(config, path, meta)) for path in paths}
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{folder}: {error}") from None

    targets: dict[str, Tensor] = {}
    for path, wrapper in wrappers.items():
        delta = wrapper.delta
        targets[f"{_PREFIX}{path}.lora_A.weight"] = delta.A
        targets[f"{_PREFIX}{path}.lora_B.weight"] = delta.B
        if isinstance(config, DoRAConfig):
            targets[f"{_PREFIX}{path}.lora_magnitude_vector"] = delta.magnitude
    for path in trainable_paths(model, config):
        for name, tensor in model.get_submodule(path).state_dict().items():
            targets[f"{_PREFIX}{path}.{name}"] = tensor
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    misshaped = [k for k in set(targets) & set(tensors) if _as_matrix(tensors[k]).shape != targets[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{folder / PEFT_TENSORS} does not fit this model: missing keys {missing}, unexpected keys "
            f"{unexpected}, mis-shaped keys {sorted(misshaped)}"
        )
    model = install(model, wrappers, config)
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(_as_matrix(tensors[key]))
    return model


def _as_matrix(tensor: Tensor) -> Tensor:
    """PEFT's convolution factors (r, in, kh, kw) and (out, r, 1, 1) as rankwise's matrices."""
    return tensor.flatten(1) if tensor.dim() > 2 else tensor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _config_from_peft(meta: dict[str, Any], folder: Path) -> LoRAConfig:
    if meta.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}: PEFT type {meta.get('peft_type')!r} is not supported; rankwise reads LORA")
    unsupported = {k: meta[k] for k, default in _UNSUPPORTED.items() if meta.get(k, default) not in (default, {}, [])}
    if unsupported:
        raise CheckpointError(f"{folder}: PEFT options rankwise does not model: {unsupported}")
    targets = meta.get("target_modules")
    # PEFT reads a string as a regular expression matched against the whole path, a list as names.
    targets = f"re:{targets}" if isinstance(targets, str) else tuple(targets or ())
    config_class = DoRAConfig if meta.get("use_dora") else LoRAConfig
    try:
        return config_class(
            rank=meta["r"], alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
            rslora=bool(meta.get("use_rslora", False)), targets=targets, trainable=tuple(meta.get("modules_to_save") or ()),
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{folder / PEFT_CONFIG}: {error}") from None


def _layer_config(config: LoRAConfig, path: str, meta: dict[str, Any]) -> LoRAConfig:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: a key applies to the paths it ends (as a regex)."""
    changes: dict[str, Any] = {}
    for field, pattern_key in (("rank", "rank_pattern"), ("alpha", "alpha_pattern")):
        for key, value in (meta.get(pattern_key) or {}).items():
            if re.match(rf"(.*\.)?({key})$", path):
                changes[field] = int(value) if field == "rank" else float(value)
                break
    return type(config).from_dict({**config.to_dict(), **changes})
