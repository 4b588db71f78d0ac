"""ARD-LoRA-style: gates and their gradient by hand, per-head ΔW against a dense loop, the penalty
by hand, the frozen warm-up, the budget projection, the final slot removal and the checkpoint."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import types

import pytest
import safetensors.torch
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
        delta.rank_scale.copy_(torch.tensor([1.0, 0.6, 1.8]))  # r0 α = 4, 2.4, 7.2; ⌈8 + 1/2⌉ = 9 slots
    # gate_i = clamp((r0 α − i + 1/2) / 2, 0, 1)
    expected = torch.tensor(
        [[1, 1, 1, 0.75, 0.25, 0, 0, 0, 0], [1, 0.95, 0.45, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0.85, 0.35, 0]]
    )
    torch.testing.assert_close(delta.gates(), expected)
    torch.testing.assert_close(delta.effective_rank(), torch.tensor([4.0, 2.4, 7.2]))


def test_at_alpha_one_the_gradient_reaches_the_two_slots_on_their_ramps() -> None:
    delta = rw.adapt(nn.Sequential(nn.Linear(3, 2)), rw.ARDLoRAConfig(rank=4, targets="0"))[0].delta
    weights = torch.arange(1.0, 10.0)  # L = Σ_i w_i g_i, so ∂L/∂g_i = w_i
    (delta.gates()[0] * weights).sum().backward()
    # Gates (1, 1, 1, 0.75, 0.25, 0, ...): dL/dα = (r0 / 2)(∂L/∂g_3 + ∂L/∂g_4) = 2 (4 + 5).
    assert delta.rank_scale.grad.item() == 2 * (4 + 5)


@pytest.mark.parametrize("side", ["out", "in"])
def test_per_head_update_is_the_dense_block_formula(side: str) -> None:
    torch.manual_seed(0)
    config = rw.ARDLoRAConfig(rank=2, heads=2, head_side=side, targets="0")
    delta = rw.adapt(nn.Sequential(nn.Linear(6, 8)), config)[0].delta
    with torch.no_grad():
        delta.magnitude.copy_(torch.tensor([0.5, -2.0]))
        delta.rank_scale.copy_(torch.tensor([0.7, 1.6]))
    expected = torch.zeros(8, 6)
    gates = delta.gates()
    for h in range(2):
        columns = delta.B[h] / delta.B[h].norm(dim=0)  # unit columns and rows, one magnitude per head
        rows = delta.A[h] / delta.A[h].norm(dim=1, keepdim=True)
        block = delta.scale * delta.magnitude[h] * columns @ torch.diag(gates[h]) @ rows
        if side == "out":
            expected[4 * h : 4 * (h + 1)] = block
        else:
            expected[:, 3 * h : 3 * (h + 1)] = block
    torch.testing.assert_close(delta.delta_weight(), expected)
    x = torch.randn(5, 6)
    torch.testing.assert_close(delta(x), x @ expected.T)
    y = torch.randn(5, 8)
    torch.testing.assert_close(delta.add_to(y, x), y + x @ expected.T)
    per_slot = 2 * 6 + 8 if side == "out" else 6 + 2 * 8
    # ⌈r0 α_max + 1/2⌉ = 5 slots, and α and m per head.
    assert sum(p.numel() for p in delta.parameters()) == type(delta).num_params(6, 8, delta.config) == 5 * per_slot + 4


def test_penalty_by_hand() -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, l1=0.1, tv=0.5, warmup=0)
    with torch.no_grad():
        for layer, value in zip((model[0], model[2], model[4]), (1.0, 1.5, 0.25), strict=True):
            layer.delta.rank_scale.fill_(value)
    # One chain "*" (paths 0, 2, 4): 0.1 (1 + 1.5 + 0.25) + 0.5 (|1.5 − 1|_ε + |0.25 − 1.5|_ε),
    # |x|_ε = √(x² + ε²) − ε
    eps = rw.allocate.ard_lora.TV_SMOOTHING
    variation = sum(math.sqrt(x**2 + eps**2) - eps for x in (0.5, -1.25))
    torch.testing.assert_close(alloc.penalty(), torch.tensor(0.1 * 2.75 + 0.5 * variation))
    assert abs(variation - 1.75) < 2 * eps  # the total variation, not the squares' 1.8125


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
    eps = rw.allocate.ard_lora.TV_SMOOTHING
    torch.testing.assert_close(alloc.penalty(), torch.tensor(2 * (math.sqrt(1 + eps**2) - eps)))


def test_alpha_is_frozen_during_warmup_then_takes_the_allocators_step() -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=5, l1=0.0, tv=0.0)
    optimizer = _train(model, alloc, steps=5, weight_decay=0.1)
    layers = (model[0], model[2], model[4])
    for layer in layers:
        assert torch.equal(layer.delta.rank_scale, torch.ones(1))  # the steps and the decay were undone
        assert layer.delta.rank_scale not in optimizer.state
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    grads = torch.cat([layer.delta.rank_scale.grad for layer in layers])
    optimizer.step()
    alloc.step(optimizer)
    # First step, bias-corrected: α − η g / √(mean_g g²), one denominator for all groups.
    expected = 1 - alloc.scale_lr * grads / grads.square().mean().sqrt()
    torch.testing.assert_close(torch.cat([layer.delta.rank_scale for layer in layers]).detach(), expected)
    assert len(set(expected.tolist())) == 3  # the groups moved by different amounts


def test_alpha_follows_the_allocator_whether_or_not_the_optimizer_holds_it() -> None:
    runs = []
    for with_alpha in (True, False):
        model = _model()
        alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=2)
        params = [
            p
            for name, p in model.named_parameters()
            if p.requires_grad and (with_alpha or not name.endswith("rank_scale"))
        ]
        optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.5)
        x, y = _data()
        for _ in range(6):
            (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
            optimizer.step()
            alloc.step(optimizer)
            optimizer.zero_grad()
        runs.append(torch.cat([model[i].delta.rank_scale.detach() for i in (0, 2, 4)]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert (runs[0] != 1).all()


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
    torch.testing.assert_close(got, (wanted - lam * cost).clamp(0.5 / 4, 2.0))  # least α: r0 α = 1/2
    assert got[2].item() == 0.125
    assert got[0].item() == 2.0  # at its bound; clipping first, projecting after would give 1.82


def test_budget_holds_and_the_end_keeps_only_used_slots(tmp_path) -> None:
    model = _model()
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=2, budget=250, l1=0.3)
    x, _ = _data()
    _train(model, alloc, steps=STEPS - 1)
    history = alloc.history
    assert all(total <= 250 * (1 + 1e-6) for total in history.totals)  # within fp32 rounding, warm-up included
    assert history.totals[0] == pytest.approx(250) and history.totals[-1] < 250  # ℓ1 then went below
    y = _data()[1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
    optimizer.step()
    uncut = copy.deepcopy(model)  # all slots, and α after the last step below
    assert alloc.step(optimizer)  # the last step drops unused slots
    ranks = alloc.ranks()
    with torch.no_grad():
        for i in (0, 2, 4):
            uncut[i].delta.rank_scale.copy_(model[i].delta.rank_scale)
    torch.testing.assert_close(model(x), uncut(x), rtol=0, atol=1e-6)
    for layer, rank in zip((model[0], model[2], model[4]), ranks.values(), strict=True):
        assert layer.delta.config.slots == math.ceil(rank + 0.5) < 9  # gate_i > 0 for i < r0 α + 1/2
    rw.save_adapter(model, tmp_path)
    loaded = rw.load_adapter(_base(), tmp_path)
    assert torch.equal(loaded(x), model(x))
    slots = [layer.delta.A.shape[1] for layer in (loaded[0], loaded[2], loaded[4])]
    assert slots == [math.ceil(r + 0.5) for r in ranks.values()]


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l1": -1.0}, "l1"),
        ({"tv": float("nan")}, "tv"),
        ({"warmup": -1}, "warmup"),
        ({"budget": -5}, "budget"),
        ({"heads": {"nothing": (2, "out")}}, "matches no adapted layer"),
        ({"heads": {"0": (3, "out")}}, "heads=3 must divide out_features=16"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rw.allocate.ARDLoRAAllocator(_model(), total_steps=STEPS, **kwargs)


def test_alpha_gets_the_task_gradient_where_the_directions_and_magnitude_are_stationary() -> None:
    # Target T = 2 u0 v0ᵀ + 2 u1 v1ᵀ; the adapter holds exactly those directions, with gates (0.95, 0.45):
    # L = ‖ΔW − T‖² = (g0 sm − 2)² + (g1 sm − 2)², and sm at its optimum (g0 2 + g1 2) / (g0² + g1²).
    # Then ∂L/∂A = ∂L/∂B = ∂L/∂m = 0, yet the second direction wants more: ∂L/∂α < 0. (With a gate on a
    # free B, g ∂L/∂g = ⟨B, ∂L/∂B⟩ would vanish here.)
    delta = rw.adapt(nn.Sequential(nn.Linear(4, 4)), rw.ARDLoRAConfig(rank=1, max_scale=3.0, targets="0"))[0].delta
    eye = torch.eye(4)
    g0, g1 = 0.95, 0.45
    sm = (2 * g0 + 2 * g1) / (g0**2 + g1**2)
    with torch.no_grad():
        delta.A.copy_(3 * eye[:4].unsqueeze(0))  # rows v_i = e_i (any length: only directions count)
        delta.B.copy_(0.5 * eye.unsqueeze(0))  # columns u_i = e_i
        delta.rank_scale.fill_(1.4)  # r0 α = 1.4: gates (0.95, 0.45, 0, 0)
        delta.magnitude.fill_(sm / delta.scale)
    torch.testing.assert_close(delta.gates()[0], torch.tensor([g0, g1, 0.0, 0.0]))
    target = torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    loss = (delta(eye) - target.T).square().sum()  # x = I: the rows of x ΔWᵀ are ΔWᵀ
    loss.backward()
    for p in (delta.A, delta.B, delta.magnitude):
        assert p.grad.abs().max().item() < 1e-5
    # ∂L/∂α = (r0 / 2) Σ_i ∂L/∂g_i over the slots on their ramps, ∂L/∂g_i = 2 (g_i sm − 2) sm
    expected = 0.5 * 2 * sm * ((g0 * sm - 2) + (g1 * sm - 2))
    assert delta.rank_scale.grad.item() == pytest.approx(expected, rel=1e-5)
    assert expected < -1.0  # −1.147


def test_a_checkpoint_of_the_earlier_formulation_is_refused_naming_the_missing_magnitudes(tmp_path) -> None:
    # The earlier form had no magnitude and ⌈r0 α_max⌉ slots; its B was the scaled columns, not
    # directions, so loading it under this one would change the function: it must not load.
    rw.save_adapter(_model(), tmp_path)
    state = safetensors.torch.load_file(tmp_path / "adapter.safetensors")
    old = {k: (v[:, :8] if k.endswith(".A") else v[..., :8]) for k, v in state.items() if not k.endswith("magnitude")}
    old = {k: v.contiguous() for k, v in old.items()}
    data = safetensors.torch.save(old)
    (tmp_path / "adapter.safetensors").write_bytes(data)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(rw.CheckpointError, match=r"missing keys: \['0.delta.magnitude'"):
        rw.load_adapter(_base(), tmp_path)


def test_attention_projections_get_one_alpha_per_head_from_the_model_config() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
            self.o_proj, self.c_attn = nn.Linear(8, 8), nn.Linear(8, 24)

    torch.manual_seed(0)
    model = nn.Module()
    model.config = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)  # as transformers'
    model.attn, model.mlp = Attention(), nn.Module()
    model.attn.c_proj, model.mlp.c_proj = nn.Linear(8, 8), nn.Linear(8, 8)  # GPT-2: only the attention's splits
    model.attention, model.output = nn.Module(), nn.Module()  # BERT: attention.output.dense, not output.dense
    model.attention.output = nn.Module()
    model.attention.output.dense, model.output.dense = nn.Linear(8, 8), nn.Linear(8, 8)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "dense")
    model = rw.adapt(model, rw.ARDLoRAConfig(rank=2, targets=targets))
    rw.allocate.ARDLoRAAllocator(model, total_steps=10)
    layout = {
        path: (m.delta.config.heads, m.delta.config.head_side)
        for path, m in model.named_modules()
        if isinstance(m, rw.Adapted)
    }
    assert layout == {
        "attn.q_proj": (4, "out"),
        "attn.k_proj": (2, "out"),
        "attn.v_proj": (2, "out"),
        "attn.o_proj": (4, "in"),
        "attn.c_attn": (12, "out"),
        "attn.c_proj": (4, "in"),
        "mlp.c_proj": (1, "out"),
        "attention.output.dense": (4, "in"),
        "output.dense": (1, "out"),
    }
    assert model.attn.q_proj.delta.rank_scale.shape == (4,)
    plain = rw.adapt(_base(), rw.ARDLoRAConfig(rank=2, targets=("0",)))
    rw.allocate.ARDLoRAAllocator(plain, total_steps=10)  # no config: one α per matrix
    assert plain[0].delta.config.heads == 1


def _fit_one_target(singular_values: list[float], l1: float, seed: int = 0) -> float:
    """Train one 32 × 32 layer towards ``W0 + U diag(σ) Vᵀ`` from r0 = 2 (α_max 4: up to 8.5 slots);
    the final effective rank."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(100 + seed)
    u, v = (torch.linalg.qr(torch.randn(32, 32, generator=generator)).Q[:, : len(singular_values)] for _ in range(2))
    target = u @ torch.diag(torch.tensor(singular_values)) @ v.T
    model = rw.adapt(nn.Sequential(nn.Linear(32, 32)), rw.ARDLoRAConfig(rank=2, max_scale=4.0, targets="0"))
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=400, l1=l1, tv=0.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(400):
        x = torch.randn(64, 32, generator=generator)
        with torch.no_grad():
            y = model[0].base(x) + x @ target.T
        (nn.functional.mse_loss(model(x), y) + alloc.penalty()).backward()
        optimizer.step()
        alloc.step(optimizer)
        optimizer.zero_grad()
    return alloc.history.final()["0"]


def test_rank_grows_to_a_rank_six_target_without_penalties() -> None:
    # From 2 (r0), the task alone: 6.21, 6.20, 6.09 over seeds 0–2 (the gate on a free B stalled at 3.5).
    assert _fit_one_target([1.0] * 6, l1=0.0) >= 5.5


def test_l1_keeps_only_the_directions_worth_its_price() -> None:
    # Three directions of σ = 1 and three of 0.2. At a loss MSE over 32 outputs, a direction of σ is
    # worth about σ² / 32 per unit of rank and ℓ1 charges λ1 / r0 = 0.005: 1 / 32 pays, 0.04 / 32 does
    # not. Seeds 0–2: 2.92, 2.93, 2.83 with ℓ1 = 1e-2; without it 4.13, 3.94, 5.42.
    with_l1 = _fit_one_target([1.0, 1.0, 1.0, 0.2, 0.2, 0.2], l1=1e-2)
    assert 2.5 < with_l1 < 3.5
    assert _fit_one_target([1.0, 1.0, 1.0, 0.2, 0.2, 0.2], l1=0.0) > with_l1 + 0.75


def test_an_optimizer_built_before_the_heads_split_is_refused_at_the_first_step() -> None:
    # Splitting heads rebuilds the adapters: an optimizer built before holds parameters that no
    # forward uses, and the run would train nothing. The first step says so.
    model = _model()
    stale = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, warmup=2, heads={"2": (4, "out")})
    x, y = _data()
    nn.functional.mse_loss(model(x), y).backward()
    stale.step()
    missing = r"does not hold 3 adapter parameters \(e.g. \['2.A', '2.B', '2.magnitude'\]\); build it .* after creating"
    with pytest.raises(ValueError, match=missing):
        alloc.step(stale)
    assert alloc.t == 0
    # Built after the allocator, without α (the allocator owns it): accepted.
    held = [p for name, p in model.named_parameters() if p.requires_grad and not name.endswith("rank_scale")]
    assert len(held) < len([p for p in model.parameters() if p.requires_grad])
    assert alloc.step(torch.optim.AdamW(held, lr=2e-2)) is False and alloc.t == 1
