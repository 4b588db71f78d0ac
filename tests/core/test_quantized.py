"""Adapters on quantized bases beyond the contract (tests/adapters/test_contract_quantized.py):
the dequantized W0 that methods read, merge's refusal and unwrap's float model, checkpoints,
refused layouts, and prepare_for_quantized_training. Skipped where a backend is not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import geometry
from rankwise.core.inject import adapted_modules

from _models import tiny_llama
from _quantized import BACKENDS, dequantized, quantize, same


def _float_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).to(dtype)


def _input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


def _adapted(backend: str, config: rw.AdapterConfig) -> nn.Module:
    model = rw.adapt(quantize(_float_model(), backend), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # off the init, so that ΔW ≠ 0
        for _, layer in adapted_modules(model):
            for p in layer.delta.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


LORA = rw.LoRAConfig(rank=2, targets=("0", "2"))
DORA = rw.DoRAConfig(rank=2, targets=("0", "2"))
backends = pytest.mark.parametrize("backend", BACKENDS)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [LORA, DORA], ids=["lora", "dora"])
def test_4bit_types_and_dtypes_start_at_the_quantized_output(quant_type, dtype, config) -> None:
    # A bf16 model quantized from bf16 and computing in bf16, or fp32 throughout.
    model = quantize(_float_model(dtype), "bnb-nf4", quant_type=quant_type, compute_dtype=dtype)
    x = _input(dtype)
    expected = model(x)
    y = rw.adapt(model, config)(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [LORA, DORA], ids=["lora", "dora"])
def test_torchao_int8_with_dynamic_int8_activations(config) -> None:
    # Int8DynamicActivationInt8WeightConfig: the same Int8Tensor weight, its forward quantizing x too.
    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = _float_model()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    x = _input()
    expected = model(x)
    w0 = model[2].weight.dequantize()
    model = rw.adapt(model, config)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(geometry.weight_matrix(model.get_submodule("2").base, "linear"), w0)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@backends
def test_dora_magnitude_is_the_dequantized_row_norm(backend: str) -> None:
    model = quantize(_float_model(), backend)
    norms = {path: dequantized(model.get_submodule(path)).norm(dim=1) for path in ("0", "2")}
    model = rw.adapt(model, DORA)
    for path, layer in adapted_modules(model):
        torch.testing.assert_close(layer.delta.magnitude.detach(), norms[path], rtol=1e-6, atol=0)


@backends
def test_weight_matrix_is_the_dequantized_weight(backend: str) -> None:
    model = quantize(_float_model(), backend)
    for path in ("0", "2"):
        layer = model.get_submodule(path)
        # bitsandbytes' int8 dequantization multiplies by 1/127 where the reference divides by 127
        torch.testing.assert_close(geometry.weight_matrix(layer, "linear"), dequantized(layer), rtol=1e-6, atol=0)
        assert geometry.matrix_shape(layer, "linear") == dequantized(layer).shape


@backends
def test_summary_counts_the_values_a_quantized_weight_stands_for(backend: str) -> None:
    model = rw.adapt(quantize(_float_model(), backend), LORA)
    expected = sum(p.numel() for p in _float_model().parameters()) + rw.summary(model).trainable
    assert rw.summary(model).total == expected


@backends
def test_merge_refuses_and_changes_nothing(backend: str) -> None:
    model = _adapted(backend, LORA)
    x = _input()
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    refusal = r"cannot merge into '0': its base weight is quantized.*unwrap\(model, merge=True"
    with pytest.raises(TypeError, match=refusal):
        rw.merge(model)
    assert not any(layer.merged for _, layer in adapted_modules(model))
    assert all(same(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)


@backends
def test_unwrap_merge_inside_disabled_refuses_as_merge_does(backend: str) -> None:
    # Inside the block the model is its base: a merge there is refused on a float base, so it must
    # be on a quantized one too, where unwrap(merge=True) computes the merged weights itself.
    model = _adapted(backend, LORA)
    x = _input()
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    with rw.disabled(model), pytest.raises(ValueError, match=r"cannot merge inside `with rankwise.disabled"):
        rw.unwrap(model, merge=True)
    assert [type(m).__name__ for m in model] == ["Adapted", "GELU", "Adapted"]
    assert all(same(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)


@backends
@pytest.mark.parametrize("config", [LORA, DORA], ids=["lora", "dora"])
def test_unwrap_merge_is_a_float_model_of_dequantized_w0_plus_delta(backend: str, config) -> None:
    model = _adapted(backend, config)
    x = _input()
    expected = model(x).detach()
    merged = {}
    for path, layer in adapted_modules(model):  # independent: the backend's dequantization, the method's W'
        merged[path] = layer.delta.merged_weight(dequantized(layer.base)).detach()
    bias = {path: layer.base.bias.detach().clone() for path, layer in adapted_modules(model)}
    plain = rw.unwrap(model, merge=True)
    for path in ("0", "2"):
        layer = plain.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        torch.testing.assert_close(layer.weight, merged[path], rtol=1e-6, atol=1e-7)
        assert torch.equal(layer.bias, bias[path])
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)


@backends
def test_unwrap_merge_dtype(backend: str) -> None:
    model = _adapted(backend, LORA)
    merged = {
        path: (dequantized(layer.base) + layer.delta.delta_weight()).detach() for path, layer in adapted_modules(model)
    }
    plain = rw.unwrap(model, merge=True, dtype=torch.bfloat16)
    for path, weight in merged.items():
        layer = plain.get_submodule(path)
        assert type(layer) is nn.Linear and layer.weight.dtype == layer.bias.dtype == torch.bfloat16
        assert torch.equal(layer.weight, weight.to(torch.bfloat16))


@backends
def test_unwrap_without_merge_gives_the_quantized_layers_back(backend: str) -> None:
    base = quantize(_float_model(), backend)
    x = _input()
    expected = base(x)
    layers = [base[0], base[2]]
    model = rw.unwrap(rw.adapt(base, LORA), merge=False)
    assert [model[0], model[2]] == layers
    assert torch.equal(model(x), expected)


@backends
def test_unwrap_merge_dequantizes_the_layers_not_adapted_too(backend: str) -> None:
    model = quantize(_float_model(), backend)
    w0 = dequantized(model[0])
    model = rw.adapt(model, rw.LoRAConfig(rank=2, targets=("2",)))
    x = _input()
    expected = model(x).detach()
    plain = rw.unwrap(model, merge=True)
    assert [type(m) for m in plain.modules()] == [nn.Sequential, nn.Linear, nn.GELU, nn.Linear]
    torch.testing.assert_close(plain[0].weight, w0, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)


def test_unwrap_merge_refuses_a_quantized_layer_it_cannot_read() -> None:
    model = quantize(_float_model(), "bnb-nf4")
    model[2] = _torchao_intx()[0]  # not adapted, and of a layout rankwise cannot dequantize
    model = rw.adapt(model, rw.LoRAConfig(rank=2, targets=("0",)))
    with pytest.raises(TypeError, match=r"unwrap\(merge=True\) returns a float model: '2' is a Linear with a Intx"):
        rw.unwrap(model, merge=True)
    assert len(list(adapted_modules(model))) == 1


def test_unwrap_merge_of_a_transformers_4bit_model_saves_a_float_checkpoint(tmp_path) -> None:
    # The QLoRA recipe of docs/qlora.md: load 4-bit with transformers, adapt, unwrap, save, reload.
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama(torch.float32).save_pretrained(tmp_path / "base")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4, dtype=torch.float32)
    assert model.hf_quantizer is not None
    # Keeps bitsandbytes off its CPU inference kernel, whose bf16 arithmetic the float model does not share.
    rw.prepare_for_quantized_training(model, gradient_checkpointing=False)
    model = rw.adapt(model, rw.LoRAConfig(rank=2, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            layer.delta.B.normal_(0, 0.05)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids).logits.detach()
    plain = rw.unwrap(model, merge=True, dtype=torch.float32)
    assert not [name for name, m in plain.named_modules() if geometry.quantized.is_quantized(m)]
    assert getattr(plain, "hf_quantizer", None) is None and getattr(plain.config, "quantization_config", None) is None
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert getattr(reloaded, "hf_quantizer", None) is None
    assert torch.equal(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits)


@backends
def test_two_named_adapters_on_a_quantized_base(backend: str) -> None:
    # Each active adapter adds its difference to the quantized forward; unwrap merges both into Ŵ0.
    base = quantize(_float_model(), backend)
    x = _input()
    expected = base(x)
    model = rw.adapt(base, DORA)
    model = rw.adapt(model, LORA, name="second")
    rw.set_active(model, ["default", "second"])
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            for name in ("default", "second"):
                for p in layer.adapter(name).parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
    merged = {}
    for path, layer in adapted_modules(model):  # W0 + Σ (W'_i − W0), from the backend's own dequantization
        w0 = dequantized(layer.base)
        merged[path] = w0 + sum(layer.adapter(n).merged_weight(w0).detach() - w0 for n in ("default", "second"))
    y = model(x).detach()
    plain = rw.unwrap(model, merge=True)
    for path, weight in merged.items():
        torch.testing.assert_close(plain.get_submodule(path).weight, weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain(x), y, rtol=1e-4, atol=1e-5)


def test_unwrap_dtype_is_refused_where_it_means_nothing() -> None:
    model = _adapted("bnb-nf4", LORA)
    with pytest.raises(ValueError, match="merge=False keeps the quantized layers"):
        rw.unwrap(model, merge=False, dtype=torch.bfloat16)
    float_model = rw.adapt(_float_model(), LORA)
    with pytest.raises(ValueError, match="this model has no quantized layer"):
        rw.unwrap(float_model, merge=True, dtype=torch.bfloat16)
    assert len(list(adapted_modules(model))) == len(list(adapted_modules(float_model))) == 2


@backends
@pytest.mark.parametrize("config", [LORA, DORA], ids=["lora", "dora"])
def test_save_load_round_trips_onto_quantized_and_float_bases(backend: str, config, tmp_path) -> None:
    model = _adapted(backend, config)
    rw.save_adapter(model, tmp_path)
    record = rw.read_adapter_config(tmp_path)[0]["modules"]["2"]
    assert (record["base"], record["in_features"], record["out_features"]) == ("linear", 64, 32)
    saved = rw.adapter_state_dict(model)
    x = _input()
    for base in (quantize(_float_model(), backend), _float_model()):
        loaded = rw.load_adapter(base, tmp_path)
        state = rw.adapter_state_dict(loaded)
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert torch.equal(rw.load_adapter(quantize(_float_model(), backend), tmp_path)(x), model(x))


def _unquantized_4bit() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    return nn.Sequential(bnb.nn.Linear4bit(64, 64))  # quantized only on a move to a device


def _fp16_weights_8bit() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    return nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True)).to("cpu")


def _torchao_intx() -> nn.Module:
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 64))
    quantize_(model, IntxWeightOnlyConfig())
    return model


def _int8_weight() -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int8), requires_grad=False)
    return model


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_unquantized_4bit, "'0' is a Linear4bit whose weight is not quantized yet"),
        (_fp16_weights_8bit, "'0' is a Linear8bitLt with has_fp16_weights=True"),
        (_torchao_intx, "'0' is a Linear with a IntxUnpackedToInt8Tensor weight .* rankwise cannot read"),
        (_int8_weight, "'0' is a Linear with a Parameter weight of dtype torch.int8, a quantized layout"),
    ],
)
def test_an_unsupported_quantized_layer_is_refused_and_the_model_unchanged(build, message) -> None:
    model = build()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(TypeError, match=message):
        rw.adapt(model, LORA.__class__(rank=2, targets=("0",)))
    assert not list(adapted_modules(model))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


@backends
def test_compressors_and_gora_refuse_a_quantized_base(backend: str) -> None:
    model = quantize(_float_model(), backend)
    layer = model[0]
    with pytest.raises(TypeError, match=r"lord: '0' has a quantized weight .* compress the float model"):
        rw.compress.lord(model, targets=("0",), rank_ratio=0.5)
    assert model[0] is layer
    model = rw.adapt(model, rw.GoRAConfig(rank=2, targets=("0",)))
    with pytest.raises(TypeError, match="gora reads the gradient of each base weight; '0' is quantized"):
        rw.allocate.gora(model, [(_input(), None)], loss_fn=lambda m, batch: m(batch[0]).sum())


def test_4bit_weight_in_the_cpu_inference_packing() -> None:
    # On a CPU with AVX512-BF16, an eval-mode forward without gradients repacks a Linear4bit's weight
    # for bitsandbytes' CPU kernel (scales rounded to bf16); rankwise still reads it.
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    model = quantize(_float_model(), "bnb-nf4").eval()
    before = dequantized(model[0])
    x = _input()
    with torch.no_grad():
        expected = model(x)
    assert model[0].weight.quant_state.packing_format_for_cpu
    packed = model[0].weight.data.clone()
    model = rw.adapt(model, DORA)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    layer = model.get_submodule("0")
    assert torch.equal(layer.base.weight.data, packed)  # read through copies, the layer left packed
    torch.testing.assert_close(geometry.weight_matrix(layer.base, "linear"), before, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(layer.delta.magnitude.detach(), before.norm(dim=1), rtol=1e-2, atol=0)


def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    pytest.importorskip("transformers")
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
    return tiny_llama(128, max_position_embeddings=64, tie_word_embeddings=False, **sizes).to(dtype)


def test_prepare_for_quantized_training_on_a_4bit_llama() -> None:
    model = quantize(_tiny_llama(torch.bfloat16), "bnb-nf4", exclude=("lm_head",), compute_dtype=torch.bfloat16)
    import bitsandbytes as bnb

    packed = {name: p.detach().clone() for name, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    assert len(packed) == 2 * 7 and model.model.norm.weight.dtype == torch.bfloat16
    assert rw.prepare_for_quantized_training(model) is model
    for name, p in model.named_parameters():
        if name in packed:
            assert torch.equal(p, packed[name]), name  # the 4-bit codes are left as they are
        else:
            assert p.dtype == torch.float32, name  # norms, embeddings, head
    # transformers 5 renamed the flag (the old name is a deprecated alias); the floor, 4.56, has the old one.
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert model.get_input_embeddings()(ids).requires_grad  # input grads for reentrant checkpoints
    model = rw.adapt(model, rw.LoRAConfig(rank=2, targets=("q_proj", "v_proj")))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for path, layer in adapted_modules(model):  # B starts at 0: its gradient is the first to appear
        assert layer.delta.B.grad is not None and layer.delta.B.grad.abs().sum() > 0, path


def test_prepare_puts_back_a_4bit_weight_repacked_for_cpu_inference() -> None:
    # bitsandbytes' CPU inference kernel, which an eval-mode forward without gradients switches a
    # Linear4bit to on an AVX512-BF16 CPU, has no backward: the input would get no gradient.
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    model = quantize(_float_model(), "bnb-nf4").eval()
    with torch.no_grad():
        model(_input())
    assert model[0].weight.quant_state.packing_format_for_cpu
    rw.prepare_for_quantized_training(model, gradient_checkpointing=False)
    assert not model[0].weight.quant_state.packing_format_for_cpu
    with torch.no_grad():
        model(_input())  # an evaluation no longer repacks
    assert not model[0].weight.quant_state.packing_format_for_cpu
    x = _input().requires_grad_(True)
    model[0](x).sum().backward()
    expected = torch.ones(2, 5, 64) @ dequantized(model[0])  # d(sum(x Wᵀ + b))/dx
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_prepare_needs_a_transformers_model_for_checkpointing() -> None:
    model = _float_model(torch.bfloat16)
    with pytest.raises(TypeError, match=r"Sequential has no gradient_checkpointing_enable.*checkpointing=False"):
        rw.prepare_for_quantized_training(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    rw.prepare_for_quantized_training(model, gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
