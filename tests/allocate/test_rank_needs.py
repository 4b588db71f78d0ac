"""Do the allocators give rank where it is needed? Three frozen 32 × 32 layers whose targets have
ranks 2, 6 and 16 (unit singular values, Gaussian noise of std 0.1 on the outputs), a total of 27
ranks (uniform would be 9 each, short of 16 in the last layer), 300 Adam steps on fresh batches.
Every allocator must end with the ranks ordered as the needs are; the loss is compared with LoRA
given ranks 2, 6 and 16 by hand (0.0329 on the held-out batch; the noise floor is 0.03, the frozen
model 0.779).

Across seeds 0–4 (figures in the allocators' docs) all four end ordered. AdaLoRA's losses are
0.95–0.96 × LoRA's, ARD-LoRA's 0.93–0.94 ×. ElaLoRA reaches 16 on the last layer in every seed,
but its loss is 0.99–1.00 × LoRA's in seeds 1–4 and 1.12 × in seed 0 (a triplet grown at the last
event is still learning), so it is not asserted. GoRA gives the last layer 13 or 14 (its importance
grows with the gradient's size, ∝ √rank here, not with the rank): 3.0–4.0 × LoRA's loss, the
shortfall asserted below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import rankwise as rw

WIDTH, NEEDS, TOTAL, STEPS, BATCH, NOISE = 32, (2, 6, 16), 27, 300, 64, 0.1
TARGETS = tuple(f"layers.{i}.0" for i in range(len(NEEDS)))
SEED = 0

Batch = tuple[Tensor, Tensor]


class Layers(nn.Module):
    """The three layers side by side: input and output (batch, 3, width)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH)) for _ in NEEDS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([layer(x[:, i]) for i, layer in enumerate(self.layers)], 1)


def _problem(seed: int) -> tuple[Layers, Callable[[torch.Generator, int], Batch], torch.Generator]:
    torch.manual_seed(seed)
    model = Layers().requires_grad_(False)
    generator = torch.Generator().manual_seed(1000 + seed)
    weights = []
    for layer, rank in zip(model.layers, NEEDS, strict=True):
        u = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator)).Q[:, :rank]
        v = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator)).Q[:, :rank]
        weights.append(layer[0].weight + u @ v.T)  # the target's rank is `rank`, its singular values 1
    weight, bias = torch.stack(weights), torch.stack([layer[0].bias for layer in model.layers])

    def batch(source: torch.Generator, size: int = BATCH) -> Batch:
        x = torch.randn(size, len(NEEDS), WIDTH, generator=source)
        noise = NOISE * torch.randn(size, len(NEEDS), WIDTH, generator=source)
        return x, torch.einsum("nli,loi->nlo", x, weight) + bias + noise

    return model, batch, generator


def _loss(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y) * len(NEEDS)  # the sum of the three layers' MSEs


def _train(
    model: nn.Module,
    batch: Callable,
    generator: torch.Generator,
    lr: float,
    alloc: rw.allocate.RankAllocator | None = None,
) -> float:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(STEPS):
        (_loss(model, batch(generator)) + (alloc.penalty() if alloc else 0)).backward()
        optimizer.step()
        if alloc:
            alloc.step(optimizer)
        optimizer.zero_grad()
    with torch.no_grad():
        return _loss(model, batch(torch.Generator().manual_seed(7), 2048)).item()


@functools.cache
def _lora_by_hand(seed: int) -> float:
    model, batch, generator = _problem(seed)
    for layer, rank in zip(model.layers, NEEDS, strict=True):
        rw.adapt(layer, rw.LoRAConfig(rank=rank, alpha=2 * rank, targets="0"))
    return _train(model, batch, generator, lr=1e-2)  # LoRA's best of 5e-4, 2e-3, 1e-2, 2e-2, 3e-2 here


def _adalora(seed: int) -> tuple[tuple[float, ...], float]:
    model, batch, generator = _problem(seed)
    # r_init 20 > 16: with r_init = 16 a triplet of the last layer still learning at the final mask
    # can be masked (seed 4: ranks 5, 7, 15).
    rw.adapt(model, rw.AdaLoRAConfig(rank=20, targets=TARGETS))
    alloc = rw.allocate.AdaLoRAAllocator(model, total_steps=STEPS, budget=TOTAL)
    loss = _train(model, batch, generator, lr=1e-2, alloc=alloc)
    return tuple(alloc.history.final().values()), loss


def _elalora(seed: int) -> tuple[tuple[float, ...], float]:
    model, batch, generator = _problem(seed)
    rw.adapt(model, rw.ElaLoRAConfig(rank=TOTAL // len(NEEDS), targets=TARGETS))
    alloc = rw.allocate.ElaLoRAAllocator(model, total_steps=STEPS)
    loss = _train(model, batch, generator, lr=3e-2, alloc=alloc)
    return tuple(alloc.history.final().values()), loss


def _ard_lora(seed: int) -> tuple[tuple[float, ...], float]:
    model, batch, generator = _problem(seed)
    rw.adapt(model, rw.ARDLoRAConfig(rank=TOTAL // len(NEEDS), targets=TARGETS))
    # No TV: it ties neighbouring layers' ranks together, and these three layers are unrelated.
    alloc = rw.allocate.ARDLoRAAllocator(model, total_steps=STEPS, budget=TOTAL * 2 * WIDTH, tv=0.0)
    loss = _train(model, batch, generator, lr=2e-2, alloc=alloc)
    return tuple(alloc.history.final().values()), loss


def _gora(seed: int) -> tuple[tuple[float, ...], float]:
    model, batch, generator = _problem(seed)
    rw.adapt(model, rw.GoRAConfig(rank=TOTAL // len(NEEDS), targets=TARGETS))
    result = rw.allocate.gora(
        model, [batch(generator) for _ in range(8)], loss_fn=_loss, r_min=1, budget=TOTAL * 2 * WIDTH
    )
    return tuple(float(r) for r in result.ranks.values()), _train(model, batch, generator, lr=1e-2)


RUNS = {"adalora": _adalora, "elalora": _elalora, "ard_lora": _ard_lora, "gora": _gora}


@functools.cache
def _run(name: str) -> tuple[tuple[float, ...], float]:
    return RUNS[name](SEED)


@pytest.mark.parametrize("name", list(RUNS))
def test_final_ranks_are_ordered_as_the_needs(name: str) -> None:
    ranks, _ = _run(name)
    assert ranks[0] < ranks[1] < ranks[2], ranks
    assert sum(ranks) <= TOTAL + 1e-3


@pytest.mark.parametrize("name", ["adalora", "ard_lora"])
def test_loss_is_within_ten_percent_of_lora_with_the_right_ranks(name: str) -> None:
    ranks, loss = _run(name)
    assert ranks[2] >= 15.9  # the rank-16 layer has what it needs
    assert loss < 1.1 * _lora_by_hand(SEED)


def test_gora_falls_short_because_its_importance_follows_the_gradients_size() -> None:
    ranks, loss = _run("gora")
    assert ranks[2] <= 15
    assert loss > 1.5 * _lora_by_hand(SEED)


def test_adalora_barely_learns_in_300_steps_at_its_glue_rate() -> None:
    # From e = 0 with A, B ~ N(0, 0.02²) the update is a product of three near-zero factors, which
    # Adam grows at about the rate each: at 5e-4 (official GLUE) 300 steps leave the loss at 0.67 of
    # the frozen model's 0.78, where LoRA at the same rate reaches 0.18. The test above needs 1e-2.
    model, batch, generator = _problem(SEED)
    rw.adapt(model, rw.AdaLoRAConfig(rank=20, targets=TARGETS))
    loss = _train(
        model, batch, generator, lr=5e-4, alloc=rw.allocate.AdaLoRAAllocator(model, total_steps=STEPS, budget=TOTAL)
    )
    with torch.no_grad():
        frozen = _loss(_problem(SEED)[0], batch(torch.Generator().manual_seed(7), 2048)).item()
    assert loss > 0.8 * frozen
