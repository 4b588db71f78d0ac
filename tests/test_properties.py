"""Property-based contract: for random layer shapes, sizes and dtypes, every registered method
merges to what it computes, saves and loads exactly, and counts its parameters by its formula."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
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
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(
    in_features=WIDTHS, out_features=WIDTHS, size=st.sampled_from([1, 2, 4, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
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
