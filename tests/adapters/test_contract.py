"""The contract every registered method keeps, on every base it declares. It names no method:
registering a method is what puts it under test."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.core import registry
from rankwise.core.delta import Delta
from rankwise.core.inject import adapted_modules

from _adapters import perturb
from _bases import PAD, VOCAB, Bases, base_input, cases


def _linear() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 512))


def _conv1d() -> nn.Module:  # GPT-2 layout: Conv1D(nf=out, nx=in), weight (in, out)
    model = nn.Sequential(Conv1D(256, 256), nn.GELU(), Conv1D(512, 256))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.weight, std=0.05)
        nn.init.normal_(layer.bias, std=0.05)
    return model


def _pointwise_conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(256, 256, 1), nn.GELU(), nn.Conv2d(256, 512, 1))


def _spatial_conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2))


def _embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(VOCAB, 256, padding_idx=PAD), nn.GELU(), nn.Linear(256, 512))


BASES: Bases = {
    "linear": ("linear", _linear, (2, 5, 256)),
    "embedding": ("embedding", _embedding, (2, 5)),
    "conv1d": ("conv1d", _conv1d, (2, 5, 256)),
    "conv2d-1x1": ("conv2d", _pointwise_conv, (2, 256, 3, 3)),
    "conv2d-3x3": ("conv2d", _spatial_conv, (2, 16, 6, 6)),
}


def _model(base: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BASES[base][1]()


def _input(base: str) -> torch.Tensor:
    return base_input(BASES, base, seed=1)


def _adapted(name: str, base: str) -> nn.Module:
    config = rw.make_config(name, targets=("0", "2"))
    return rw.adapt(_model(base), config)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _assert_finite_gradients(model: nn.Module) -> None:
    for path, layer in adapted_modules(model):
        for param_name, p in layer.delta.named_parameters():
            assert p.grad is not None and p.grad.isfinite().all(), f"{path}.delta.{param_name}"


@pytest.mark.parametrize(("name", "base"), cases(BASES))
class TestContract:
    def test_identity_at_init(self, name: str, base: str) -> None:
        if not registry.get(name).module_class.identity_at_init:
            pytest.skip(f"{name} does not promise the base model at init")
        x = _input(base)
        expected = _model(base)(x)
        _close(_adapted(name, base)(x), expected)

    def test_zero_row_of_w0_keeps_step_0_exact_and_finite(self, name: str, base: str) -> None:
        # A pruned unit is a zero row of W0; a method that divides by W0's row norms (the
        # magnitude/direction methods) must not turn it into 0 / 0.
        if not registry.get(name).module_class.identity_at_init:
            pytest.skip(f"{name} does not promise the base model at init")
        model = _model(base)
        with torch.no_grad():
            for layer in (model[0], model[2]):
                rw.core.geometry.weight_matrix(layer, BASES[base][0])[3].zero_()
        x = _input(base)
        expected = model(x)
        model = rw.adapt(model, rw.make_config(name, targets=("0", "2")))
        y = model(x)
        _close(y, expected)
        y.square().mean().backward()
        _assert_finite_gradients(model)

    def test_factored_forward_matches_delta_weight(self, name: str, base: str) -> None:
        model = _adapted(name, base)
        perturb(model, seed=2)
        x = _input(base)
        for _, layer in adapted_modules(model):
            features = torch.randn(7, layer.delta.in_features)
            w0 = rw.core.geometry.weight_matrix(layer.base, layer.kind)
            if isinstance(layer.delta, Delta):
                _close(layer.delta(features), features @ layer.delta.delta_weight().T)
            elif layer.delta.mergeable:
                _close(layer.delta(features, w0), features @ layer.delta.merged_weight(w0).T)
        assert model(x).isfinite().all()

    def test_merge_unmerge(self, name: str, base: str) -> None:
        model = _adapted(name, base)
        if not registry.get(name).module_class.mergeable:
            for _, layer in adapted_modules(model):
                with pytest.raises(TypeError, match="no merged form"):
                    layer.merged_weight()
            with pytest.raises(TypeError, match="no merged form"):
                rw.merge(model)
            return
        perturb(model, seed=2)
        x = _input(base)
        before = {p: layer.base.weight.detach().clone() for p, layer in adapted_modules(model)}
        unmerged = model(x)
        rw.merge(model)
        assert all(layer.merged for _, layer in adapted_modules(model))
        _close(model(x), unmerged)
        rw.unmerge(model)
        for path, layer in adapted_modules(model):
            _close(layer.base.weight, before[path])
        _close(model(x), unmerged)

    def test_merged_weight_is_a_query(self, name: str, base: str) -> None:
        # merged_weight() asks what a merge would write; asked of a merged layer, with steps
        # counted since the merge, it must not change what unmerge writes back.
        if not registry.get(name).module_class.mergeable:
            pytest.skip(f"{name} has no merged form")
        model = _adapted(name, base)
        perturb(model, seed=2)
        rw.step(model)  # a step-dependent update is zero at step 0; merge would have nothing to do
        before = {p: layer.base.weight.detach().clone() for p, layer in adapted_modules(model)}
        rw.merge(model)
        merged = {p: layer.base.weight.detach().clone() for p, layer in adapted_modules(model)}
        rw.step(model)
        for path, layer in adapted_modules(model):
            w = rw.core.geometry.weight_matrix(layer.base, layer.kind).detach()
            layer.merged_weight()
            layer.delta.merged_weight(w)
            layer.delta.merged_with_state(w)
            assert torch.equal(layer.base.weight, merged[path])
        rw.unmerge(model)
        for path, layer in adapted_modules(model):
            _close(layer.base.weight, before[path])

    def test_unwrap_restores_types_and_keys(self, name: str, base: str) -> None:
        plain = _model(base)
        model = _adapted(name, base)
        perturb(model, seed=2)
        x = _input(base)
        expected = model(x)
        merge = registry.get(name).module_class.mergeable
        model = rw.unwrap(model, merge=merge)
        assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
        assert model.state_dict().keys() == plain.state_dict().keys()
        _close(model(x), expected if merge else plain(x))

    def test_save_load_bit_exact(self, name: str, base: str, tmp_path) -> None:
        model = _adapted(name, base)
        perturb(model, seed=2)
        rw.save_adapter(model, tmp_path)
        loaded = rw.load_adapter(_model(base), tmp_path)
        saved_state, loaded_state = rw.adapter_state_dict(model), rw.adapter_state_dict(loaded)
        assert saved_state.keys() == loaded_state.keys()
        for key in saved_state:
            assert torch.equal(saved_state[key], loaded_state[key]), key
        x = _input(base)
        assert torch.equal(model(x), loaded(x))

    def test_trainable_count_is_the_formula(self, name: str, base: str) -> None:
        model = _adapted(name, base)
        module_class = registry.get(name).module_class
        expected = sum(
            module_class.num_params(layer.delta.in_features, layer.delta.out_features, layer.delta.config)
            for _, layer in adapted_modules(model)
        )
        assert rw.summary(model).trainable == expected
        adapter_params = {id(p) for _, layer in adapted_modules(model) for p in layer.delta.parameters()}
        for param_name, p in model.named_parameters():
            assert p.requires_grad == (id(p) in adapter_params), param_name

    def test_every_adapter_parameter_gets_a_finite_gradient(self, name: str, base: str) -> None:
        model = _adapted(name, base)
        perturb(model, seed=2)
        model(_input(base)).square().mean().backward()
        _assert_finite_gradients(model)

    def test_bad_config_values_raise_naming_the_field(self, name: str, base: str) -> None:
        config_class = registry.get(name).config_class
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            with pytest.raises(ValueError, match=field.name):
                config_class(**{field.name: object()})
            if hints[field.name] is int:
                with pytest.raises(ValueError, match=field.name):
                    config_class(**{field.name: -1})
        config = rw.make_config(name, targets=("0", "2"))
        assert config_class.from_dict(config.to_dict()) == config
        with pytest.raises(ValueError, match="no_such_field"):
            config_class.from_dict({**config.to_dict(), "no_such_field": 1})
