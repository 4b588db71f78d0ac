"""``rw.combine``: exact where a method declares it (every such method, read from the class), refused
with a message naming what works elsewhere, and the model unchanged on every refusal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import registry
from rankwise.core.adapted import Adapted
from rankwise.core.delta import Adapter

from _adapters import two_adapters


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def _config(method: str, **overrides: object) -> rw.AdapterConfig:
    example = dict(registry.get(method).module_class.example_config)
    return rw.make_config(method, targets=("0", "2"), **{**example, **overrides})


def _two(config_a: rw.AdapterConfig, config_b: rw.AdapterConfig) -> nn.Module:
    return two_adapters(_base(), config_a, config_b)


def _exact(method: str) -> bool:
    """Whether the method declares an exact combination (overrides ``Adapter.combined``)."""
    return registry.get(method).module_class.combined.__func__ is not Adapter.combined.__func__


def _update(layer: Adapted, name: str) -> torch.Tensor:
    w0 = layer.base.weight.detach()
    return layer.adapters[name].merged_weight(w0) - w0


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, rw.adapter_names(model)


def _unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[str]]) -> bool:
    state, names = before
    now = model.state_dict()
    return (
        names == rw.adapter_names(model)
        and now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in state)
    )


EXACT = [m for m in registry.methods() if _exact(m)]
REFUSED = [m for m in registry.methods() if not _exact(m)]


def test_the_methods_that_combine_exactly_are_the_factored_and_the_linear_structured_ones() -> None:
    # Which classes declare it, so that a method losing or gaining the form is noticed here.
    assert len(EXACT) >= 8 and len(REFUSED) >= 5


@pytest.mark.parametrize("method", EXACT)
def test_combination_is_the_weighted_sum_of_the_updates(method: str, tmp_path: Path) -> None:
    model = _two(_config(method), _config(method))
    rw.combine(model, {"a": 0.7, "b": 0.3}, name="ab")
    assert rw.adapter_names(model) == ["a", "b", "ab"] and rw.active_adapters(model) == ["a"]
    for layer in (model[0], model[2]):
        expected = 0.7 * _update(layer, "a") + 0.3 * _update(layer, "b")
        assert expected.abs().max() > 1e-3  # both adapters have an update to combine
        torch.testing.assert_close(_update(layer, "ab"), expected, rtol=1e-5, atol=1e-6)
    # The combined adapter saves and loads like any other (its own sizes, e.g. rank r_a + r_b).
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    rw.set_active(model, "ab")
    rw.save_adapter(model, tmp_path, name="ab")
    loaded = rw.load_adapter(_base(), tmp_path).eval()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method", REFUSED)
def test_methods_without_an_exact_form_refuse_naming_merge_and_change_nothing(method: str) -> None:
    model = _two(_config(method), _config(method))
    before = _snapshot(model)
    with pytest.raises((TypeError, ValueError), match=r"combine on '0': .*merge"):
        rw.combine(model, {"a": 0.7, "b": 0.3}, name="ab")
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"structure": "toeplitz"}, "no exact combination"),
        ({"structure": "kronecker", "kron_factor": 4}, "no exact combination"),
    ],
)
def test_structured_forms_that_are_products_refuse(overrides: dict[str, object], match: str) -> None:
    method = rw.SURMConfig.method
    model = _two(_config(method, **overrides), _config(method, **overrides))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        rw.combine(model, {"a": 0.5, "b": 0.5}, name="ab")
    assert _unchanged(model, before)


def test_a_one_sign_update_refuses_a_negative_weight_and_combines_zero_ramps() -> None:
    method = rw.SingLoRAConfig.method
    model = _two(_config(method), _config(method))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"weights \[-0.3\] are negative.*merge"):
        rw.combine(model, {"a": 0.7, "b": -0.3}, name="ab")
    assert _unchanged(model, before)
    fresh = rw.adapt(_base(), _config(method), name="a")  # step 0: u = 0, every update is zero
    rw.adapt(fresh, _config(method), name="b")
    rw.combine(fresh, {"a": 0.7, "b": 0.3}, name="ab")
    rw.set_active(fresh, ["a", "b", "ab"])  # rw.step advances active adapters only
    for _ in range(10):
        rw.step(fresh)
    for layer in (fresh[0], fresh[2]):  # the columns kept their weights: exact once the ramps move on
        expected = 0.7 * _update(layer, "a") + 0.3 * _update(layer, "b")
        torch.testing.assert_close(_update(layer, "ab"), expected, rtol=1e-5, atol=1e-7)


def test_a_structured_sum_of_terms_combines_side_by_side() -> None:
    config = _config(rw.SURMConfig.method, structure="ldr", displacement_rank=2)
    model = _two(config, config)
    rw.combine(model, {"a": 0.7, "b": -0.3}, name="ab")
    assert model[0].adapters["ab"].a.shape[0] == 4
    for layer in (model[0], model[2]):
        expected = 0.7 * _update(layer, "a") - 0.3 * _update(layer, "b")
        torch.testing.assert_close(_update(layer, "ab"), expected, rtol=1e-5, atol=1e-6)


BAD = [
    (
        "different methods",
        lambda: _two(_config(rw.LoRAConfig.method), _config(rw.C3AConfig.method)),
        {"a": 0.5, "b": 0.5},
        "ab",
        r"one method, got \{'a': 'lora', 'b': 'c3a'\}.*set_active.*merge",
    ),
    (
        "different layers",
        lambda: _two(_config(rw.LoRAConfig.method), rw.LoRAConfig(rank=2, targets=("0",))),
        {"a": 0.5, "b": 0.5},
        "ab",
        "same layers",
    ),
    ("unknown name", lambda: _two(_config("lora"), _config("lora")), {"a": 0.5, "c": 0.5}, "ab", r"unknown.*\['c'\]"),
    ("taken name", lambda: _two(_config("lora"), _config("lora")), {"a": 0.5}, "b", "already has an adapter named 'b'"),
    ("a NaN weight", lambda: _two(_config("lora"), _config("lora")), {"a": float("nan")}, "ab", "finite"),
    (
        "different block sizes",
        lambda: _two(_config(rw.C3AConfig.method), _config(rw.C3AConfig.method, block_size=8)),
        {"a": 0.5, "b": 0.5},
        "ab",
        "configs differ",
    ),
]


@pytest.mark.parametrize(("what", "build", "weights", "name", "match"), BAD, ids=[case[0] for case in BAD])
def test_bad_combinations_raise_one_clear_error_and_change_nothing(what, build, weights, name, match) -> None:
    model = build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        rw.combine(model, weights, name=name)
    assert _unchanged(model, before)


def test_approximate_gives_the_truncated_svd_of_the_weighted_sum_for_any_mergeable_methods() -> None:
    model = _two(_config(rw.LoRAConfig.method), _config(rw.C3AConfig.method))  # two methods: no exact form
    rw.combine(model, {"a": 0.6, "b": -0.4}, name="low", approximate=rw.LoRAConfig(rank=4))
    rw.combine(model, {"a": 0.6, "b": -0.4}, name="full", approximate=rw.LoRAConfig(rank=16))
    assert model[0].configs["low"].targets == ("0", "2") and model[0].adapters["low"].A.shape == (4, 16)
    for layer in (model[0], model[2]):
        target = 0.6 * _update(layer, "a") - 0.4 * _update(layer, "b")
        singular = torch.linalg.svdvals(target)
        error = torch.linalg.matrix_norm(_update(layer, "low") - target)
        torch.testing.assert_close(error, singular[4:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)  # Eckart–Young
        torch.testing.assert_close(_update(layer, "full"), target, rtol=1e-4, atol=1e-6)  # rank 16 = min(out, in)


def test_approximate_refuses_a_method_whose_update_is_not_its_factors_and_an_unmergeable_adapter() -> None:
    model = _two(_config(rw.LoRAConfig.method), _config(rw.LoRAConfig.method))
    before = _snapshot(model)
    with pytest.raises(TypeError, match="needs an additive method whose update is s·B·A"):
        rw.combine(model, {"a": 0.5, "b": 0.5}, name="ab", approximate=rw.DoRAConfig(rank=4))
    assert _unchanged(model, before)
    method = rw.SURMAdapterConfig.method
    output = _two(_config(method), _config(method))
    before = _snapshot(output)
    with pytest.raises(TypeError, match="no merged form to approximate"):
        rw.combine(output, {"a": 0.5, "b": 0.5}, name="ab", approximate=rw.LoRAConfig(rank=4))
    assert _unchanged(output, before)


def _differing(method: str) -> dict[str, object]:
    """A training field the method's combination cannot hold per part: its dropout, or LoLDU's
    train_scale."""
    fields = {f.name for f in dataclasses.fields(registry.get(method).config_class)}
    return {"dropout": 0.25} if "dropout" in fields else {"train_scale": True} if "train_scale" in fields else {}


@pytest.mark.parametrize("method", [m for m in EXACT if _differing(m)])
def test_adapters_whose_dropout_differs_refuse_and_change_nothing(method: str) -> None:
    # The new adapter takes one config: it would silently train with the first part's dropout.
    overrides = _differing(method)
    model = _two(_config(method), _config(method, **overrides))
    before = _snapshot(model)
    for weights in ({"a": 0.5, "b": 0.5}, {"b": 0.5, "a": 0.5}):
        with pytest.raises(ValueError, match=rf"configs differ in \['{next(iter(overrides))}'\]"):
            rw.combine(model, weights, name="ab")
    assert _unchanged(model, before)


def test_a_different_scale_is_folded_in_not_refused() -> None:
    model = _two(
        rw.LoRAConfig(rank=2, targets=("0", "2")), rw.LoRAConfig(rank=4, alpha=3.0, rslora=True, targets=("0", "2"))
    )
    rw.combine(model, {"a": 0.7, "b": 0.3}, name="ab")
    for layer in (model[0], model[2]):
        expected = 0.7 * _update(layer, "a") + 0.3 * _update(layer, "b")
        torch.testing.assert_close(_update(layer, "ab"), expected, rtol=1e-5, atol=1e-6)
