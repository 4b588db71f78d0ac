"""Rank allocation under one budget: the greedy rule on given scores, and ``lord(params=...)`` on a
model whose two layers need very different ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.compress import LowRankLinear, calibrate, lord
from rankwise.compress.allocation import allocate_ranks, break_even


def test_the_budget_goes_to_the_directions_worth_most_per_parameter() -> None:
    # Two 8 x 8 layers (break-even rank 4, each direction 16 weights), rank 1 each to start (32).
    scores = {"a": torch.tensor([8.0, 7, 1, 0.9, 0, 0, 0, 0]), "b": torch.tensor([9.0, 3, 0.4, 0.3, 0, 0, 0, 0])}
    sizes = {"a": (8, 8), "b": (8, 8)}
    assert allocate_ranks(sizes, scores, budget=64) == {"a": 2, "b": 2}  # a's 7, then b's 3
    assert allocate_ranks(sizes, scores, budget=80) == {"a": 3, "b": 2}  # then a's 1
    # a's fourth direction reaches break-even: "a" turns dense, 64 weights (not 4 · 16), all kept.
    assert allocate_ranks(sizes, scores, budget=96) == {"a": 8, "b": 2}
    assert allocate_ranks(sizes, scores, budget=95) == {"a": 3, "b": 2}


def test_a_direction_is_worth_no_more_than_the_ones_it_needs_before_it() -> None:
    # "b"'s third direction scores high but needs the second (0.1) first: "a" gets both steps.
    scores = {"a": torch.tensor([5.0, 1, 1, 1]), "b": torch.tensor([5.0, 0.1, 9, 0])}
    assert allocate_ranks({"a": (4, 16), "b": (4, 16)}, scores, budget=4 * 20) == {"a": 3, "b": 1}


def test_a_budget_below_rank_one_everywhere_is_refused() -> None:
    with pytest.raises(ValueError, match="below rank 1 in every layer"):
        allocate_ranks({"a": (8, 8)}, {"a": torch.ones(8)}, budget=15)
    assert break_even(1536, 576) == 419 and break_even(576, 576) == 288


class _TwoBranches(nn.Module):
    """``y = low(x) + full(x)``: ``low`` has rank 4, ``full`` is full-rank (orthogonal)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.low, self.full = nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.low.weight.copy_(torch.randn(32, 4) @ torch.randn(4, 32) / 4)
            self.full.weight.copy_(torch.linalg.qr(torch.randn(32, 32))[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x) + self.full(x)


def _two_layers() -> _TwoBranches:
    return _TwoBranches()


def _batches(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=generator) for _ in range(4)]


_TEACHER = torch.randn(32, 32, generator=torch.Generator().manual_seed(11))


def _mse(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A regression loss against a fixed random linear teacher."""
    return F.mse_loss(output, x @ _TEACHER)


def test_allocation_gives_the_rank_to_the_layer_that_needs_it() -> None:
    reference = _two_layers()
    statistics = calibrate(reference, _batches(1), loss=_mse)
    # Budget: 60% of 2 · (32 · 32 + 32) = 1,267 parameters, 1,203 weights besides the 64 biases.
    allocated = _two_layers()
    report = lord(allocated, params=0.6, calibration=statistics)
    assert report.ranks() == {"low": 4, "full": 14}  # 4 · 64 + 14 · 64 = 1,152 <= 1,203 < 1,216
    assert report.params_after <= 0.6 * report.params_before
    assert report.layers[0].output_error < 1e-6  # rank 4 holds all of the low layer's output
    # A uniform ratio at the same parameters (rank 9 each) loses more of the model's output.
    uniform = _two_layers()
    uniform_report = lord(uniform, rank_ratio=9 / 32, calibration=statistics)
    assert uniform_report.ranks() == {"low": 9, "full": 9} and uniform_report.params_after == report.params_after
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(7))
    errors = [torch.linalg.norm(m(x) - reference(x)).item() for m in (allocated, uniform)]
    # Only the orthogonal layer loses anything: 18 of its 32 directions against 23, sqrt(18 / 23) ≈ 0.88.
    assert errors[0] < 0.9 * errors[1], errors
    assert isinstance(allocated.low, LowRankLinear) and allocated.low.rank == 4


def test_params_needs_a_calibration_with_a_loss() -> None:
    with pytest.raises(ValueError, match="params allocates ranks from calibration data"):
        lord(_two_layers(), params=0.5)
    without_loss = calibrate(_two_layers(), _batches(1))
    assert without_loss.gradients is None
    with pytest.raises(ValueError, match="no gradient statistics"):
        lord(_two_layers(), params=0.5, calibration=without_loss)
    with_loss = calibrate(_two_layers(), _batches(1), loss=_mse)
    with pytest.raises(ValueError, match=r"params=0.01: a budget of .* is below rank 1"):
        lord(_two_layers(), params=0.01, calibration=with_loss)
    with pytest.raises(ValueError, match=r"params=1.5 must be in \(0, 1\]"):
        lord(_two_layers(), params=1.5, calibration=with_loss)


def test_the_gradient_moments_are_those_of_the_loss_at_each_output() -> None:
    model = _two_layers()
    batches = _batches(3)
    statistics = calibrate(model, batches, loss=_mse)
    expected = {"low": 0, "full": 0}
    for x in batches:
        # Each branch's output, bias-free, as a leaf: the gradient of the loss there is ∂L/∂z.
        low, full = (torch.nn.functional.linear(x, m.weight).detach().requires_grad_() for m in (model.low, model.full))
        _mse(low + model.low.bias + full + model.full.bias, x).backward()
        expected["low"] += low.grad.double().T @ low.grad.double()
        expected["full"] += full.grad.double().T @ full.grad.double()
    for path in ("low", "full"):
        # float32 forwards on both sides
        torch.testing.assert_close(statistics.gradients[path], expected[path] / 256, rtol=1e-4, atol=1e-12)
