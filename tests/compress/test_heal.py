"""Healing: a short fine-tune that keeps every rank the compression chose, with the factors trained
directly or an adapter merged back into them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.compress import LowRankLinear, heal, lord
from rankwise.compress.heal import distillation_loss
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


def test_distillation_loss_is_the_kl_divergence_over_kept_positions() -> None:
    generator = torch.Generator().manual_seed(7)
    logits, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    per_position = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(distillation_loss(logits, teacher), per_position.mean(), atol=1e-6)
    kept = per_position[mask.bool()].mean()
    assert torch.allclose(distillation_loss(logits, teacher, mask), kept, atol=1e-6)
    assert distillation_loss(teacher, teacher).abs() < 1e-6


def test_healing_from_a_teacher_moves_the_model_to_its_distribution_and_keeps_ranks() -> None:
    model = _compressed()
    torch.manual_seed(1)
    teacher = nn.Linear(16, 16)

    def divergence() -> float:
        with torch.no_grad():
            return sum(distillation_loss(model(x), teacher(x)).item() for x in _batches())

    before = divergence()
    losses = heal(model, _batches(), steps=40, lr=5e-2, teacher=teacher)  # no labels: pure distillation
    assert divergence() < 0.5 * before, (before, divergence())
    assert [m.rank for m in (model[0], model[3])] == [4, 4]
    assert losses[0] == pytest.approx(distillation_loss(_compressed()(_batches()[0]), teacher(_batches()[0])).item())
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is read, not trained or frozen


def test_a_copy_of_the_model_as_teacher_gives_zero_loss_and_mixes_with_the_task_loss() -> None:
    model = _compressed()
    copy = _compressed()
    losses = heal(model, _batches()[:1], steps=1, lr=1e-3, teacher=copy, loss=_mse, distill_weight=0.25)
    assert losses[0] == pytest.approx(0.75 * _mse(copy(_batches()[0]), _batches()[0]).item(), rel=1e-6)


def test_bad_distillation_arguments_are_refused_before_training() -> None:
    model = _compressed()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"heal: distill_weight=1.5 must be"):
        heal(model, _batches(), steps=1, lr=1e-3, teacher=nn.Linear(16, 16), distill_weight=1.5)
    with pytest.raises(ValueError, match=r"logits \(32, 16\) and the teacher's \(32, 8\) differ"):
        heal(model, _batches(), steps=1, lr=1e-3, teacher=nn.Linear(16, 8))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_a_teacher_sharing_the_models_parameters_is_refused_before_anything_changes() -> None:
    # Compressed in place, the model is no teacher of itself: the KL would be 0 and nothing would heal.
    model = _compressed()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for teacher in (model, nn.Sequential(model[0], nn.Linear(8, 16))):
        for config in (None, rw.LoRAConfig(rank=2, targets=("all-linear",))):
            with pytest.raises(ValueError, match="teacher shares parameters with the model"):
                heal(model, _batches(), steps=1, lr=1e-3, teacher=teacher, config=config)
    assert isinstance(model[0], LowRankLinear)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
