"""Second derivatives (``create_graph=True``: gradient penalties, Hessian-vector products) through
every method. Several methods have written-out backward passes; they must stay differentiable, or
say so. Checked numerically by ``gradgradcheck`` in float64, with respect to the input and every
trainable parameter; DoRA (and BoRA by default) detach their norms by design, so their gradients
are not the numerical ones and DoRA is checked against the dense formula instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import rankwise as rw
from rankwise.core import registry

# SURM's FFT backward keeps only the spectra; differentiating it again raises instead of dropping terms.
ONCE_DIFFERENTIABLE = {"surm", "surm_adapter"}
# Methods whose configs detach a norm (their gradient is not the forward's derivative, by design).
OVERRIDES = {"bora": {"detach_norms": False}}
# The smallest size each method's knob takes on an 8 -> 4 layer with k = 2 grids and 4-blocks.
SIZES = {"rank": 2, "block_size": 4}


def _adapted(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    knob = registry.get(name).config_class.size_knob
    extra = {"k": 2} if name == "gralora" else OVERRIDES.get(name, {})
    config = rw.make_config(name, targets="0", **({knob: SIZES[knob]} if knob in SIZES else {}), **extra)
    model = rw.adapt(nn.Sequential(nn.Linear(8, 4)).double(), config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # off the zero inits, so every second-order term is non-zero
        for p in trainable.values():
            p.add_(0.3 * torch.randn_like(p))
    return model, trainable


@pytest.mark.parametrize("name", [name for name in registry.methods() if name != "dora"])
def test_second_derivatives_are_correct_or_refused(name: str) -> None:
    model, trainable = _adapted(name)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def forward(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(trainable, values)), (x,))

    inputs = (x, *(p.detach().requires_grad_() for p in trainable.values()))
    if name in ONCE_DIFFERENTIABLE:
        (grad,) = torch.autograd.grad(forward(*inputs).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.square().sum().backward()
    else:
        assert torch.autograd.gradgradcheck(forward, inputs)


def test_dora_second_derivatives_equal_the_dense_formula_with_a_detached_norm() -> None:
    model, trainable = _adapted("dora")
    delta, base = model[0].delta, model[0].base
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def penalty(y: torch.Tensor) -> torch.Tensor:  # a gradient penalty: ‖∂(Σy²)/∂x‖²
        (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return grad.square().sum()

    ours = torch.autograd.grad(penalty(model(x)), list(trainable.values()))
    v = base.weight + delta.scale * delta.B @ delta.A
    weight = (delta.magnitude / v.norm(dim=1).detach()).unsqueeze(1) * v
    reference = torch.autograd.grad(penalty(x @ weight.T + base.bias), list(trainable.values()))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
