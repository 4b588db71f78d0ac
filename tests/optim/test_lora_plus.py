"""LoRA+ against PEFT's LoRA+ optimizer on identical weights, and its param groups read from factors()."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn

import rankwise as rw
from rankwise.optim import LoRAPlus, lora_plus_param_groups

from _models import tiny_gpt2
from _trainer import cpu_trainer, token_rows


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_steps_equal_peft_loraplus_on_identical_weights() -> None:
    ours = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, alpha=4, targets=("0", "2")))
    theirs = peft.get_peft_model(_mlp(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for name in ("0", "2"):
            theirs.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(ours.get_submodule(name).delta.A)
    optimizer = LoRAPlus(ours, lr=1e-2, ratio=16, weight_decay=0.1)
    reference = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16, loraplus_weight_decay=0.1
    )
    for _ in range(3):
        x = torch.randn(10, 8)
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for name in ("0", "2"):
        layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(ours.get_submodule(name).delta.A, layer.lora_A["default"].weight)
        torch.testing.assert_close(ours.get_submodule(name).delta.B, layer.lora_B["default"].weight)
    assert ours[0].delta.B.abs().amax() > 0.01  # B moved: the comparison covers its 16 × rate


def test_groups_come_from_factors_and_other_parameters_keep_lr() -> None:
    model = rw.adapt(_mlp(), rw.DoRAConfig(rank=2, targets="0", trainable=("2",)))
    A, B, _ = model[0].delta.factors()
    groups = lora_plus_param_groups(model, lr=1e-3, ratio=8, weight_decay=0.05)
    found = [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups]
    assert found == [
        ([id(A)], 1e-3, 0.05),
        ([id(B)], 8e-3, 0.05),
        ([id(model[2].weight)], 1e-3, 0.05),
        ([id(model[0].delta.magnitude), id(model[2].bias)], 1e-3, 0.0),  # vectors are not decayed
    ]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_a_step_moves_B_by_ratio_times_A_rate() -> None:
    # After one Adam step every parameter moves by lr · sign-like ±1 (|m̂ / √v̂| = 1 at t = 1).
    model = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets="0"))
    with torch.no_grad():
        model[0].delta.B.normal_()  # so that A has a gradient too
    A, B = (p.detach().clone() for p in model[0].delta.factors()[:2])
    optimizer = LoRAPlus(model, lr=1e-3, ratio=16, eps=0.0)
    model(torch.randn(10, 8)).square().mean().backward()
    optimizer.step()
    torch.testing.assert_close((model[0].delta.A - A).abs(), torch.full_like(A, 1e-3))
    torch.testing.assert_close((model[0].delta.B - B).abs(), torch.full_like(B, 16e-3))


def test_param_groups_work_with_any_torch_optimizer_and_round_trip() -> None:
    model = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets="0"))
    optimizer = torch.optim.Adam(lora_plus_param_groups(model, lr=1e-3))
    batches = [torch.randn(10, 8) for _ in range(4)]

    def train(m: nn.Module, opt: torch.optim.Optimizer, xs: list[torch.Tensor]) -> None:
        for x in xs:
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    train(model, optimizer, batches[:2])
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(lora_plus_param_groups(twin, lr=1e-3))
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not shared with the original
    train(model, optimizer, batches[2:])
    train(twin, twin_optimizer, batches[2:])
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_trains_under_the_transformers_trainer(tmp_path) -> None:
    model = rw.adapt(tiny_gpt2(), rw.LoRAConfig(rank=2, targets="c_attn"))
    before = {k: v.clone() for k, v in rw.adapter_state_dict(model).items()}
    data = token_rows(12)
    optimizer = LoRAPlus(model, lr=1e-3)
    trainer = cpu_trainer(model, tmp_path, data, lr=1e-3, optimizers=(optimizer, None))
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(not torch.equal(before[k], v) for k, v in rw.adapter_state_dict(model).items())
    # the Trainer's schedule scales both groups alike, so the ratio holds at every step
    assert optimizer.param_groups[1]["lr"] == pytest.approx(16 * optimizer.param_groups[0]["lr"])


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no rankwise adapters"):
        lora_plus_param_groups(_mlp(), lr=1e-3)
    bone = rw.adapt(_mlp(), rw.BoneConfig(rank=2, targets="0"))
    with pytest.raises(ValueError, match=r"LoRA\+ needs adapters that declare factors\(\).*\['bone'\]"):
        LoRAPlus(bone, lr=1e-3)
    model = rw.adapt(_mlp(), rw.LoRAConfig(rank=2, targets="0"))
    with pytest.raises(ValueError, match="ratio=0"):
        lora_plus_param_groups(model, lr=1e-3, ratio=0)
    with pytest.raises(ValueError, match="lr=0"):
        lora_plus_param_groups(model, lr=0)
