"""What LoLDU promises beyond the contract: the dense formula built from ``torch.linalg.lu``
(an independent route to P, L, U), the trainable scale, refusal of rank-deficient weights, factors
carried by the checkpoint, its parameter formula and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw

from _fit import fit


def _reference(w0: torch.Tensor, rank: int, alpha: float, z: torch.Tensor, sigma: float) -> tuple:
    """``(W', P L_r, Ū_r)`` from their definitions, in fp64:
    W_res = W0 − σ0 P L_r diag(D_r) Ū_r and W' = W_res + σ P L_r diag(z) Ū_r."""
    P, L, U = torch.linalg.lu(w0.double())
    D = U.diagonal()
    L_r, D_r, U_bar_r = L[:, :rank], D[:rank], U[:rank] / D[:rank].unsqueeze(1)
    sigma0 = alpha / rank
    residual = w0.double() - sigma0 * P @ L_r @ torch.diag(D_r) @ U_bar_r
    merged = residual + sigma * P @ L_r @ torch.diag(z.double()) @ U_bar_r
    return merged.float(), (P @ L_r).float(), U_bar_r.float()


@pytest.mark.parametrize(("out_features", "in_features"), [(12, 9), (7, 10), (8, 8)])
def test_forward_and_merge_equal_the_dense_formula(out_features: int, in_features: int) -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), rw.LoLDUConfig(rank=5, alpha=2, targets="0"))
    delta = model[0].delta
    w0, bias = model[0].base.weight.detach(), model[0].base.bias.detach()
    with torch.no_grad():
        delta.z.mul_(1 + torch.randn(5))
    expected, lower, upper = _reference(w0, 5, 2.0, delta.z.detach(), 2 / 5)
    torch.testing.assert_close(delta.L, lower, rtol=1e-5, atol=1e-6)  # pivots in the same order
    torch.testing.assert_close(delta.U, upper, rtol=1e-5, atol=1e-6)
    x = torch.randn(6, in_features)
    torch.testing.assert_close(model(x), x @ expected.T + bias, rtol=1e-5, atol=1e-5)
    rw.merge(model)
    torch.testing.assert_close(model[0].base.weight, expected, rtol=1e-5, atol=1e-5)


def test_the_dense_formula_is_the_base_weight_at_init() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(9, 12)), rw.LoLDUConfig(rank=4, targets="0"))
    delta = model[0].delta
    assert torch.equal(delta.delta_weight(), torch.zeros(12, 9))
    expected, _, _ = _reference(model[0].base.weight.detach(), 4, 1.0, delta.z.detach(), 1 / 4)
    torch.testing.assert_close(expected, model[0].base.weight.detach(), rtol=1e-6, atol=1e-6)


def test_train_scale_adds_one_parameter_that_learns() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(9, 12)), rw.LoLDUConfig(rank=4, train_scale=True, targets="0"))
    delta = model[0].delta
    assert rw.summary(model).trainable == 5
    with torch.no_grad():
        delta.sigma.fill_(0.6)
        delta.z.add_(torch.randn(4))
    expected, _, _ = _reference(model[0].base.weight.detach(), 4, 1.0, delta.z.detach(), 0.6)
    x = torch.randn(6, 9)
    torch.testing.assert_close(model(x), x @ expected.T + model[0].base.bias, rtol=1e-5, atol=1e-5)
    model(x).square().sum().backward()
    assert delta.sigma.grad is not None and delta.sigma.grad.abs() > 0


def test_rank_deficient_weights_are_refused_naming_the_layer() -> None:
    layer = nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 1) @ torch.randn(1, 6) + torch.randn(5, 1) @ torch.randn(1, 6))  # rank 2
    with pytest.raises(ValueError, match=r"'0'.*rank=3 needs 3 non-zero LU pivots.*use rank <= 2"):
        rw.adapt(nn.Sequential(layer), rw.LoLDUConfig(rank=3, targets="0"))
    zero = nn.Linear(6, 5)
    nn.init.zeros_(zero.weight)
    with pytest.raises(ValueError, match="first input column is zero"):
        rw.adapt(nn.Sequential(zero), rw.LoLDUConfig(rank=1, targets="0"))
    with pytest.raises(ValueError, match=r"'0'.*rank=6 must be <= min\(in_features=6, out_features=5\)"):
        rw.adapt(nn.Sequential(nn.Linear(6, 5)), rw.LoLDUConfig(rank=6, targets="0"))


def test_the_checkpoint_carries_the_factors_it_was_trained_with(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(9, 12))
    model = rw.adapt(base, rw.LoLDUConfig(rank=4, targets="0"))
    with torch.no_grad():
        model[0].delta.z.add_(torch.randn(4))
        model[0].delta.L.mul_(1.5)  # stands in for factors another LAPACK would have produced
    rw.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    loaded = rw.load_adapter(nn.Sequential(nn.Linear(9, 12)), tmp_path)
    assert torch.equal(loaded[0].delta.L, model[0].delta.L)
    x = torch.randn(3, 9)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(("in_features", "out_features"), [(768, 768), (768, 3072)])
def test_parameter_count_is_the_rank(in_features: int, out_features: int) -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), rw.LoLDUConfig(targets="0"))
    assert rw.summary(model).trainable == 16


def test_learns_a_reachable_regression_target() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(16, 16)), rw.LoLDUConfig(rank=8, targets="0"))
    delta = model[0].delta
    x = torch.randn(256, 16)
    # The target moves each adapted pivot's diagonal entry: a weight LoLDU can reach.
    target_z = delta.z.detach() + torch.randn(8)
    with torch.no_grad():
        y = model(x) + x @ ((delta.L * delta.sigma * (target_z - delta.z)) @ delta.U).T
    losses = fit(model, x, y, lr=5e-2, params=[delta.z])
    assert losses[-1] < 0.05 * losses[0]
