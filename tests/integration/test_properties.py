"""Property-based contract: for random layer shapes, sizes and dtypes, every registered method
merges to what it computes, saves and loads exactly, and counts its parameters by its formula; and
on models with tied weights and modules registered twice, a merge is refused or exact."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import rankwise as rw
from rankwise.core import registry

# Any width, or a multiple of 8 (block and group methods need a divisible width to be exercised).
WIDTHS = st.one_of(st.integers(1, 48), st.integers(1, 8).map(lambda n: 8 * n))
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def _build(name: str, in_features: int, out_features: int, size: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    method = registry.get(name)
    knob = method.config_class.size_knob
    try:
        config = rw.make_config(name, targets="0", **({knob: size} if knob else {}))
        return rw.adapt(nn.Sequential(nn.Linear(in_features, out_features).to(dtype)), config)
    except ValueError:
        assume(False)  # the shape does not fit this method's size (e.g. a block size must divide it)


@pytest.mark.parametrize("name", registry.methods())
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(
    in_features=WIDTHS,
    out_features=WIDTHS,
    size=st.sampled_from([1, 2, 4, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_contract_holds_for_random_shapes(name, in_features, out_features, size, dtype, seed) -> None:
    model = _build(name, in_features, out_features, size, dtype, seed)
    layer = model[0]
    with torch.no_grad():
        for p in layer.delta.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert rw.summary(model).trainable == layer.delta.num_params(in_features, out_features, layer.delta.config)

    x = torch.randn(3, in_features, dtype=dtype)
    y = model(x)
    with tempfile.TemporaryDirectory() as folder:
        rw.save_adapter(model, folder)
        torch.manual_seed(seed)
        loaded = rw.load_adapter(nn.Sequential(nn.Linear(in_features, out_features).to(dtype)), folder)
        assert torch.equal(loaded(x), y)
    if layer.delta.mergeable:
        rw.merge(model)
        tolerance = TOLERANCE[dtype] * max(1.0, y.abs().max().item())
        torch.testing.assert_close(model(x), y, rtol=tolerance, atol=tolerance)


class _Shared(nn.Module):
    """Square layers in a chain, where a layer may take another's weight (a tie, as an LM head and
    its embedding) and a module may be registered a second time further down the chain."""

    def __init__(self, width: int, count: int, ties: list[tuple[int, int]], repeats: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(count))
        for source, target in ties:
            self.layers[target].weight = self.layers[source].weight
        for index in repeats:
            self.layers.append(self.layers[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


MERGEABLE = [name for name in registry.methods() if registry.get(name).module_class.mergeable]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    data=st.data(),
    name=st.sampled_from(MERGEABLE),
    width=st.sampled_from([4, 8, 16]),
    count=st.integers(2, 4),
    size=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_merge_with_tied_or_shared_weights_is_refused_or_exact(data, name, width, count, size, seed) -> None:
    layer = st.integers(0, count - 1)
    ties = data.draw(st.lists(st.tuples(layer, layer).filter(lambda pair: pair[0] != pair[1]), max_size=2))
    repeats = data.draw(st.lists(layer, max_size=2))
    targets = data.draw(st.sets(layer, min_size=1))
    torch.manual_seed(seed)
    knob = registry.get(name).config_class.size_knob
    try:
        config = rw.make_config(
            name, targets=tuple(f"layers.{i}" for i in sorted(targets)), **({knob: size} if knob else {})
        )
        model = rw.adapt(_Shared(width, count, ties, repeats), config)
    except ValueError:
        assume(False)  # the width does not fit this method's size
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(3, width)
        y = model(x)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            rw.merge(model)
        except ValueError as error:
            event("merge refused")
            assert "is shared with" in str(error)
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
            assert torch.equal(model(x), y)
            return
        event("merged")
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)
