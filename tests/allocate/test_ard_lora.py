"""ARD-LoRA-style: gates and their gradient by hand, per-head ΔW against a dense loop, the penalty
by hand, the frozen warm-up, the budget projection, the final slot removal and the checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankwise as rw

STEPS = 20


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _model(**config) -> nn.Module:
    return rw.adapt(_base(), rw.ARDLoRAConfig(targets=("0", "2", "4"), **{"rank": 4, **config}))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)


def _train(model: nn.Module, alloc: rw.allocate.ARDLoRAAllocator, steps: int = STEPS, **adam) -> torch.optim.Optimizer:
    x, y = _data()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, **adam)
    for _ in range(steps):
        (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
        optimizer.step()
        alloc.step(optimizer)
        optimizer.zero_grad()
    return optimizer


def test_gates_by_hand() -> None:
    delta = rw.adapt(nn.Sequential(nn.Linear(3, 6)), rw.ARDLoRAConfig(rank=4, heads=3, targets="0"))[0].delta
    with torch.no_grad():
        delta.rank_scale.copy_(torch.tensor([1.0, 0.6, 1.8]))  # r0 α = 4, 2.4, 7.2; 8 slots
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0.4, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0.2]])
    torch.testing.assert_close(delta.gates(), expected)
    torch.testing.assert_close(delta.effective_rank(), torch.tensor([4.0, 2.4, 7.2]))


def test_at_alpha_one_the_gradient_reaches_the_two_boundary_slots() -> None:
    delta = rw.adapt(nn.Sequential(nn.Linear(3, 2)), rw.ARDLoRAConfig(rank=4, targets="0"))[0].delta
    weights = torch.arange(1.0, 9.0)  # L = Σ_i w_i g_i, so ∂L/∂g_i = w_i
    (delta.gates()[0] * weights).sum().backward()
    # dL/dα = r0 (∂L/∂g_{r0−1} + ∂L/∂g_{r0}) = 4 (4 + 5): the linear clamp's boundary slots.
    assert delta.rank_scale.grad.item() == 4 * (4 + 5)


@pytest.mark.parametrize("side", ["out", "in"])
def test_per_head_update_is_the_dense_block_formula(side: str) -> None:
    torch.manual_seed(0)
    config = rw.ARDLoRAConfig(rank=2, heads=2, head_side=side, targets="0")
    delta = rw.adapt(nn.Sequential(nn.Linear(6, 8)), config)[0].delta
    with torch.no_grad():
        delta.B.normal_()
        delta.rank_scale.copy_(torch.tensor([0.7, 1.6]))
    expected = torch.zeros(8, 6)
    gates = delta.gates()
    for h in range(2):
        block = delta.scale * delta.B[h] @ torch.diag(gates[h]) @ delta.A[h]
        if side == "out":
            expected[4 * h:4 * (h + 1)] = block
        else:
            expected[:, 3 * h:3 * (h + 1)] = block
    torch.testing.assert_close(delta.delta_weight(), expected)
    x = torch.randn(5, 6)
    torch.testing.assert_close(delta(x), x @ expected.T)
    y = torch.randn(5, 8)
    torch.testing.assert_close(delta.add_to(y, x), y + x @ expected.T)
    per_slot = 2 * 6 + 8 if side == "out" else 6 + 2 * 8
    assert sum(p.numel() for p in delta.parameters()) == type(delta).num_params(6, 8, delta.config) == 4 * per_slot + 2


def test_penalty_by_hand() -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, l1=0.1, tv=0.5, warmup=0)
    with torch.no_grad():
        for layer, value in zip((model[0], model[2], model[4]), (1.0, 1.5, 0.25), strict=True):
            layer.delta.rank_scale.fill_(value)
    # One chain "*" (paths 0, 2, 4): 0.1 (1 + 1.5 + 0.25) + 0.5 ((1.5 − 1)² + (0.25 − 1.5)²)
    torch.testing.assert_close(alloc.penalty(), torch.tensor(0.1 * 2.75 + 0.5 * (0.25 + 1.5625)))


def test_tv_runs_along_layers_of_one_type_head_by_head() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o = nn.Linear(4, 4), nn.Linear(4, 4)

    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(Block() for _ in range(3))
    model = rw.adapt(model, rw.ARDLoRAConfig(rank=2, targets=("q", "o")))
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=10, l1=0.0, tv=1.0, warmup=0, heads={"q": (2, "out")})
    assert alloc.chains == [["layers.0.q", "layers.1.q", "layers.2.q"], ["layers.0.o", "layers.1.o", "layers.2.o"]]
    with torch.no_grad():
        model.layers[1].q.delta.rank_scale.copy_(torch.tensor([1.0, 2.0]))  # head 1 differs by 1 from both sides
    torch.testing.assert_close(alloc.penalty(), torch.tensor(2.0))


def test_alpha_is_frozen_during_warmup_then_trains_with_fresh_state() -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=5)
    optimizer = _train(model, alloc, steps=5, weight_decay=0.1)
    for layer in (model[0], model[2], model[4]):
        assert torch.equal(layer.delta.rank_scale, torch.ones(1))  # the steps and the decay were undone
        assert layer.delta.rank_scale not in optimizer.state  # dropped at the end of the warm-up
    assert alloc.penalty().item() > 0
    x, y = _data()
    (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
    optimizer.step()
    alloc.step(optimizer)
    assert not torch.equal(model[2].delta.rank_scale, torch.ones(1))
    assert optimizer.state[model[2].delta.rank_scale]["step"].item() == 1


def test_budget_projection_is_the_euclidean_one() -> None:
    model = _model(max_scale=2.0)
    budget = 400  # α = 1 everywhere costs r0 Σ (in + out) = 4 (24 + 32 + 20) = 304
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=0, budget=budget)
    wanted = torch.tensor([2.5, 1.9, 0.3])
    with torch.no_grad():
        for layer, value in zip((model[0], model[2], model[4]), wanted, strict=True):
            layer.delta.rank_scale.fill_(value)
    alloc.project()
    cost = torch.tensor([4.0 * 24, 4.0 * 32, 4.0 * 20])
    got = torch.cat([layer.delta.rank_scale for layer in (model[0], model[2], model[4])]).detach()
    assert (cost * got).sum().item() == pytest.approx(budget, rel=1e-6)
    # KKT: α = clamp(α̂ − λ c, 0, α_max) with one λ; layer 2 is interior, so λ = (α̂ − α)/c there.
    lam = (wanted[1] - got[1]) / cost[1]
    torch.testing.assert_close(got, (wanted - lam * cost).clamp(0, 2.0))
    assert got[0].item() == 2.0  # at its bound; clipping first, projecting after would give 1.82


def test_budget_holds_and_the_end_keeps_only_used_slots(tmp_path) -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=2, budget=250, l1=1e-2)
    x, _ = _data()
    _train(model, alloc, steps=STEPS - 1)
    history = alloc.history
    assert all(total <= 250 * (1 + 1e-6) for total in history.totals)  # within fp32 rounding, warm-up included
    assert history.totals[0] == pytest.approx(250) and history.totals[-1] < 250  # ℓ1 then went below
    before = model(x).detach()
    ranks = alloc.ranks()
    y = _data()[1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
    optimizer.step()
    assert alloc.step(optimizer)  # the last step drops unused slots
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    for layer, rank in zip((model[0], model[2], model[4]), ranks.values(), strict=True):
        assert layer.delta.config.slots == math.ceil(rank) < 8
    rw.save_adapter(model, tmp_path)
    loaded = rw.load_adapter(_base(), tmp_path)
    assert torch.equal(loaded(x), model(x))
    slots = [layer.delta.A.shape[1] for layer in (loaded[0], loaded[2], loaded[4])]
    assert slots == [math.ceil(r) for r in ranks.values()]


def test_heads_split_layers_and_reload(tmp_path) -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=2, heads={"2": (4, "out"), "4": (2, "in")})
    assert model[2].delta.config.heads == 4 and model[2].delta.rank_scale.shape == (4,)
    assert model[4].delta.rank_scale.shape == (2,) and model[4].delta.config.head_side == "in"
    _train(model, alloc)
    rw.save_adapter(model, tmp_path)
    loaded = rw.load_adapter(_base(), tmp_path)
    x, _ = _data()
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"l1": -1.0}, "l1"),
    ({"tv": float("nan")}, "tv"),
    ({"warmup": -1}, "warmup"),
    ({"budget": -5}, "budget"),
    ({"heads": {"nothing": (2, "out")}}, "matches no adapted layer"),
    ({"heads": {"0": (3, "out")}}, "heads=3 must divide out_features=16"),
])
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rw.allocate.ARDLoRAAllocator(_model(), total_steps=STEPS, **kwargs)


def test_alpha_outside_the_optimizer_raises() -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS)
    adapters = [p for name, p in model.named_parameters() if p.requires_grad and not name.endswith("rank_scale")]
    with pytest.raises(ValueError, match="rank_scale' is not in the optimizer"):
        alloc.step(torch.optim.SGD(adapters, lr=0.1))
