"""What methods declare (core.capabilities), checked against what they do; no method is named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import registry
from rankwise.core.capabilities import Factored
from rankwise.core.delta import Delta


@pytest.mark.parametrize("name", registry.methods())
@pytest.mark.parametrize("shape", [(4, 4), (8, 4), (4, 8), (32, 16), (64, 32)], ids=str)
def test_the_example_config_fits_narrow_layers(name: str, shape: tuple[int, int]) -> None:
    in_features, out_features = shape
    example = registry.get(name).module_class.example_config
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), rw.make_config(name, targets="0", **example))
    assert model(torch.randn(2, in_features)).shape == (2, out_features)


def test_factors_have_the_declared_shapes_and_are_the_update_of_an_additive_method() -> None:
    factored = {}
    for name in registry.methods():
        torch.manual_seed(0)
        module_class = registry.get(name).module_class
        config = rw.make_config(name, targets="0", **module_class.example_config)
        delta = rw.adapt(nn.Sequential(nn.Linear(12, 8)), config)[0].delta
        factored[name] = isinstance(delta, Factored)
        if not factored[name]:
            continue
        with torch.no_grad():
            for p in delta.parameters():
                p.add_(0.1 * torch.randn_like(p))
        A, B, scale = delta.factors()
        assert A.shape == (A.shape[0], 12) and B.shape == (8, A.shape[0]), name
        if isinstance(delta, Delta):
            torch.testing.assert_close(delta.delta_weight(), scale * B @ A, msg=name)
    # The protocol is a real distinction: otherwise this test checks everything or nothing.
    assert set(factored.values()) == {True, False}
