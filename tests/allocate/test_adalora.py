"""AdaLoRA: the adapter's resize and penalty, the importance and the budget schedule by hand, masks
equal to PEFT's AdaLoRA on identical weights, the final removal and the checkpoint."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from torch import nn

import rankwise as rw

STEPS = 30


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=generator), torch.randn(32, 4, generator=generator)


def _adapted(rank: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = rw.adapt(Net(), rw.AdaLoRAConfig(rank=rank, alpha=16, targets=("a", "b", "c")))
    with torch.no_grad():  # e ≠ 0, so every triplet contributes and has a gradient from step 0
        for _, layer in rw.core.inject.adapted_modules(model):
            layer.delta.e.normal_(0, 0.3)
    return model


def _train(model: nn.Module, alloc: rw.allocate.AdaLoRAAllocator, steps: int = STEPS) -> torch.optim.Optimizer:
    x, y = _data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
        optimizer.step()
        alloc.step(optimizer)
        optimizer.zero_grad()
    return optimizer


def test_schedule_is_the_formula_by_hand() -> None:
    # T = 20, t_i = 2, t_f = 5, ΔT = 3, b0 = 12, b_T = 6: b(t) = ⌊6 + 6 (1 − (t − 2)/13)³⌋ for 2 < t <= 15.
    # t = 3: 6 + 6·(12/13)³ = 10.72 → 10;  t = 6: 6 + 6·(9/13)³ = 7.991 → 7 (the floor matters).
    model = rw.adapt(Net(), rw.AdaLoRAConfig(rank=4, targets=("a", "b", "c")))
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=20, budget=6, t_init=2, t_final=5, delta_t=3)
    expected = {
        0: (12, False),
        2: (12, False),
        3: (10, True),
        4: (9, False),
        5: (8, False),
        6: (7, True),
        7: (7, False),
        8: (6, False),
        9: (6, True),
        15: (6, True),
        16: (6, True),
    }
    assert {t: alloc.schedule(t) for t in expected} == expected


def test_defaults_follow_the_readme_proportions_and_the_paper_ratio() -> None:
    alloc = rw.allocate.AdaLoRAAllocator(_adapted(rank=12), total_steps=3000)
    assert (alloc.t_init, alloc.t_final, alloc.delta_t) == (500, 1500, 10)
    assert alloc.target_budget == 24  # 3 layers · 12 / 1.5 = 3 · 8 (PEFT's target_r = 8)


def test_importance_of_a_triplet_by_hand() -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(2, 3)), rw.AdaLoRAConfig(rank=2, targets="0"))
    delta = model[0].delta
    with torch.no_grad():
        delta.A.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        delta.e.copy_(torch.tensor([[1.0], [2.0]]))
        delta.B.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    for p in delta.parameters():
        p.grad = torch.ones_like(p)  # so I = |w|
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=10, t_init=5, t_final=2)
    alloc.step(torch.optim.SGD(delta.parameters(), lr=0.0))
    # One step: Ī = 0.15 I, Ū = 0.15 |I − 0.15 I| = 0.1275 I, s = 0.019125 I².
    # S_0 = 0.019125 (1 + (1 + 4)/2 + (1 + 0 + 1)/3),  S_1 = 0.019125 (4 + (9 + 16)/2 + (0 + 1 + 1)/3)
    expected = 0.019125 * torch.tensor([1 + 2.5 + 2 / 3, 4 + 12.5 + 2 / 3])
    torch.testing.assert_close(alloc.tracker.triplet_scores("0", delta), expected)
    # A second step with I' = 2 I: Ī = 0.85·0.15 I + 0.15·2I = 0.4275 I,
    # Ū = 0.85·0.1275 I + 0.15·|2I − 0.4275 I|.
    for p in delta.parameters():
        p.grad = 2 * torch.ones_like(p)
    alloc.step(torch.optim.SGD(delta.parameters(), lr=0.0))
    mean, spread = alloc.tracker.ema["0"]["e"]
    torch.testing.assert_close(mean, 0.4275 * torch.tensor([[1.0], [2.0]]))
    torch.testing.assert_close(spread, (0.85 * 0.1275 + 0.15 * 1.5725) * torch.tensor([[1.0], [2.0]]))


def test_masks_match_peft_adalora_on_identical_weights() -> None:
    torch.manual_seed(0)
    base = Net()
    config = peft.AdaLoraConfig(
        target_modules=["a", "b", "c"],
        init_r=4,
        target_r=2,
        lora_alpha=16,
        tinit=3,
        tfinal=8,
        deltaT=2,
        total_step=STEPS,
        orth_reg_weight=0.0,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = rw.adapt(copy.deepcopy(base), rw.AdaLoRAConfig(rank=4, alpha=16, targets=("a", "b", "c")))
    with torch.no_grad():
        for name in "abc":
            layer, peft_layer = getattr(ours, name), getattr(theirs.base_model.model, name)
            for ours_p, theirs_p in (
                (layer.delta.A, peft_layer.lora_A),
                (layer.delta.e, peft_layer.lora_E),
                (layer.delta.B, peft_layer.lora_B),
            ):
                theirs_p["default"].normal_(0, 0.3)
                ours_p.copy_(theirs_p["default"])
    # PEFT adds its orthogonality term only to a returned `.loss`; compare without it.
    alloc = rw.allocate.AdaLoRAAllocator(
        ours, total_steps=STEPS, budget=6, t_init=3, t_final=8, delta_t=2, orth_weight=0.0
    )
    x, y = _data()
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (theirs, ours)]
    for t in range(STEPS):
        for model, optimizer in zip((theirs, ours), optimizers, strict=True):
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        theirs.base_model.update_and_allocate(t)
        alloc.step(optimizers[1])
        for optimizer in optimizers:
            optimizer.zero_grad()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    pattern = theirs.peft_config["default"].rank_pattern
    assert alloc.ranks() == {name: sum(pattern[f"{name}.lora_E.default"]) for name in "abc"}
    assert [layer.delta.rank for layer in (ours.a, ours.b, ours.c)] == list(alloc.ranks().values())


def test_budget_holds_at_every_step_and_the_final_total_is_the_target() -> None:
    model = _adapted()
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=STEPS, budget=5, t_init=3, t_final=8, delta_t=2)
    _train(model, alloc)
    history = alloc.history
    assert all(total <= budget for total, budget in zip(history.totals, history.budgets, strict=True))
    assert history.budgets == sorted(history.budgets, reverse=True)
    assert history.budgets[0] == 12 and history.budgets[-1] == 5
    assert history.totals[-1] == 5 and sum(layer.delta.rank for layer in (model.a, model.b, model.c)) == 5
    for t in range(4, 22, 2):  # every mask event hits its budget exactly (no tie over-masking)
        assert history.totals[t] == alloc.schedule(t)[0]


def test_ties_mask_exactly_the_budget() -> None:
    model = _adapted()
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=10, budget=4, t_init=0, t_final=2, delta_t=1)
    deltas = [p for layer in (model.a, model.b, model.c) for p in layer.delta.parameters()]
    optimizer = torch.optim.SGD(deltas, lr=0.0)
    for _ in range(2):  # t = 0 warms up; t = 1 masks to b(1) = ⌊4 + 8 (7/8)³⌋ = 9
        for p in deltas:
            p.grad = torch.zeros_like(p)  # every score 0: PEFT's `<= kthvalue` would mask all 12
        alloc.step(optimizer)
    assert alloc.budget == alloc.total() == 9
    assert alloc.masks["a"].tolist() == [False, False, False, True]  # the 3 lowest positions


def test_final_removal_keeps_the_function_and_the_moments_of_kept_triplets() -> None:
    model = _adapted()
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=12, budget=7, t_init=2, t_final=4, delta_t=2)
    optimizer = _train(model, alloc, steps=11)
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    masked = copy.deepcopy(model)  # the final phase re-applies the pattern: the function to keep
    with torch.no_grad():
        for name in "abc":
            getattr(masked, name).delta.e[~alloc.masks[name]] = 0
    before = masked(x).detach()
    old_e = model.b.delta.e
    old_moments = optimizer.state[old_e]["exp_avg"].clone()
    keep = alloc.masks["b"].nonzero().view(-1)
    assert alloc.step(optimizer)  # the last step removes the masked triplets: parameters replaced
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert model.b.delta.e is not old_e and model.b.delta.rank == len(keep)
    assert torch.equal(optimizer.state[model.b.delta.e]["exp_avg"], old_moments[keep])
    assert any(p is model.b.delta.e for p in optimizer.param_groups[0]["params"])


def test_checkpoint_holds_the_final_ranks_and_reloads_without_the_allocator(tmp_path) -> None:
    model = _adapted()
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=STEPS, budget=6, t_init=3, t_final=8, delta_t=2)
    _train(model, alloc)
    ranks = alloc.ranks()
    assert len(set(ranks.values())) > 1  # non-uniform
    rw.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {path: entry["config"]["rank"] for path, entry in meta["modules"].items()} == ranks
    assert all(entry["config"]["init_rank"] == 4 for entry in meta["modules"].values())
    torch.manual_seed(0)
    loaded = rw.load_adapter(Net(), tmp_path)
    x, _ = _data()
    assert torch.equal(loaded(x), model(x))
    assert loaded.a.delta.scale == model.a.delta.scale == 16 / (4 + 1e-5)


def test_orthogonality_penalty_by_hand() -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3)), rw.AdaLoRAConfig(rank=2, targets=("0", "1")))
    with torch.no_grad():
        model[0].delta.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # A Aᵀ − I = diag(0, 3): norm 3
        model[0].delta.B.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))  # Bᵀ B − I = 0
        model[1].delta.A.zero_()  # −I: norm √2
        model[1].delta.B.zero_()
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=10, orth_weight=0.3)
    torch.testing.assert_close(alloc.penalty(), torch.tensor(0.3 * (3 + 2 * math.sqrt(2)) / 4))
    squared = rw.allocate.AdaLoRAAllocator(model, total_steps=10, orth_weight=0.3, squared_orth=True)
    torch.testing.assert_close(squared.penalty(), torch.tensor(0.3 * (9 + 2 + 2) / 4))


def test_resize_keeps_scale_and_rows() -> None:
    model = _adapted()
    delta = model.a.delta
    A = delta.A.detach().clone()
    delta.resize(torch.tensor([2, 0]), (torch.ones(1, 8), torch.zeros(1, 1), torch.ones(16, 1)))
    assert delta.rank == 3 and delta.config.rank == 3 and delta.config.init_rank == 4
    assert torch.equal(delta.A[:2], A[[2, 0]]) and delta.scale == 16 / (4 + 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "budget": 13}, "budget"),
        ({"total_steps": 10, "budget": -1}, "budget"),
        ({"total_steps": 10, "t_final": 0}, "t_final"),
        ({"total_steps": 10, "t_init": 8, "t_final": 2}, "t_init"),
        ({"total_steps": 10, "delta_t": 0}, "delta_t"),
        ({"total_steps": 10, "beta1": 1.0}, "beta1"),
        ({"total_steps": 10, "orth_weight": -0.1}, "orth_weight"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rw.allocate.AdaLoRAAllocator(_adapted(), **kwargs)


def test_misuse_raises() -> None:
    lora = rw.adapt(Net(), rw.LoRAConfig(targets="a"))
    with pytest.raises(TypeError, match="AdaLoRA adapters"):
        rw.allocate.AdaLoRAAllocator(lora, total_steps=10)
    model = _adapted()
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=10, t_init=1, t_final=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(RuntimeError, match=r"before optimizer\.zero_grad"):
        alloc.step(optimizer)  # no backward: no gradients
    alloc.t = 10
    with pytest.raises(ValueError, match="past total_steps=10"):
        alloc.step(optimizer)
