"""TRP on a small CNN: truncation and the nuclear sub-gradient against an SVD computed here, the
ranks of the converted layers, and the converted model against the truncated full one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.compress import TRP, LowRankConv2d
from rankwise.compress.report import count_params

from _models import tiny_gpt2
from _tiny_cnn import TinyCNN, batches


def _matrix(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    n, c, kh, kw = weight.shape
    if scheme == "channel":
        return weight.detach().reshape(n, -1)
    return weight.detach().permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def _kernel(matrix: torch.Tensor, shape: torch.Size, scheme: str) -> torch.Tensor:
    n, c, kh, kw = shape
    return matrix.reshape(shape) if scheme == "channel" else matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3)


def _energy_rank(matrix: torch.Tensor, energy: float) -> int:
    squared = torch.linalg.svdvals(matrix).square()
    return int((torch.cumsum(squared, 0) / squared.sum() < energy).sum()) + 1


def _truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def _train(model: nn.Module, trp: TRP, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step, (x, y) in enumerate(batches(steps)):
        trp.truncate(step)
        nn.functional.cross_entropy(model(x), y).backward()
        trp.add_nuclear_gradient()
        optimizer.step()
        optimizer.zero_grad()


def test_default_targets_skip_the_stem_and_pointwise_convs() -> None:
    trp = TRP(TinyCNN())
    assert [path for path, _, _ in trp.layers] == ["conv1", "conv2", "conv3"]
    assert [path for path, _, _ in TRP(TinyCNN(), targets="conv2").layers] == ["conv2"]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_truncation_writes_the_energy_truncated_weight(scheme: str) -> None:
    model = TinyCNN()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in ("conv1", "conv2", "conv3")}
    trp = TRP(model, energy=0.6, period=3, scheme=scheme)
    assert trp.truncate(1) is False and torch.equal(model.conv1.weight, before["conv1"])
    assert trp.truncate(3) is True
    for name, weight in before.items():
        rank = _energy_rank(_matrix(weight, scheme), 0.6)
        assert trp.ranks[name] == rank
        expected = _kernel(_truncate(_matrix(weight, scheme), rank), weight.shape, scheme)
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), expected, rtol=0, atol=1e-5)
        assert torch.linalg.matrix_rank(_matrix(model.get_submodule(name).weight, scheme)) == rank


def test_nuclear_gradient_is_lambda_u_k_v_k_transposed() -> None:
    model = TinyCNN()
    trp = TRP(model, energy=0.8, period=1, nuclear_weight=0.1)
    x, y = batches(1)[0]
    trp.truncate(0)
    nn.functional.cross_entropy(model(x), y).backward()
    plain = model.conv2.weight.grad.clone()
    trp.add_nuclear_gradient()
    U, _, Vh = torch.linalg.svd(_matrix(model.conv2.weight, "channel"), full_matrices=False)
    k = trp.ranks["conv2"]
    expected = plain + 0.1 * (U[:, :k] @ Vh[:k]).reshape(model.conv2.weight.shape)
    torch.testing.assert_close(model.conv2.weight.grad, expected, rtol=0, atol=1e-5)
    trp.add_nuclear_gradient()  # the sub-gradient is used once, on its own step
    torch.testing.assert_close(model.conv2.weight.grad, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_converted_model_has_the_rule_ranks_and_equals_the_truncated_full_model(scheme: str) -> None:
    model = TinyCNN()
    trp = TRP(model, energy=0.7, period=2, nuclear_weight=3e-3, scheme=scheme)
    _train(model, trp, steps=5)  # truncations at steps 0, 2, 4; the updates after step 4 undo them slightly
    full = copy.deepcopy(model)
    assert trp.truncate() is True  # a last truncation, so the conversion is exact
    report = trp.convert()
    x = batches(1, seed=7)[0][0]
    for name in ("conv1", "conv2", "conv3"):
        matrix = _matrix(full.get_submodule(name).weight, scheme)
        rank = _energy_rank(matrix, 0.7)
        assert 1 < rank < min(matrix.shape)
        assert report.ranks()[name] == rank
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankConv2d) and layer.rank == rank and layer.scheme == scheme
        weight = full.get_submodule(name).weight
        with torch.no_grad():
            weight.copy_(_kernel(_truncate(matrix, rank), weight.shape, scheme))
    torch.testing.assert_close(model(x), full(x), rtol=0, atol=1e-5)
    assert report.params_after == count_params(model) < report.params_before


def test_convert_by_value_threshold() -> None:
    model = TinyCNN()
    trp = TRP(model)
    S = torch.linalg.svdvals(_matrix(model.conv2.weight, "channel"))
    # Halfway between σ_4 and σ_5: a threshold equal to σ_4 itself keeps it or not by round-off
    # (the SVD inside convert runs on another code path and may differ in the last bit).
    report = trp.convert(threshold=((S[3] + S[4]) / 2).item())
    assert report.ranks()["conv2"] == 4
    with pytest.raises(ValueError, match="no truncation has happened yet"):
        TRP(TinyCNN()).convert()


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"energy=0 must be in \(0, 1\]"):
        TRP(TinyCNN(), energy=0)
    with pytest.raises(ValueError, match="period=0 must be an integer >= 1"):
        TRP(TinyCNN(), period=0)
    with pytest.raises(ValueError, match="no k x k convolution after the first"):
        TRP(nn.Sequential(nn.Linear(3, 3)))


def test_trp_on_gpt2_conv1d_layers() -> None:
    pytest.importorskip("transformers")
    model = tiny_gpt2(n_embd=32, n_layer=1, n_positions=16)
    trp = TRP(model, targets=("mlp.c_fc",), energy=0.5, period=1)
    W = model.transformer.h[0].mlp.c_fc.weight.detach().T.clone()  # Conv1D stores (in, out)
    trp.truncate(0)
    rank = _energy_rank(W, 0.5)
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight.detach().T, _truncate(W, rank), rtol=0, atol=1e-5)
    report = trp.convert()  # at the rank of the last truncation
    layer = model.transformer.h[0].mlp.c_fc
    assert report.ranks() == {"transformer.h.0.mlp.c_fc": rank} and layer.rank == rank
    torch.testing.assert_close(layer.dense_weight(), _truncate(W, rank), rtol=0, atol=1e-5)
