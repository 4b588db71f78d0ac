"""A bf16 base with fp32 adapters trains and merges, for every registered method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core import registry
from rankwise.core.inject import adapted_modules


@pytest.mark.parametrize("name", registry.methods())
def test_bf16_base_fp32_adapter_trains_and_merges(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 512)).to(torch.bfloat16)
    model = rw.adapt(model, rw.make_config(name, targets=("0", "2")))
    layers = [layer for _, layer in adapted_modules(model)]
    assert all(p.dtype == torch.float32 for layer in layers for p in layer.delta.parameters())
    with torch.no_grad():
        for layer in layers:
            for p in layer.delta.parameters():
                p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16 and y.isfinite().all()
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for layer in layers for p in layer.delta.parameters())
    if not registry.get(name).module_class.mergeable:
        return
    # The merged weight is rounded once to bf16; compare the weights, where that rounding is the
    # only error (outputs add the rounding of every activation on top).
    expected = [layer.delta.merged_weight(layer.base.weight.float()).detach() for layer in layers]
    rw.merge(model)
    for layer, weight in zip(layers, expected, strict=True):
        error = (layer.base.weight.float() - weight).abs().max()
        assert error <= torch.finfo(torch.bfloat16).eps * weight.abs().max(), layer


@pytest.mark.parametrize("name", registry.methods())
def test_fp32_model_under_autocast_bf16_matches_fp32_and_trains(name: str) -> None:
    torch.manual_seed(0)
    model = rw.adapt(
        nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 512)), rw.make_config(name, targets=("0", "2"))
    )
    layers = [layer for _, layer in adapted_modules(model)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.delta.parameters():
                p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(4, 256)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    # bf16 keeps 8 bits of mantissa: a few parts in a thousand of the output's scale.
    assert (y.float() - reference).abs().max() <= 0.02 * reference.abs().max()
    y.float().square().mean().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
        for layer in layers
        for p in layer.delta.parameters()
    )
