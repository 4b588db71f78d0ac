"""GoRA: the rank rule by hand, ΔW_0 against a dense reference from independently computed
gradients, a first step that points downhill (and the official sign's that does not), the budget
and the checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.allocate.gora import allocate_ranks


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, generator=generator)
    batches = []
    for _ in range(4):
        x = torch.randn(16, 8, generator=generator)
        batches.append((x, torch.tanh(x @ w)))
    return batches


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _adapted(rank: int = 4) -> nn.Module:
    return rw.adapt(_base(), rw.GoRAConfig(rank=rank, targets=("0", "2", "4")))


def _mean_loss(model: nn.Module) -> float:
    with torch.no_grad():
        return sum(_loss(model, b).item() for b in _batches()) / len(_batches())


def test_rank_rule_by_hand() -> None:
    # a = (0.25, 0.75); budget 100: ⌊round(25)/10⌋ = 2, ⌊round(75)/20⌋ = ⌊3.75⌋ = 3.
    assert allocate_ranks([1.0, 3.0], [10, 20], 100, 1, [8, 8]) == [2, 3]
    assert allocate_ranks([1.0, 3.0], [10, 20], 100, 3, [8, 8]) == [3, 3]  # r_min lifts the first
    assert allocate_ranks([1.0, 3.0], [10, 20], 100, 1, [8, 2]) == [2, 2]  # the cap wins
    with pytest.raises(ValueError, match="importance is 0"):
        allocate_ranks([0.0, 0.0], [10, 20], 100, 1, [8, 8])


def test_initial_update_is_a_projected_descent_step() -> None:
    plain = _base()
    weights = [plain[i].weight for i in (0, 2, 4)]
    gradients = [torch.zeros_like(w) for w in weights]
    for batch in _batches():  # G = (1/n) Σ ∂L/∂W, from plain autograd on the unadapted model
        for total, g in zip(gradients, torch.autograd.grad(_loss(plain, batch), weights), strict=True):
            total.add_(g / len(_batches()))
    model = _adapted()
    result = rw.allocate.gora(model, _batches(), loss_fn=_loss, step_size=0.05)
    importance = [(w * g).abs().mean().item() for w, g in zip(weights, gradients, strict=True)]
    assert list(result.importance.values()) == pytest.approx([i / sum(importance) for i in importance], rel=1e-5)
    for (path, rank), gradient in zip(result.ranks.items(), gradients, strict=True):
        delta = model.get_submodule(path).delta
        A = delta.A.detach().double()
        projector = A.T @ torch.linalg.inv(A @ A.T) @ A
        expected = -0.05 * math.sqrt(delta.in_features / rank) * gradient.double() @ projector
        assert delta.A.shape[0] == rank
        torch.testing.assert_close(delta.delta_weight().double(), expected, rtol=1e-4, atol=1e-7)


def test_first_step_points_downhill_and_the_official_sign_uphill() -> None:
    before = _mean_loss(_base())
    descent, ascent = _adapted(), _adapted()
    rw.allocate.gora(descent, _batches(), loss_fn=_loss, step_size=0.02)
    rw.allocate.gora(ascent, _batches(), loss_fn=_loss, step_size=0.02, sign=1)
    assert _mean_loss(descent) < before < _mean_loss(ascent)


def test_ranks_follow_importance_within_the_budget() -> None:
    model = _adapted(rank=4)
    result = rw.allocate.gora(model, _batches(), loss_fn=_loss, r_min=1, r_max=16)
    sizes = {"0": 24, "2": 32, "4": 20}
    assert result.budget == 4 * (24 + 32 + 20)  # uniform LoRA at r_ref = 4
    assert result.params == sum(result.ranks[p] * s for p, s in sizes.items()) <= result.budget
    order = sorted(result.ranks, key=lambda p: result.importance[p] / sizes[p])
    assert [result.ranks[p] for p in order] == sorted(result.ranks.values())  # more importance, more rank
    assert len(set(result.ranks.values())) > 1
    assert rw.summary(model).trainable == result.params
    with pytest.warns(UserWarning, match="over the budget"):
        rw.allocate.gora(_adapted(rank=4), _batches(), loss_fn=_loss, budget=100, r_min=2)


def test_collection_leaves_flags_and_weights_as_they_were() -> None:
    model = _adapted()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    flags = {name: p.requires_grad for name, p in model.named_parameters() if ".adapters." not in name}
    rw.allocate.gora(model, _batches(), loss_fn=_loss)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {name: p.requires_grad for name, p in model.named_parameters() if ".adapters." not in name} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if ".delta." in name)


def test_checkpoint_reloads_the_ranks(tmp_path) -> None:
    model = _adapted()
    result = rw.allocate.gora(model, _batches(), loss_fn=_loss)
    rw.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "gora"
    assert {p: e["config"].get("rank", 4) for p, e in meta["modules"].items()} == result.ranks
    loaded = rw.load_adapter(_base(), tmp_path)
    x = _batches()[0][0]
    assert torch.equal(loaded(x), model(x))


def test_misuse_raises() -> None:
    with pytest.raises(TypeError, match="LoRA factors"):
        rw.allocate.gora(rw.adapt(_base(), rw.AdaLoRAConfig(targets="0")), _batches(), loss_fn=_loss)
    embedding = rw.adapt(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4)), rw.LoRAConfig(targets=("0", "1")))
    with pytest.raises(TypeError, match=r"gora: '0' is a Embedding; GoRA starts only \['conv1d', 'conv2d', 'linear'\]"):
        rw.allocate.gora(embedding, [torch.tensor([1, 2])], loss_fn=lambda m, ids: m(ids).sum())
    trained = _adapted()
    with torch.no_grad():
        trained[0].delta.B.fill_(0.1)
    with pytest.raises(ValueError, match="freshly adapted"):
        rw.allocate.gora(trained, _batches(), loss_fn=_loss)
    with pytest.raises(ValueError, match="batches is empty"):
        rw.allocate.gora(_adapted(), [], loss_fn=_loss)
    with pytest.raises(TypeError, match="need a loss_fn"):
        rw.allocate.gora(_adapted(), _batches())
    with pytest.raises(ValueError, match="sign"):
        rw.allocate.gora(_adapted(), _batches(), loss_fn=_loss, sign=0)
    with pytest.raises(ValueError, match="r_max"):
        rw.allocate.gora(_adapted(), _batches(), loss_fn=_loss, r_min=4, r_max=2)
