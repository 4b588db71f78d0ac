"""LoRD: weight-SVD and activation-aware factors against their closed forms, the rank rules, and a
transformers model (GPT-2's Conv1D) end to end."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from rankwise.compress import LowRankLinear, load_compressed, lord, save_compressed
from rankwise.compress.report import count_params

from _models import tiny_gpt2


def _model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def _inputs(count: int, seed: int) -> torch.Tensor:
    # Anisotropic inputs (feature scales 1 down to 0.01): the regime where activations are
    # lower-rank than weights.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 64, generator=generator) * torch.logspace(0, -2, 64)


def _relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    return (torch.linalg.norm(model(x) - reference(x)) / torch.linalg.norm(reference(x))).item()


def test_output_error_falls_as_the_rank_ratio_rises() -> None:
    x = _inputs(256, seed=5)
    errors = []
    for ratio in (0.1, 0.2, 0.3, 0.4):
        model = _model()
        lord(model, targets=("0", "2"), rank_ratio=ratio)
        errors.append(_relative_error(model, _model(), x))
    assert all(later < earlier for earlier, later in pairwise(errors)), errors


def test_weight_svd_factors_are_the_truncated_svd() -> None:
    model, reference = _model(), _model()
    report = lord(model, targets=("0",), rank_ratio=0.25)
    W = reference[0].weight.detach()
    U, S, Vh = torch.linalg.svd(W)
    truncated = (U[:, :16] * S[:16]) @ Vh[:16]
    torch.testing.assert_close(model[0].dense_weight(), truncated, rtol=0, atol=1e-5)
    assert report.layers[0].rank == 16
    assert report.layers[0].error == pytest.approx((S[16:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-4)
    torch.testing.assert_close(model[0].U.bias, reference[0].bias)
    assert report.layers[0].output_error is None


def test_activation_aware_factors_are_the_top_eigenvectors_of_the_output_moments() -> None:
    model, reference = _model(), _model()
    calibration = [_inputs(100, seed=s) for s in range(3)]
    report = lord(model, targets=("0",), rank_ratio=0.25, calibration=calibration)
    W = reference[0].weight.detach().double()
    z = torch.cat(calibration).double() @ W.T  # bias-free outputs
    eigenvalues, Q = torch.linalg.eigh(z.T @ z / len(z))
    Q_r = Q.flip(1)[:, :16]
    torch.testing.assert_close(model[0].dense_weight().double(), Q_r @ Q_r.T @ W, rtol=0, atol=1e-5)
    tail = eigenvalues.flip(0)[16:].sum() / eigenvalues.sum()
    assert report.layers[0].output_error == pytest.approx(math.sqrt(tail.item()), rel=1e-6)
    measured = torch.linalg.norm(z - z @ Q_r @ Q_r.T) / torch.linalg.norm(z)
    assert report.layers[0].output_error == pytest.approx(measured.item(), rel=1e-6)


def test_activation_aware_beats_weight_svd_on_held_out_data_at_equal_rank() -> None:
    held_out = _inputs(500, seed=99)
    weight_svd, activation = _model(), _model()
    lord(weight_svd, targets=("0", "2"), rank_ratio=0.2)
    lord(activation, targets=("0", "2"), rank_ratio=0.2, calibration=[(_inputs(200, seed=s),) for s in range(4)])
    assert [m.rank for m in (weight_svd[0], activation[0], weight_svd[2], activation[2])] == [13] * 4
    assert _relative_error(activation, _model(), held_out) < 0.5 * _relative_error(weight_svd, _model(), held_out)


def test_energy_picks_the_smallest_rank_reaching_it() -> None:
    model, reference = _model(), _model()
    report = lord(model, targets=("2",), energy=0.5)
    S = torch.linalg.svdvals(reference[2].weight.detach())
    cumulative = torch.cumsum(S.square(), 0) / S.square().sum()
    assert report.layers[0].rank == int((cumulative < 0.5).sum()) + 1


def test_layers_past_break_even_stay_full_rank() -> None:
    model = _model()
    report = lord(model, targets=("0", "2"), rank_ratio=0.5)  # r = 32 = 64·64 / 128: no saving
    assert report.layers == () and report.kept_full_rank == ("0", "2")
    assert isinstance(model[0], nn.Linear) and report.params_after == report.params_before


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="exactly one of rank_ratio, energy and params"):
        lord(_model(), rank_ratio=0.5, energy=0.9)
    with pytest.raises(ValueError, match=r"rank_ratio=0 must be in \(0, 1\]"):
        lord(_model(), rank_ratio=0)
    with pytest.raises(ValueError, match="target 'q_proj' matches no module"):
        lord(_model(), targets=("q_proj",), rank_ratio=0.2)


def _gpt2():
    pytest.importorskip("transformers")
    return tiny_gpt2(vocab_size=100, n_embd=64, n_positions=32).eval()


def test_gpt2_conv1d_layers_compress_with_calibration_and_reload(tmp_path) -> None:
    model = _gpt2()
    before = count_params(model)
    calibration = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(2)]
    report = lord(model, rank_ratio=0.25, calibration=calibration)
    # all-linear: every Conv1D (attention c_attn/c_proj, MLP c_fc/c_proj), never the tied LM head.
    assert len(report.layers) == 8 and isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert report.params_before == before and report.params_after == count_params(model)
    assert {layer.kind for layer in report.layers} == {"conv1d"}
    ids = torch.randint(0, 100, (1, 12))
    save_compressed(model, tmp_path)
    fresh = _gpt2()
    load_compressed(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_gpt2_full_rank_factors_reproduce_the_model() -> None:
    # A rank-r pair of a (out, in) Conv1D computes x W + b through the transposed layout.
    model, reference = _gpt2(), _gpt2()
    lord(model, targets=("mlp.c_fc",), rank_ratio=1 / 4)
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D 64 -> 256, rank 16
    W = reference.transformer.h[0].mlp.c_fc.weight.detach().T  # (out, in)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.dense_weight(), (U[:, :16] * S[:16]) @ Vh[:16], rtol=0, atol=1e-5)
    x = torch.randn(3, 64)
    expected = x @ ((U[:, :16] * S[:16]) @ Vh[:16]).T + reference.transformer.h[0].mlp.c_fc.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_a_calibration_is_reusable_across_rank_ratios() -> None:
    from rankwise.compress import calibrate

    batches = [_inputs(100, seed=s) for s in range(2)]
    statistics = calibrate(_model(), batches, targets=("0", "2"))
    for ratio in (0.1, 0.3):
        from_batches, from_statistics = _model(), _model()
        lord(from_batches, targets=("0", "2"), rank_ratio=ratio, calibration=batches)
        lord(from_statistics, targets=("0", "2"), rank_ratio=ratio, calibration=statistics)
        for key, value in from_batches.state_dict().items():
            assert torch.equal(from_statistics.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"the calibration has no statistics for \['2'\]"):
        lord(_model(), targets=("0", "2"), rank_ratio=0.2, calibration=calibrate(_model(), batches, targets=("0",)))
    with pytest.raises(ValueError, match=r"the calibration batches never reached \['0'\]"):
        calibrate(_model(), [], targets=("0",))
