"""Optimizer-state surgery for resized parameters (``migrate``) and the history, apart from any
allocator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.allocate.base import History, migrate


def _trained_adam(weight_decay: float = 0.0) -> tuple[nn.Parameter, nn.Parameter, torch.optim.Optimizer]:
    """Two parameters after three Adam steps with different gradients: real, non-trivial moments."""
    a = nn.Parameter(torch.randn(4, 3))  # rank along dim 0
    b = nn.Parameter(torch.randn(5, 4))  # rank along dim 1
    groups = [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2, "weight_decay": weight_decay}]
    optimizer = torch.optim.AdamW(groups)
    for step in range(3):
        (a.sum() * (step + 1) + (b**2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return a, b, optimizer


def test_surviving_entries_keep_their_exact_moments_and_new_ones_start_per_spec() -> None:
    a, b, optimizer = _trained_adam()
    old_a, old_b = ({k: v.clone() for k, v in optimizer.state[p].items()} for p in (a, b))
    keep = torch.tensor([3, 0])
    new_a = nn.Parameter(torch.cat([a.detach()[keep], torch.zeros(2, 3)]))
    new_b = nn.Parameter(torch.cat([b.detach()[:, keep], torch.zeros(5, 2)], dim=1))
    migrate(optimizer, [(a, new_a, 0), (b, new_b, 1)], keep, grown=2)

    assert optimizer.param_groups[0]["params"] == [new_a] and optimizer.param_groups[1]["params"] == [new_b]
    assert optimizer.param_groups[1]["lr"] == 0.2  # the group, and so the LR schedule, is unchanged
    assert a not in optimizer.state and b not in optimizer.state
    state_a, state_b = optimizer.state[new_a], optimizer.state[new_b]
    assert torch.equal(state_a["step"], old_a["step"])
    assert torch.equal(state_a["exp_avg"][:2], old_a["exp_avg"][[3, 0]])
    assert torch.equal(state_a["exp_avg_sq"][:2], old_a["exp_avg_sq"][[3, 0]])
    assert torch.equal(state_b["exp_avg"][:, :2], old_b["exp_avg"][:, [3, 0]])
    assert torch.equal(state_a["exp_avg"][2:], torch.zeros(2, 3))
    # "mean": the new second moments are the mean of the kept ones of that tensor.
    kept_mean = old_b["exp_avg_sq"][:, [3, 0]].mean()
    torch.testing.assert_close(state_b["exp_avg_sq"][:, 2:], torch.full((5, 2), kept_mean.item()))


def test_zero_fill_and_the_next_step_runs() -> None:
    a, _, optimizer = _trained_adam()
    keep = torch.tensor([1])
    new_a = nn.Parameter(torch.cat([a.detach()[keep], torch.ones(1, 3)]))
    migrate(optimizer, [(a, new_a, 0)], keep, grown=1, fill="zero")
    assert torch.equal(optimizer.state[new_a]["exp_avg_sq"][1], torch.zeros(3))
    new_a.sum().backward()
    optimizer.step()  # Adam accepts the migrated state as its own
    assert optimizer.state[new_a]["step"].item() == 4


def test_sgd_momentum_is_sliced() -> None:
    p = nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.sum().backward()
    optimizer.step()
    buffer = optimizer.state[p]["momentum_buffer"].clone()
    new = nn.Parameter(p.detach()[[2]])
    migrate(optimizer, [(p, new, 0)], torch.tensor([2]), grown=0)
    assert torch.equal(optimizer.state[new]["momentum_buffer"], buffer[[2]])


def test_a_parameter_outside_the_optimizer_raises() -> None:
    _, _, optimizer = _trained_adam()
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not in the optimizer"):
        migrate(optimizer, [(stranger, nn.Parameter(torch.zeros(1)), 0)], torch.tensor([0]), 0)


def test_unknown_optimizer_state_raises_naming_it() -> None:
    p = nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.Adagrad([p])
    p.sum().backward()
    optimizer.step()
    with pytest.raises(TypeError, match=r"Adagrad.*'sum'"):
        migrate(optimizer, [(p, nn.Parameter(p.detach()[:1]), 0)], torch.tensor([0]), 0)


def test_history_round_trips_and_reports_the_final_ranks() -> None:
    history = History(("a", "b"))
    history.record(0, {"a": 4, "b": 4}, 8, 8)
    history.record(1, {"b": 5, "a": 3}, 8, 8)
    assert history.final() == {"a": 3, "b": 5}
    assert History.from_dict(history.to_dict()) == history
    with pytest.raises(ValueError, match="empty"):
        History(("a",)).final()


@pytest.mark.parametrize("change", ["set_active", "delete_adapter"])
def test_an_allocator_refuses_to_step_once_its_adapter_is_no_longer_the_active_one(change: str) -> None:
    # Its statistics and budget are adapter "a"'s: driving "b" with them would be wrong, silently.
    import rankwise as rw
    from rankwise.allocate import AdaLoRAAllocator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    rw.adapt(model, rw.AdaLoRAConfig(rank=4, targets=("0", "2")), name="a")
    rw.adapt(model, rw.AdaLoRAConfig(rank=4, targets=("0", "2")), name="b")
    allocator = AdaLoRAAllocator(model, total_steps=20, t_init=0, t_final=2, delta_t=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 8)
    model(x).pow(2).mean().backward()
    optimizer.step()
    allocator.step(optimizer)
    if change == "set_active":
        rw.set_active(model, "b")
    else:
        rw.delete_adapter(model, "a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"AdaLoRAAllocator: the adapter it drives \('a' on \['0', '2'\]\) is no longer"
    ):
        allocator.step(optimizer)
    assert allocator.t == 1
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
