"""What SingLoRA promises beyond the contract: ΔW = s·u(t)·A_out A_inᵀ against a dense reference
(forward and gradient, through the ramp), the step advanced per optimizer step only, the step saved
in checkpoints, its parameter count, and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules
from rankwise.core.steps import Stepped

from _fit import fit


def _adapted(in_features: int, out_features: int, **config) -> tuple[nn.Module, rw.Adapted]:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), rw.SingLoRAConfig(targets="0", **config))
    return model, model[0]


@pytest.mark.parametrize(("in_features", "out_features"), [(12, 12), (20, 7), (7, 20)])
@pytest.mark.parametrize("steps", [0, 2, 4, 9])
def test_forward_and_gradient_match_the_dense_formula(in_features: int, out_features: int, steps: int) -> None:
    model, layer = _adapted(in_features, out_features, rank=3, alpha=6.0, ramp_steps=4)
    for _ in range(steps):
        rw.step(model)
    A = layer.delta.A.detach().clone().requires_grad_()
    x = torch.randn(5, in_features)

    ramp = min(steps / 4, 1.0)  # u(t) = min(t / T, 1)
    delta = (6.0 / 3) * ramp * A[:out_features] @ A[:in_features].T  # s · u(t) · A_out A_inᵀ
    dense = x @ (layer.base.weight + delta).T + layer.base.bias
    dense.square().sum().backward()
    ours = model(x)
    ours.square().sum().backward()

    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta.A.grad, A.grad, rtol=1e-4, atol=1e-6)
    assert (A.grad.abs().sum() > 0) == (steps > 0)  # u(0) = 0: the first step has no gradient


def test_the_optimizer_hook_counts_optimizer_steps_only() -> None:
    model, layer = _adapted(8, 8)
    optimizer = torch.optim.SGD([layer.delta.A], lr=0.1)
    handle = rw.step_with(optimizer, model)
    x = torch.randn(4, 8)
    for _ in range(3):
        for micro_batch in x.chunk(2):  # gradient accumulation: two forwards per optimizer step
            model(micro_batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model.eval()(x)
    assert layer.delta.step.item() == 3
    handle.remove()
    optimizer.step()
    assert layer.delta.step.item() == 3


def test_step_advances_every_stepped_module_once() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    model = rw.adapt(model, rw.SingLoRAConfig(rank=2, targets=("0", "2")))
    assert rw.step(model) == 2
    assert [layer.delta.step.item() for _, layer in adapted_modules(model)] == [1, 1]

    class Counter(nn.Module, Stepped):  # any module can depend on the step, not only adapters
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def advance(self) -> None:
            self.count += 1

    shared = Counter()
    assert rw.step(nn.Sequential(shared, nn.Sequential(shared), nn.Linear(2, 2))) == 1
    assert shared.count == 1
    assert rw.step(nn.Linear(2, 2)) == 0


def test_the_step_round_trips_through_save_and_load(tmp_path) -> None:
    model, layer = _adapted(10, 6, ramp_steps=10)
    for _ in range(7):
        rw.step(model)
    rw.save_adapter(model, tmp_path)
    assert rw.adapter_state_dict(model)["0.delta.step"].item() == 7

    torch.manual_seed(0)
    loaded = rw.load_adapter(nn.Sequential(nn.Linear(10, 6)), tmp_path)
    assert loaded[0].delta.step.item() == 7
    x = torch.randn(3, 10)
    assert torch.equal(loaded(x), model(x))
    assert not torch.equal(model(x), layer.base(x))  # u = 0.7: the adapter is active


def test_unmerge_subtracts_the_update_merged_even_after_more_steps() -> None:
    model, layer = _adapted(9, 9, ramp_steps=10)
    for _ in range(3):
        rw.step(model)
    w0 = layer.base.weight.detach().clone()
    rw.merge(model)
    rw.step(model)  # u changes from 0.3 to 0.4 while merged
    rw.unmerge(model)
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("in_features", "out_features", "expected"), [(768, 768, 6144), (768, 3072, 24576), (3072, 768, 24576)]
)
def test_parameter_count_is_rank_times_the_larger_side(in_features: int, out_features: int, expected: int) -> None:
    config = rw.SingLoRAConfig()  # r = 8
    assert rw.SingLoRA.num_params(in_features, out_features, config) == expected == 8 * max(in_features, out_features)
    assert rw.SingLoRA.num_params(768, 768, config) * 2 == rw.LoRA.num_params(768, 768, rw.LoRAConfig(rank=8))


def test_learns_a_symmetric_update() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    G = torch.randn(16, 2) / 2
    target_weight = base[0].weight.detach() + G @ G.T  # PSD, within SingLoRA's reach
    x = torch.randn(64, 16)
    target = x @ target_weight.T + base[0].bias.detach()
    model = rw.adapt(base, rw.SingLoRAConfig(rank=4, alpha=4.0, ramp_steps=5, targets="0"))
    losses = fit(model, x, target, lr=0.05)
    assert losses[-1] < 0.02 * losses[0]
