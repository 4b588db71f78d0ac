"""What LoRA promises beyond the contract: its scale, its inits, dropout on the branch only, and
PEFT's convolution LoRA on identical weights."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules


def _layer(model: nn.Module):
    return next(layer for _, layer in adapted_modules(model))


@pytest.mark.parametrize(("rslora", "scale"), [(False, 12 / 4), (True, 12 / 2)])
def test_scale_is_alpha_over_rank_or_its_root(rslora: bool, scale: float) -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(10, 6)), rw.LoRAConfig(rank=4, alpha=12, rslora=rslora, targets="0"))
    delta = _layer(model).delta
    nn.init.normal_(delta.B)
    torch.testing.assert_close(delta.delta_weight(), scale * delta.B @ delta.A)
    x = torch.randn(3, 10)
    torch.testing.assert_close(model(x), x @ (model[0].base.weight + scale * delta.B @ delta.A).T + model[0].base.bias)


def test_inits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.Linear(300, 200))
    kaiming = _layer(rw.adapt(copy.deepcopy(model), rw.LoRAConfig(rank=16, targets="0"))).delta
    assert kaiming.B.abs().max() == 0
    assert kaiming.A.abs().max() <= 1 / math.sqrt(400)
    assert kaiming.A.abs().max() > 0.95 / math.sqrt(400)  # uniform over the whole range
    gaussian = _layer(rw.adapt(copy.deepcopy(model), rw.LoRAConfig(rank=16, init="gaussian", targets="0"))).delta
    assert gaussian.A.std().item() == pytest.approx(1 / 16, rel=0.05)


def test_dropout_acts_on_the_adapter_branch_only() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(64, 32)
    expected_base = base(x)
    model = rw.adapt(base, rw.LoRAConfig(rank=4, dropout=0.5, targets="0")).train()
    torch.testing.assert_close(model(x), expected_base, rtol=0, atol=0)  # B = 0: no branch, no dropout
    nn.init.normal_(_layer(model).delta.B)
    first, second = model(x), model(x)
    assert not torch.equal(first, second)  # the branch is dropped at random in training
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_equals_peft(stride: int) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, stride=stride, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    )
    ours = rw.adapt(base, rw.LoRAConfig(rank=2, alpha=4, targets=("0", "2")))
    with torch.no_grad():
        for path, layer in adapted_modules(ours):
            theirs = reference.base_model.model.get_submodule(path)
            layer.delta.A.copy_(theirs.lora_A["default"].weight.flatten(1))
            layer.delta.B.copy_(theirs.lora_B["default"].weight.flatten(1))
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
