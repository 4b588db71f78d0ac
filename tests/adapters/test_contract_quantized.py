"""The contract every registered method keeps on quantized bases (bitsandbytes 4-bit nf4 and
8-bit, torchao int8 weight-only): step 0 is the quantized model's output, only the adapters get
gradients, and training lowers the loss. Skipped where the backend is not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import registry
from rankwise.core.inject import adapted_modules

from _fit import fit
from _quantized import BACKENDS, quantize, same


def _float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))


def _input() -> torch.Tensor:
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))


def _config(name: str) -> rw.AdapterConfig:
    example = registry.get(name).module_class.example_config
    return rw.make_config(name, targets=("0", "2"), **example)


CASES = [pytest.param(name, backend, id=f"{name}-{backend}") for name in registry.methods() for backend in BACKENDS]


@pytest.mark.parametrize(("name", "backend"), CASES)
class TestQuantizedContract:
    def test_step_0_is_the_quantized_output(self, name: str, backend: str) -> None:
        if not registry.get(name).module_class.identity_at_init:
            pytest.skip(f"{name} does not promise the base model at init")
        # The recipe's first step: without it, an eval-mode forward on an AVX512-BF16 CPU would
        # re-quantize the 4-bit weights (bf16 scales) under an adapter initialized from the old ones.
        model = rw.prepare_for_quantized_training(quantize(_float_model(), backend), gradient_checkpointing=False)
        x = _input()
        expected = model(x)
        model = rw.adapt(model, _config(name))
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
        # In eval mode without gradients bitsandbytes' int8 kernel quantizes the activations, so
        # the base's output is not x Ŵ0ᵀ + b: the adapted model still starts at it.
        with torch.no_grad(), rw.disabled(model.eval()):
            expected = model(x)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)

    def test_gradients_reach_only_the_adapters(self, name: str, backend: str) -> None:
        model = rw.adapt(quantize(_float_model(), backend), _config(name))
        model(_input()).square().mean().backward()
        adapter = {id(p) for _, layer in adapted_modules(model) for p in layer.delta.parameters()}
        for param_name, p in model.named_parameters():
            if id(p) in adapter:
                assert p.grad is not None and p.grad.isfinite().all(), param_name
            else:
                assert not p.requires_grad and p.grad is None, param_name

    def test_training_lowers_the_loss_and_leaves_the_base(self, name: str, backend: str) -> None:
        model = quantize(_float_model(), backend)
        x = _input()
        shift = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) / 8
        target = (model(x) + x @ shift.T).detach()  # reachable in part by a ΔW on the last layer
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        method = registry.get(name)
        model = rw.adapt(model, method.module_class.for_run(_config(name), 10))
        losses = fit(model, x, target, lr=10 * method.config_class.recommended_lr, steps=10)
        assert losses[-1] < 0.999 * losses[0], losses
        state = rw.unwrap(model, merge=False).state_dict()
        assert state.keys() == base_state.keys()
        for key, value in base_state.items():
            assert same(state[key], value), key

    def test_no_float_copy_of_the_base_is_kept(self, name: str, backend: str) -> None:
        # Methods that read W0 (norms, LU factors, blocks) dequantize it where needed; the adapter's
        # own tensors stay smaller than one (out, in) matrix at the example configs.
        model = rw.adapt(quantize(_float_model(), backend), _config(name))
        for path, layer in adapted_modules(model):
            sizes = {key: tensor.numel() for key, tensor in layer.delta.state_dict().items()}
            assert max(sizes.values()) < 64 * 64, (path, sizes)
