"""Quantized copies of small float models, for the tests of adapters on quantized bases.

Each builder skips the test (``pytest.importorskip``) where its backend is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

BACKENDS = ("bnb-nf4", "bnb-int8", "torchao-int8")


def quantize(model: nn.Module, backend: str, exclude: tuple[str, ...] = (), **options: object) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` but those at the paths ``exclude`` quantized by
    ``backend``; ``options`` go to bitsandbytes' ``Linear4bit`` (``quant_type``, ``compute_dtype``)."""
    model = copy.deepcopy(model)
    if exclude:
        assert backend != "torchao-int8", "quantize_ takes a filter_fn, not used here"
    if backend == "torchao-int8":
        pytest.importorskip("torchao", reason="torchao is not installed (pip install rankwise[quant])")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
        return model
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install rankwise[quant])")
    for path, layer in [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and p not in exclude]:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, _bnb_layer(layer, backend, options))
    return model


def _bnb_layer(layer: nn.Linear, backend: str, options: dict[str, object]) -> nn.Module:
    import bitsandbytes as bnb

    has_bias = layer.bias is not None
    if backend == "bnb-int8":
        quantized = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, has_bias, has_fp16_weights=False)
        quantized.load_state_dict(layer.state_dict())
    else:
        assert backend == "bnb-nf4", backend
        quant_type = options.get("quant_type", "nf4")
        compute_dtype = options.get("compute_dtype", layer.weight.dtype)
        quantized = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, has_bias, compute_dtype=compute_dtype, quant_type=quant_type
        )
        # Quantized from the layer's own dtype, which the quantization state then records.
        quantized.weight = bnb.nn.Params4bit(layer.weight.detach().clone(), requires_grad=False, quant_type=quant_type)
        if has_bias:
            quantized.bias = nn.Parameter(layer.bias.detach().clone())
    return quantized.to(layer.weight.device)  # bitsandbytes quantizes on the move to a device


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer stands for, computed from the backend's own calls."""
    weight = layer.weight
    if type(weight).__module__.startswith("torchao"):
        return weight.dequantize().float()
    import bitsandbytes as bnb

    if isinstance(weight, bnb.nn.Int8Params):  # LLM.int8(): int8 codes times each row's absmax / 127
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB
        return weight.data.float() * scales.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` that also compares torchao tensors (by their int8 codes and scales)."""
    if type(a).__module__.startswith("torchao"):
        return torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    return torch.equal(a, b)
