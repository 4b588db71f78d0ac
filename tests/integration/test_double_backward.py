"""Second derivatives (``create_graph=True``: gradient penalties, Hessian-vector products) through
every method. Several methods have written-out backward passes; they must stay differentiable, or
declare that they are not (``double_backward``). Checked numerically by ``gradgradcheck`` in
float64, with respect to the input and every trainable parameter, for the methods whose gradients
are the derivatives of their forward (``exact_gradients``); DoRA and BoRA detach their norms by
design, so DoRA is checked against the dense formula and BoRA with its norms not detached."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import rankwise as rw
from rankwise.core import registry
from rankwise.core.config import AdapterConfig


def _adapted(config: AdapterConfig) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(8, 4)).double(), config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # off the zero inits, so every second-order term is non-zero
        for p in trainable.values():
            p.add_(0.3 * torch.randn_like(p))
    return model, trainable


def _example(name: str, **overrides: object) -> AdapterConfig:
    return rw.make_config(name, targets="0", **{**registry.get(name).module_class.example_config, **overrides})


def _check_second_derivatives(model: nn.Module, trainable: dict[str, torch.Tensor], exact: bool) -> None:
    """``gradgradcheck`` where the gradients are exact; otherwise that second derivatives reach every
    trainable parameter and are finite."""
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def forward(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(trainable, values, strict=True)), (x,))

    inputs = (x, *(p.detach().requires_grad_() for p in trainable.values()))
    if exact:
        assert torch.autograd.gradgradcheck(forward, inputs)
        return
    (grad,) = torch.autograd.grad(forward(*inputs).square().sum(), inputs[0], create_graph=True)
    second = torch.autograd.grad(grad.square().sum(), inputs[1:], allow_unused=True)
    assert all(g is not None and g.isfinite().all() for g in second)


@pytest.mark.parametrize("name", registry.methods())
def test_second_derivatives_are_correct_or_refused(name: str) -> None:
    module_class = registry.get(name).module_class
    model, trainable = _adapted(_example(name))
    if module_class.double_backward:
        _check_second_derivatives(model, trainable, exact=module_class.exact_gradients)
        return
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()


def test_bora_with_norms_not_detached_has_exact_second_derivatives() -> None:
    _check_second_derivatives(*_adapted(_example("bora", detach_norms=False)), exact=True)


def test_dora_second_derivatives_equal_the_dense_formula_with_a_detached_norm() -> None:
    model, trainable = _adapted(_example("dora"))
    delta, base = model[0].delta, model[0].base
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def penalty(y: torch.Tensor) -> torch.Tensor:  # a gradient penalty: ‖∂(Σy²)/∂x‖²
        (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return grad.square().sum()

    ours = torch.autograd.grad(penalty(model(x)), list(trainable.values()))
    v = base.weight + delta.scale * delta.B @ delta.A
    weight = (delta.magnitude / v.norm(dim=1).detach()).unsqueeze(1) * v
    reference = torch.autograd.grad(penalty(x @ weight.T + base.bias), list(trainable.values()))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
