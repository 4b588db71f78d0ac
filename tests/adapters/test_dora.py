"""What DoRA promises beyond the contract: the detached norm (paper §4.3), its gradient, and no
full-size weight kept alive for backward."""

from __future__ import annotations

import torch
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules


def _dora(out_features: int = 12, in_features: int = 20):
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), rw.DoRAConfig(rank=3, alpha=6, targets="0"))
    layer = next(layer for _, layer in adapted_modules(model))
    with torch.no_grad():
        nn.init.normal_(layer.delta.B, std=0.3)
        layer.delta.magnitude.mul_(1.5)
    return model, layer


def test_forward_and_gradients_match_the_dense_formula_with_a_detached_norm() -> None:
    model, layer = _dora()
    w0, bias = layer.base.weight, layer.base.bias
    A = layer.delta.A.detach().clone().requires_grad_()
    B = layer.delta.B.detach().clone().requires_grad_()
    m = layer.delta.magnitude.detach().clone().requires_grad_()
    x = torch.randn(5, 20)

    v = w0 + 2.0 * B @ A  # s = α / r = 2
    dense = x @ ((m / v.norm(dim=1).detach()).unsqueeze(1) * v).T + bias
    dense.square().sum().backward()
    model(x).square().sum().backward()

    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
    for ours, reference in ((layer.delta.A, A), (layer.delta.B, B), (layer.delta.magnitude, m)):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-5)


def test_gradients_match_the_dense_formula_without_a_bias() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(20, 12, bias=False)), rw.DoRAConfig(rank=3, alpha=6, targets="0"))
    layer = next(layer for _, layer in adapted_modules(model))
    with torch.no_grad():
        nn.init.normal_(layer.delta.B, std=0.3)
        layer.delta.magnitude.mul_(1.5)
    A, B, m = (t.detach().clone().requires_grad_() for t in (layer.delta.A, layer.delta.B, layer.delta.magnitude))
    x = torch.randn(2, 5, 20)
    v = layer.base.weight + 2.0 * B @ A  # s = α / r = 2
    (x @ ((m / v.norm(dim=1).detach()).unsqueeze(1) * v).T).square().sum().backward()
    model(x).square().sum().backward()
    for ours, reference in ((layer.delta.A, A), (layer.delta.B, B), (layer.delta.magnitude, m)):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-5)


def test_direction_norm_equals_the_explicit_row_norm() -> None:
    _, layer = _dora()
    w0 = layer.base.weight
    explicit = (w0 + layer.delta.scale * layer.delta.B @ layer.delta.A).norm(dim=1)
    torch.testing.assert_close(layer.delta.direction_norm(w0), explicit, rtol=1e-6, atol=1e-6)


def test_no_full_size_temporary_is_saved_for_backward() -> None:
    model, layer = _dora(out_features=64, in_features=96)
    weight_storage = layer.base.weight.untyped_storage().data_ptr()
    full_size = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= 64 * 96 and t.untyped_storage().data_ptr() != weight_storage:
            full_size.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(4, 96)).sum().backward()
    assert full_size == []
