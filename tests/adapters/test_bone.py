"""What Bone (MiSS, "balance") promises beyond the contract: the paper's tiled ΔW, PEFT's MiSS on
identical weights (forward, merge, unmerge, a last shard that does not fill r), its parameter
formula and that it learns."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules

from _fit import fit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8))  # 10 % 4 = 2: a partial shard


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            nn.init.normal_(layer.delta.D, std=0.2)


def test_delta_weight_repeats_the_shard_and_truncates_the_last_block() -> None:
    model = rw.adapt(_model(), rw.BoneConfig(rank=4, targets="0"))
    _randomize(model)
    delta = model[0].delta
    expected = torch.zeros(12, 10)
    for start in range(0, 10, 4):  # ΔW[:, j·r:(j+1)·r] = Dᵀ, cut at in_features
        width = min(4, 10 - start)
        expected[:, start : start + width] = delta.D.t()[:, :width]
    torch.testing.assert_close(delta.delta_weight(), expected, rtol=0, atol=0)
    x = torch.randn(6, 10)
    torch.testing.assert_close(model[0](x), x @ (model[0].base.weight + expected).T + model[0].base.bias)


def test_equals_peft_miss_forward_merge_and_unmerge() -> None:
    base = _model().eval()
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.MissConfig(r=4, target_modules=["0", "2"], init_weights=True)
    )
    ours = rw.adapt(base, rw.BoneConfig(rank=4, targets=("0", "2")))
    _randomize(ours)
    theirs = {path: reference.base_model.model.get_submodule(path) for path, _ in adapted_modules(ours)}
    with torch.no_grad():
        for path, layer in adapted_modules(ours):
            theirs[path].miss_block["default"].copy_(layer.delta.D)
    x = torch.randn(3, 5, 10)
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
        torch.testing.assert_close(layer.base.weight, theirs[path].base_layer.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.base.weight, originals[path], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("in_features", "out_features"), [(768, 768), (768, 3072), (10, 7)])
def test_parameter_count_is_rank_times_out_features(in_features: int, out_features: int) -> None:
    config = rw.BoneConfig(rank=min(64, in_features), targets="0")
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
    assert rw.summary(model).trainable == config.rank * out_features
    assert model[0].delta.D.shape == (config.rank, out_features)


def test_rank_above_in_features_is_refused_naming_the_layer() -> None:
    with pytest.raises(ValueError, match=r"'0'.*rank=16 must be <= in_features=10"):
        rw.adapt(nn.Sequential(nn.Linear(10, 4)), rw.BoneConfig(rank=16, targets="0"))


def test_learns_a_reachable_regression_target() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(24, 16)), rw.BoneConfig(rank=8, targets="0"))
    x = torch.randn(256, 24)
    # The target is the base layer plus a ΔW of Bone's own structure (24 = 3 shards of 8).
    target_shard = 0.3 * torch.randn(8, 16)
    with torch.no_grad():
        y = model(x) + x.unflatten(-1, (3, 8)).sum(-2) @ target_shard
    losses = fit(model, x, y, lr=2e-2)
    assert losses[-1] < 0.02 * losses[0]
    assert math.isfinite(losses[-1])
