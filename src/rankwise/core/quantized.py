"""Linear layers whose weight is quantized: what rankwise reads of them, and what it refuses.

Three layouts are supported, each an ``nn.Linear`` (or subclass) whose ``weight`` is packed:

* bitsandbytes ``Linear4bit`` (nf4 or fp4, any compute dtype; ``Params4bit``, 4-bit codes and
  blockwise scales), quantized: bitsandbytes quantizes a ``Linear4bit`` when it is moved to a device;
* bitsandbytes ``Linear8bitLt`` with ``has_fp16_weights=False`` (``Int8Params``, LLM.int8() row-wise
  int8 codes and scales);
* an ``nn.Linear`` whose weight is a torchao ``Int8Tensor`` (``Int8WeightOnlyConfig``, also with
  ``Int8DynamicActivationInt8WeightConfig``'s dynamic int8 activations).

The layer's own forward stays the frozen part of the output; the adapters see the dequantized
weight ``Ŵ0`` (what that forward multiplies by, up to its kernel's rounding) as their ``W0``,
computed where a method needs it and never kept. Both backends are optional: a model holding one
of these layers has imported its backend, so rankwise looks the backends up in ``sys.modules`` and
never imports them itself.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, cast

import torch
from torch import Tensor, nn

from .precision import at_least_fp32

_SUPPORTED = (
    "bitsandbytes Linear4bit (nf4, fp4), bitsandbytes Linear8bitLt (has_fp16_weights=False) and nn.Linear "
    "with a torchao Int8Tensor weight (Int8WeightOnlyConfig)"
)


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def _torchao_tensor_types() -> tuple[Any, Any]:
    """torchao's base class of quantized tensors and its ``Int8Tensor`` (``None`` where not loaded)."""
    utils, quantization = sys.modules.get("torchao.utils"), sys.modules.get("torchao.quantization")
    return getattr(utils, "TorchAOBaseTensor", None), getattr(quantization, "Int8Tensor", None)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is not a plain float tensor: a bitsandbytes parameter, a torchao
    quantized tensor, or an integer tensor. :func:`scheme` says whether rankwise can read it."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return False
    bnb = _bnb()
    if bnb is not None and isinstance(weight, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
        return True
    torchao_base, _ = _torchao_tensor_types()
    if torchao_base is not None and isinstance(weight, torchao_base):
        return True
    return not weight.is_floating_point()


def scheme(module: nn.Module, path: str) -> str:
    """The quantization of a layer for which :func:`is_quantized` holds, in words (for messages).

    Raises:
        TypeError: a layout rankwise cannot read (another bitsandbytes or torchao layer or tensor,
            a bitsandbytes layer not quantized yet, an integer weight of no known layout).
    """
    weight, name = getattr(module, "weight", None), type(module).__name__
    bnb = _bnb()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit) and isinstance(weight, bnb.nn.Params4bit):
        if not weight.bnb_quantized:
            raise TypeError(
                f"'{path}' is a {name} whose weight is not quantized yet (bitsandbytes quantizes it when the "
                "layer is moved to a device: model.to('cpu') or model.cuda()); adapt it after that"
            )
        return f"bitsandbytes {_quant_state(module).quant_type}"
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt) and isinstance(weight, bnb.nn.Int8Params):
        if module.state.has_fp16_weights:
            raise TypeError(
                f"'{path}' is a {name} with has_fp16_weights=True (a float weight quantized at each step); "
                "rankwise adapts an 8-bit base built with has_fp16_weights=False, the frozen int8 layout"
            )
        if weight.dtype != torch.int8:
            raise TypeError(
                f"'{path}' is a {name} whose weight is not quantized yet (bitsandbytes quantizes it when the "
                "layer is moved to a device: model.to('cpu') or model.cuda()); adapt it after that"
            )
        return "bitsandbytes int8"
    _, int8_tensor = _torchao_tensor_types()
    if int8_tensor is not None and type(weight) is int8_tensor and type(module).forward is nn.Linear.forward:
        return "torchao Int8Tensor"
    raise TypeError(
        f"'{path}' is a {name} with a {type(weight).__name__} weight of dtype {getattr(weight, 'dtype', None)}, "
        f"a quantized layout rankwise cannot read; it adapts {_SUPPORTED}"
    )


def _quant_state(module: nn.Module) -> Any:
    # FSDP can strip the state from the parameter; Linear4bit keeps a copy on the module for that.
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def dequantized(module: Any) -> Tensor:
    """``Ŵ0``: the (out_features, in_features) float matrix a supported quantized layer's weight
    stands for, in at least fp32, computed anew (no gradient, nothing kept) on the weight's device."""
    # Typed Any: a backend's layer and tensor types (bitsandbytes, torchao), read by their own attributes.
    weight = module.weight
    bnb = _bnb()
    with torch.no_grad():
        if bnb is not None and isinstance(weight, bnb.nn.Params4bit):
            matrix = _dequantized_4bit(bnb, weight, _quant_state(module))
        elif bnb is not None and isinstance(weight, bnb.nn.Int8Params):
            # Linear8bitLt moves the row scales from the parameter to its state at its first forward.
            scales = weight.SCB if weight.SCB is not None else module.state.SCB
            matrix = bnb.functional.int8_vectorwise_dequant(weight.data, scales)
        else:
            matrix = weight.dequantize()
    return matrix.to(at_least_fp32(matrix.dtype))


def _dequantized_4bit(bnb: Any, weight: Tensor, state: Any) -> Tensor:
    packed = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # On a CPU with AVX512-BF16, an eval-mode forward without gradients repacks the weight in
        # place into a layout for bitsandbytes' CPU kernel, which dequantize_4bit does not read:
        # undo it on copies (the layer keeps its layout), as bitsandbytes does before saving.
        inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise TypeError(
                "this Linear4bit's weight is in bitsandbytes' CPU inference packing, which this "
                f"bitsandbytes {bnb.__version__} gives no way to read back; adapt the layer before an eval-mode forward"
            )
        packed, state = inverse(packed.clone(), copy.deepcopy(state))
    return bnb.functional.dequantize_4bit(packed, state)


def shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a quantized linear layer, read without dequantizing."""
    out_features, in_features = module.out_features, module.in_features
    assert isinstance(out_features, int) and isinstance(in_features, int)  # an nn.Linear's sizes
    return out_features, in_features


def source_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the layer's weight was quantized from, where the layer records it
    (bitsandbytes 4-bit, torchao); fp32 for a bitsandbytes 8-bit layer, which records none."""
    weight = module.weight
    state = _quant_state(module)
    if state is not None:
        # bitsandbytes' CPU packing keeps the original dtype apart (it stores its scales in bf16).
        return getattr(state, "original_dtype", None) or state.dtype
    bnb = _bnb()
    if bnb is not None and isinstance(weight, bnb.nn.Int8Params):
        return torch.float32
    assert isinstance(weight, Tensor)  # a torchao tensor reports the dtype it stands for
    return weight.dtype


def float_linear(module: nn.Module, matrix: Tensor, dtype: torch.dtype | None) -> nn.Linear:
    """A plain ``nn.Linear`` with weight ``matrix`` (out, in) and the layer's bias, in ``dtype``
    (default :func:`source_dtype`), frozen and in the layer's training mode: what
    :func:`rankwise.unwrap` puts where a quantized layer was."""
    dtype = dtype or source_dtype(module)
    bias = module.bias
    assert bias is None or isinstance(bias, Tensor)  # an nn.Linear's bias
    out_features, in_features = shape(module)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=matrix.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(matrix)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False).train(module.training)


def _repacked_4bit_layers(model: nn.Module) -> list[Any]:
    """The ``Linear4bit`` layers whose weight bitsandbytes has repacked for its CPU inference kernel."""
    bnb = _bnb()
    if bnb is None:
        return []
    repacked = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit) and getattr(_quant_state(m), "packing_format_for_cpu", False)
    ]
    if repacked and not hasattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse"):
        raise TypeError(
            f"prepare_for_quantized_training: {len(repacked)} Linear4bit weights are in bitsandbytes' CPU inference "
            f"packing, which bitsandbytes {bnb.__version__} gives no way to undo; call it before any eval-mode forward"
        )
    return repacked


def drop_transformers_record(model: nn.Module) -> None:
    """Forget a transformers model's record of its quantization once no quantized layer is left.

    transformers keeps it on the model (``hf_quantizer``, ``config.quantization_config``,
    ``is_loaded_in_4bit``); after :func:`rankwise.unwrap` has replaced every quantized layer by an
    ``nn.Linear`` the record is false: ``save_pretrained`` would write a 4-bit config beside float
    weights, and ``.to(dtype)`` refuses the model. The record goes as transformers' own quantizer
    removes it when it dequantizes a model. Anything else, or a model still quantized somewhere,
    is left as it is.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or any(is_quantized(m) for m in model.modules()):
        return
    quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)


def prepare_for_quantized_training(model: nn.Module, *, gradient_checkpointing: bool = True) -> nn.Module:
    """Ready a model with a quantized base for adapter training, as PEFT's
    ``prepare_model_for_kbit_training`` does; call it before :func:`rankwise.adapt`.

    * Every float parameter in fp16 or bf16 that is not a quantized weight (norms, embeddings, the
      head, biases) is cast to fp32: the frozen layers an adapter's gradient flows through then
      compute in fp32, and layer norms keep their precision.
    * bitsandbytes ``Linear4bit`` layers keep their training layout: on a CPU with AVX512-BF16,
      bitsandbytes (0.50) repacks a 4-bit weight for its CPU inference kernel at the first eval-mode
      forward without gradients, and that kernel has no backward, so after an evaluation the
      gradient would stop at every 4-bit layer without an error (the adapters before the last
      frozen layer would get zeros). The repacking is turned off and a weight already repacked is
      put back.
    * With ``gradient_checkpointing`` (a transformers model), checkpointing is turned on, non-reentrant,
      and the input embeddings' output requires grad, so that a reentrant checkpoint a model sets
      up itself still sees an input that needs a gradient (all the base weights are frozen).

    Parameters are neither frozen nor unfrozen: :func:`rankwise.adapt` freezes all but the adapters.

    Args:
        model: the model, quantized (bitsandbytes, torchao) or not.
        gradient_checkpointing: turn on gradient checkpointing; needs a transformers model.

    Returns:
        The same model.

    Raises:
        TypeError: ``gradient_checkpointing`` on a model without ``gradient_checkpointing_enable``
            and ``enable_input_require_grads`` (the transformers ``PreTrainedModel`` methods), or a
            repacked 4-bit weight this bitsandbytes cannot put back; nothing is changed.
    """
    if gradient_checkpointing and not all(
        callable(getattr(model, name, None)) for name in ("gradient_checkpointing_enable", "enable_input_require_grads")
    ):
        raise TypeError(
            f"prepare_for_quantized_training: {type(model).__name__} has no gradient_checkpointing_enable / "
            "enable_input_require_grads (a transformers model has both); pass gradient_checkpointing=False"
        )
    repacked = _repacked_4bit_layers(model)
    quantized_weights = {id(m.weight) for m in model.modules() if is_quantized(m)}
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if id(param) not in quantized_weights and param.dtype in (torch.float16, torch.bfloat16):
                    # Replaced, not cast in place: the Parameter keeps its identity for tied weights.
                    param.data = param.data.float()
    bnb = _bnb()
    for module in model.modules():
        if bnb is not None and isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
    for module in repacked:
        # In place, as bitsandbytes does before saving; the quantization state object is shared with
        # the module, and the inverse updates it.
        module.weight.data, module.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            module.weight.data, _quant_state(module)
        )
    if gradient_checkpointing:  # both checked callable above; nn.Module types them as Tensor | Module
        transformers_model = cast(Any, model)
        # transformers 5 renamed it (the old name is a deprecated alias); 4.56, the floor, has the old one.
        if callable(getattr(transformers_model, "activation_checkpointing_enable", None)):
            transformers_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            transformers_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        transformers_model.enable_input_require_grads()
    return model
