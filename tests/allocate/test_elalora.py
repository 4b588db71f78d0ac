"""ElaLoRA: the b schedule and one event by hand, real shape changes with the surviving triplets'
exact Adam moments and the LR schedule kept, the constant total and the checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw

STEPS = 24


def _model(rank: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    model = rw.adapt(model, rw.ElaLoRAConfig(rank=rank, targets=("0", "2", "4")))
    with torch.no_grad():
        for layer in _layers(model):
            layer.delta.e.normal_(0, 0.3)
    return model


def _layers(model: nn.Module) -> list[rw.Adapted]:
    return [model[0], model[2], model[4]]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=generator), torch.randn(32, 4, generator=generator)


def _train(model: nn.Module, alloc: rw.allocate.ElaLoRAAllocator, steps: int = STEPS) -> torch.optim.Optimizer:
    x, y = _data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
        optimizer.step()
        alloc.step(optimizer)
        optimizer.zero_grad()
    return optimizer


def test_changes_decay_cubically_by_hand() -> None:
    # b0 = 4, T = 20, t_i = 2, t_f = 4: p = (t − 2)/14, b = round(4 (1 − p³)).
    # t = 9: p = 0.5 → 3.5 → 4 (round half to even); t = 12: 4 (1 − (10/14)³) = 2.54 → 3; t = 16: 0.
    alloc = rw.allocate.ElaLoRAAllocator(_model(), total_steps=20, changes=4, t_init=2, t_final=4, delta_t=1)
    assert [alloc.changes_at(t) for t in (0, 2, 9, 12, 15, 16, 19)] == [4, 4, 4, 3, 1, 0, 0]
    off = rw.allocate.ElaLoRAAllocator(_model(), total_steps=20, changes=4, t_init=2, t_final=4, schedule=False)
    assert off.changes_at(15) == 4


def test_one_event_by_hand() -> None:
    model = _model()
    # Orthonormal rows and columns, so the new directions' projection is exact.
    with torch.no_grad():
        for layer in _layers(model):
            layer.delta.A.copy_(torch.eye(layer.delta.in_features)[:3])
            layer.delta.B.copy_(torch.eye(layer.delta.out_features, 3))
    alloc = rw.allocate.ElaLoRAAllocator(
        model, total_steps=10, changes=2, candidates=2, t_init=0, t_final=0, delta_t=1, schedule=False
    )
    # Scores through e alone (Ī = Ū = √S, zero A and B entries). Pool: layer 0 → {0.1, 0.5}, layer 1 →
    # {0.02, 0.03}, layer 2 → {0.3, 0.6}. Prune the two lowest (both in layer 1), grow at the two
    # highest (0.6 in layer 2, 0.5 in layer 0).
    scores = {"0": [0.5, 0.1, 0.9], "2": [0.02, 0.03, 0.8], "4": [0.6, 0.7, 0.3]}
    for path, layer in zip(scores, _layers(model), strict=True):
        root = torch.tensor(scores[path]).sqrt().unsqueeze(1)
        zeros = (torch.zeros_like(layer.delta.A), torch.zeros_like(layer.delta.B))
        alloc.tracker.ema[path] = {"A": (zeros[0], zeros[0]), "e": (root, root), "B": (zeros[1], zeros[1])}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a zero gradient scales every score by the same 0.830875: the order holds
        p.grad = torch.zeros_like(p)
    old = [(layer.delta.A.detach().clone(), layer.delta.e.detach().clone()) for layer in _layers(model)]
    alloc.t = 1  # an event step: t > t_i and (t − t_i) % ΔT = 0
    assert alloc.step(torch.optim.SGD(params, lr=0.0))
    assert alloc.ranks() == {"0": 4, "2": 1, "4": 4}
    first, middle, last = (layer.delta for layer in _layers(model))
    assert torch.equal(middle.A, old[1][0][[2]])  # layer 1 kept only its triplet 2
    assert torch.equal(first.A[:3], old[0][0]) and torch.equal(last.e[:3], old[2][1])
    for delta in (first, last):  # the grown triplet: unit, orthogonal to the kept ones, e ≈ 0
        a, b = delta.A[3], delta.B[:, 3]
        torch.testing.assert_close(torch.stack([a.norm(), b.norm()]), torch.ones(2), rtol=0, atol=1e-5)
        torch.testing.assert_close(delta.A[:3] @ a, torch.zeros(3), rtol=0, atol=1e-6)
        torch.testing.assert_close(delta.B[:, :3].t() @ b, torch.zeros(3), rtol=0, atol=1e-6)
        assert delta.e[3].item() == torch.tensor(1e-13).item()  # fp32
    assert alloc.tracker.ema["2"]["e"][0].shape == (1, 1) and alloc.tracker.ema["0"]["e"][0][3].item() == 0


def test_event_replaces_parameters_keeps_exact_moments_and_the_lr_schedule() -> None:
    model = _model()
    alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, changes=2, t_init=3, t_final=3, delta_t=4)
    x, y = _data()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / (1 + t))
    seen_event = False
    for _ in range(STEPS):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        before = {
            id(layer): (layer.delta.A, {k: v.clone() for k, v in optimizer.state[layer.delta.A].items()})
            for layer in _layers(model)
        }
        if alloc.step(optimizer):
            seen_event = True
            for layer in _layers(model):
                old_A, old_state = before[id(layer)]
                if layer.delta.A is old_A:
                    continue
                assert old_A not in optimizer.state
                assert sum(p is layer.delta.A for p in optimizer.param_groups[0]["params"]) == 1
                kept = [i for i in range(old_A.shape[0]) if any(torch.equal(old_A[i], row) for row in layer.delta.A)]
                state = optimizer.state[layer.delta.A]
                assert torch.equal(state["step"], old_state["step"])
                assert torch.equal(state["exp_avg"][: len(kept)], old_state["exp_avg"][kept])
                assert torch.equal(state["exp_avg_sq"][: len(kept)], old_state["exp_avg_sq"][kept])
                grown = layer.delta.rank - len(kept)
                if grown:
                    width = layer.delta.in_features
                    assert torch.equal(state["exp_avg"][len(kept) :], torch.zeros(grown, width))
                    expected = torch.full((grown, width), old_state["exp_avg_sq"][kept].mean().item())
                    torch.testing.assert_close(state["exp_avg_sq"][len(kept) :], expected)
        optimizer.zero_grad()
    assert seen_event
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + STEPS))  # the schedule kept running
    assert len(optimizer.param_groups[0]["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_total_rank_is_constant_and_ranks_never_fall_below_one() -> None:
    model = _model()
    alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, changes=3, t_init=2, t_final=2, delta_t=2)
    _train(model, alloc)
    history = alloc.history
    assert all(total == budget == 9 for total, budget in zip(history.totals, history.budgets, strict=True))
    assert min(min(row) for row in history.ranks) >= 1
    assert len(set(history.ranks)) > 1  # ranks did move
    assert [layer.delta.rank for layer in _layers(model)] == list(alloc.ranks().values())


def test_reset_optimizer_drops_all_state_as_the_official_trainer() -> None:
    model = _model()
    alloc = rw.allocate.ElaLoRAAllocator(
        model, total_steps=10, changes=2, t_init=1, t_final=0, delta_t=2, reset_optimizer=True
    )
    x, y = _data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):  # the first event is at t = 3
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        changed = alloc.step(optimizer)
        optimizer.zero_grad()
    assert changed and len(optimizer.state) == 0


def test_checkpoint_reloads_non_uniform_ranks(tmp_path) -> None:
    model = _model()
    alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, changes=3, t_init=2, t_final=2, delta_t=2)
    _train(model, alloc)
    assert len(set(alloc.ranks().values())) > 1
    rw.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    loaded = rw.load_adapter(base, tmp_path)
    x, _ = _data()
    assert torch.equal(loaded(x), model(x))
    assert [layer.delta.rank for layer in _layers(loaded)] == list(alloc.ranks().values())
    assert all(layer.delta.scale == model[0].delta.scale for layer in _layers(loaded))  # α / r_init throughout


def test_allocator_state_round_trips() -> None:
    model = _model()
    alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, changes=2, t_init=2, t_final=2, delta_t=2)
    _train(model, alloc, steps=5)
    resumed = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS, changes=2, t_init=2, t_final=2, delta_t=2)
    resumed.load_state_dict(alloc.state_dict())
    assert resumed.t == 5 and resumed.history == alloc.history
    scores = [a.tracker.triplet_scores("2", model[2].delta) for a in (resumed, alloc)]
    assert torch.equal(*scores)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"changes": 0}, "changes"),
        ({"candidates": 0}, "candidates"),
        ({"delta_t": 0}, "delta_t"),
        ({"t_init": 20, "t_final": 4}, "t_init"),
        ({"moment_fill": "ones"}, "moment_fill"),
        ({"beta2": 0.0}, "beta2"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        rw.allocate.ElaLoRAAllocator(_model(), total_steps=STEPS, **kwargs)


def _at_event(
    alloc: rw.allocate.ElaLoRAAllocator, model: nn.Module, scores: dict[str, list[float]]
) -> list[nn.Parameter]:
    """Set each layer's triplet scores (through e alone, with Ī = Ū = √S), zero gradients and an
    event step (t = 1 with t_i = 0, ΔT = 1); returns the trainable parameters."""
    for path, values in scores.items():
        delta = model.get_submodule(path).delta
        root = torch.tensor(values).sqrt().unsqueeze(1)
        zeros = (torch.zeros_like(delta.A), torch.zeros_like(delta.B))
        alloc.tracker.ema[path] = {"A": (zeros[0], zeros[0]), "e": (root, root), "B": (zeros[1], zeros[1])}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    alloc.t = 1
    return params


def test_new_directions_are_orthogonal_to_the_kept_ones_when_those_are_not_orthonormal() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 16)), rw.ElaLoRAConfig(rank=4, targets=("0", "1")))
    layers = [model[0], model[1]]
    with torch.no_grad():
        for layer in layers:  # correlated rows and columns of unequal lengths, far from orthonormal
            layer.delta.A.add_(torch.randn(1, layer.delta.in_features)).mul_(torch.rand(4, 1) + 0.5)
            layer.delta.B.add_(torch.randn(layer.delta.out_features, 1))
    alloc = rw.allocate.ElaLoRAAllocator(
        model, total_steps=10, changes=2, candidates=2, t_init=0, t_final=0, delta_t=1, schedule=False
    )
    params = _at_event(alloc, model, {"0": [0.5, 0.6, 0.7, 0.8], "1": [0.01, 0.02, 0.9, 0.9]})
    kept = (layers[0].delta.A.detach().clone(), layers[0].delta.B.detach().clone())
    assert alloc.step(torch.optim.SGD(params, lr=0.0))
    assert alloc.ranks() == {"0": 6, "1": 2}  # layer 1's two weakest moved to layer 0
    A, B = layers[0].delta.A.detach(), layers[0].delta.B.detach()
    assert torch.equal(A[:4], kept[0]) and torch.equal(B[:, :4], kept[1])
    unit = torch.nn.functional.normalize
    rows, columns = unit(A, dim=1), unit(B, dim=0)
    # New against kept and against each other: the cosines are 0 to rounding (one projection
    # v − Aᵀ A v leaves cosines of order 1 here).
    assert (rows[4:] @ rows[:4].t()).abs().max().item() < 1e-5
    assert (columns[:, 4:].t() @ columns[:, :4]).abs().max().item() < 1e-5
    torch.testing.assert_close(rows[4:] @ rows[4:].t(), torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(A[4:].norm(dim=1), torch.ones(2))


def test_growing_past_the_layer_width_raises_before_any_change() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 8)), rw.ElaLoRAConfig(rank=3, targets=("0", "1")))
    alloc = rw.allocate.ElaLoRAAllocator(
        model, total_steps=10, changes=1, candidates=2, t_init=0, t_final=0, delta_t=1, schedule=False
    )
    # Layer 0 (3 × 3, already at rank 3) holds the pool's strongest candidates, so it would grow.
    params = _at_event(alloc, model, {"0": [0.7, 0.8, 0.9], "1": [0.01, 0.02, 0.9]})
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"'0' would grow to rank 4, past min\(in, out\) = 3"):
        alloc.step(torch.optim.SGD(params, lr=0.0))
    assert all(
        torch.equal(p, q) for p, q in zip([p for p in model.parameters() if p.requires_grad], before, strict=True)
    )
