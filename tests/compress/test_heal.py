"""Healing: a short fine-tune that keeps every rank the compression chose, with the factors trained
directly or an adapter merged back into them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.compress import LowRankLinear, heal, lord
from rankwise.compress.report import count_params

_GENERATOR = torch.Generator().manual_seed(3)
_TEACHER = torch.randn(16, 4, generator=_GENERATOR) @ torch.randn(4, 16, generator=_GENERATOR) / 2  # rank 4: fits


def _mse(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, x @ _TEACHER)


def _compressed() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 16))
    lord(model, targets=("0", "3"), rank_ratio=0.25)  # rank 4 each
    return model


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(32, 16, generator=generator) for _ in range(4)]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("config", [None, rw.LoRAConfig(rank=2, targets=("all-linear",))], ids=["factors", "lora"])
def test_healing_lowers_the_loss_and_keeps_every_rank(config) -> None:
    model = _compressed()
    model[1].requires_grad_(False)  # which parameters require grad is restored afterwards
    shapes, params = _shapes(model), count_params(model)
    before = sum(_mse(model(x), x).item() for x in _batches())
    losses = heal(model, _batches(), config=config, steps=40, lr=5e-2, loss=_mse)
    after = sum(_mse(model(x), x).item() for x in _batches())
    assert len(losses) == 40 and after < 0.7 * before, (before, after)
    assert [m.rank for m in (model[0], model[3])] == [4, 4] and isinstance(model[0], LowRankLinear)
    assert _shapes(model) == shapes and count_params(model) == params  # adapters merged into the factors
    assert not any(isinstance(m, rw.Adapted) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True] * 3 + [False] * 2 + [True] * 3


def test_factor_healing_trains_only_the_linear_layers() -> None:
    model = _compressed()
    norm = model[1].weight.detach().clone()
    factor = model[0].V.weight.detach().clone()
    heal(model, _batches(), steps=5, lr=1e-2, loss=_mse)
    assert torch.equal(model[1].weight, norm) and not torch.equal(model[0].V.weight, factor)


def test_bad_healing_arguments_are_refused_before_training() -> None:
    model = _compressed()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"heal: steps=0 must be an integer >= 1"):
        heal(model, _batches(), steps=0, lr=1e-3, loss=_mse)
    with pytest.raises(ValueError, match=r"heal: lr=0 must be"):
        heal(model, _batches(), steps=1, lr=0, loss=_mse)
    with pytest.raises(ValueError, match="heal: no batches"):
        heal(model, [], steps=1, lr=1e-3, loss=_mse)
    with pytest.raises(ValueError, match="the batch gives no loss"):
        heal(model, _batches(), config=rw.LoRAConfig(rank=2, targets=("all-linear",)), steps=1, lr=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert not any(isinstance(m, rw.Adapted) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
