"""What Bat promises beyond the contract: the paper's block formula W'_ij = W_ij + W_ij D_i + D_i,
PEFT's MiSS "bat" on identical weights (forward, merge, unmerge), its shape checks, its parameter
formula and that it learns."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.core.inject import adapted_modules

from _fit import fit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            nn.init.normal_(layer.delta.D, std=0.2)


def _dense_bat(w0: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """W' block by block, straight from the formula."""
    r = D.shape[-1]
    merged = w0.clone()
    for i in range(w0.shape[0] // r):
        for j in range(w0.shape[1] // r):
            block = w0[i * r : (i + 1) * r, j * r : (j + 1) * r]
            merged[i * r : (i + 1) * r, j * r : (j + 1) * r] = block + block @ D[i] + D[i]
    return merged


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_merged_weight_equal_the_block_formula(kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 8) if kind == "linear" else Conv1D(8, 12)
    model = rw.adapt(nn.Sequential(layer), rw.BatConfig(rank=4, targets="0"))
    _randomize(model)
    adapted = model[0]
    w0 = adapted.base.weight if kind == "linear" else adapted.base.weight.t()
    expected = _dense_bat(w0, adapted.delta.D)
    torch.testing.assert_close(adapted.delta.merged_weight(w0), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), x @ expected.T + adapted.base.bias, rtol=1e-5, atol=1e-5)


def test_equals_peft_bat_forward_merge_and_unmerge() -> None:
    base = _model().eval()
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.MissConfig(r=4, target_modules=["0", "2"], init_weights="bat")
    )
    ours = rw.adapt(base, rw.BatConfig(rank=4, targets=("0", "2")))
    _randomize(ours)
    theirs = {path: reference.base_model.model.get_submodule(path) for path, _ in adapted_modules(ours)}
    with torch.no_grad():
        for path, layer in adapted_modules(ours):
            theirs[path].miss_block["default"].copy_(layer.delta.D)
    x = torch.randn(3, 5, 8)
    expected = reference(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)

    originals = {path: layer.base.weight.detach().clone() for path, layer in adapted_modules(ours)}
    rw.merge(ours)
    for path, layer in adapted_modules(ours):
        theirs[path].merge()
        torch.testing.assert_close(layer.base.weight, theirs[path].base_layer.weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    rw.unmerge(ours)
    for path, layer in adapted_modules(ours):
        theirs[path].unmerge()
        torch.testing.assert_close(layer.base.weight, theirs[path].base_layer.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base.weight, originals[path], rtol=1e-5, atol=1e-5)


def test_unmerge_refuses_a_singular_block_and_leaves_the_weight() -> None:
    model = rw.adapt(_model(), rw.BatConfig(rank=4, targets="0"))
    with torch.no_grad():
        model[0].delta.D[1] = -torch.eye(4)  # I + D_1 = 0: block row 1 of W0 is lost at merge
    rw.merge(model)
    merged = model[0].base.weight.detach().clone()
    with pytest.raises(ValueError, match="singular"):
        rw.unmerge(model)
    assert torch.equal(model[0].base.weight, merged)


@pytest.mark.parametrize(("in_features", "out_features", "rank"), [(768, 768, 64), (768, 3072, 64), (8, 12, 4)])
def test_parameter_count_is_rank_times_out_features(in_features: int, out_features: int, rank: int) -> None:
    config = rw.BatConfig(rank=rank, targets="0")
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
    assert rw.summary(model).trainable == config.rank * out_features


def test_shapes_the_blocks_do_not_tile_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'0'.*rank=4 must divide in_features=10 and out_features=8"):
        rw.adapt(nn.Sequential(nn.Linear(10, 8)), rw.BatConfig(rank=4, targets="0"))
    with pytest.raises(TypeError, match="1 x 1"):
        rw.adapt(nn.Sequential(nn.Conv2d(4, 8, 3)), rw.BatConfig(rank=4, targets="0"))


def test_learns_a_reachable_regression_target() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(16, 16)), rw.BatConfig(rank=4, targets="0"))
    x = torch.randn(256, 16)
    w0, bias = model[0].base.weight.detach(), model[0].base.bias.detach()
    y = x @ _dense_bat(w0, 0.3 * torch.randn(4, 4, 4)).T + bias  # a weight Bat can reach
    losses = fit(model, x, y, lr=2e-2)
    assert losses[-1] < 0.05 * losses[0]
