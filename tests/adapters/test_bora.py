"""What BoRA promises beyond the contract: W' = diag(a)(W0 + sBA)diag(c) against a dense reference
(forward and gradients, detached norms and not), row-then-column order, dropout on the update only,
no full-size tensor kept for backward, its parameter count, and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw

from _fit import fit


def _bora(out_features: int = 12, in_features: int = 20, **config) -> tuple[nn.Module, rw.Adapted]:
    torch.manual_seed(0)
    config = rw.BoRAConfig(rank=3, alpha=6.0, targets="0", **config)
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
    layer = model[0]
    with torch.no_grad():
        nn.init.normal_(layer.delta.B, std=0.3)
        layer.delta.row_magnitude.mul_(torch.linspace(0.5, 1.5, out_features))
        layer.delta.column_magnitude.mul_(torch.linspace(1.4, 0.6, in_features))
    return model, layer


def _dense_weight(w0, A, B, m_r, m_c, detach: bool) -> torch.Tensor:
    """BoRA's weight: V = W0 + sBA, H = diag(m_r/||V||_row) V, W' = H diag(m_c/||H||_col)."""
    v = w0 + 2.0 * B @ A  # s = α / r = 2
    if detach:
        with torch.no_grad():
            row_norm = v.norm(dim=1)
            column_norm = ((m_r / row_norm).unsqueeze(1) * v).norm(dim=0)
    else:
        row_norm = v.norm(dim=1)
        column_norm = ((m_r / row_norm).unsqueeze(1) * v).norm(dim=0)
    return (m_r / row_norm).unsqueeze(1) * v * (m_c / column_norm)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize(("out_features", "in_features"), [(12, 20), (20, 12)])
def test_forward_and_gradients_match_the_dense_formula(detach: bool, out_features: int, in_features: int) -> None:
    model, layer = _bora(out_features, in_features, detach_norms=detach)
    delta = layer.delta
    params = (delta.A, delta.B, delta.row_magnitude, delta.column_magnitude)
    reference = [t.detach().clone().requires_grad_() for t in params]
    x = torch.randn(5, in_features)

    dense = x @ _dense_weight(layer.base.weight, *reference, detach=detach).T + layer.base.bias
    dense.square().sum().backward()
    model(x).square().sum().backward()

    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(params, reference, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_merged_weight_has_column_norms_m_c_and_is_w0_at_init() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(20, 12)), rw.BoRAConfig(targets="0"))
    w0 = model[0].base.weight.detach()
    torch.testing.assert_close(model[0].delta.merged_weight(w0), w0, rtol=1e-6, atol=1e-7)

    _, layer = _bora()
    merged = layer.delta.merged_weight(layer.base.weight.detach())
    # Row step, then column step: the columns end exactly at m_c, the rows only near m_r.
    torch.testing.assert_close(merged.norm(dim=0), layer.delta.column_magnitude.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged.norm(dim=1), layer.delta.row_magnitude.detach(), rtol=1e-3)


def test_dropout_reaches_the_update_only() -> None:
    model, layer = _bora(dropout=0.5)
    x = torch.randn(6, 20)
    torch.manual_seed(5)
    ours = model.train()(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5)  # the same mask: dropout is the forward's only draw
    w0, bias = layer.base.weight, layer.base.bias
    delta = layer.delta
    merged = _dense_weight(w0, delta.A, delta.B, delta.row_magnitude, delta.column_magnitude, detach=True)
    expected = x @ w0.T + dropped @ (merged - w0).T + bias  # x W0ᵀ + x̃ (W' − W0)ᵀ + b
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_no_full_size_tensor_is_saved_for_backward() -> None:
    model, layer = _bora(out_features=64, in_features=96)
    weight_storage = layer.base.weight.untyped_storage().data_ptr()
    full_size = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= 64 * 96 and t.untyped_storage().data_ptr() != weight_storage:
            full_size.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(4, 96)).sum().backward()
    assert full_size == []


@pytest.mark.parametrize(("in_features", "out_features", "expected"), [(768, 768, 13824), (768, 3072, 34560)])
def test_parameter_count_is_lora_plus_both_magnitudes(in_features: int, out_features: int, expected: int) -> None:
    config = rw.BoRAConfig()  # r = 8
    assert rw.BoRA.num_params(in_features, out_features, config) == expected
    assert expected == 8 * (in_features + out_features) + in_features + out_features


def test_learns_rescaled_rows_and_columns_plus_a_low_rank_update() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    w0 = base[0].weight.detach()
    target_weight = torch.linspace(0.6, 1.4, 12).unsqueeze(1) * w0 * torch.linspace(1.3, 0.7, 16)
    target_weight = target_weight + 0.05 * torch.randn(12, 1) @ torch.randn(1, 16)
    x = torch.randn(64, 16)
    target = x @ target_weight.T + base[0].bias.detach()
    model = rw.adapt(base, rw.BoRAConfig(rank=2, alpha=4.0, targets="0"))
    losses = fit(model, x, target, lr=0.05)
    assert losses[-1] < 0.02 * losses[0]
