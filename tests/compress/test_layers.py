"""Low-rank layers: exact forward formulas, conv schemes for any stride/padding/dilation, save and
load, and adapters on a compressed model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import LowRankConv2d, LowRankLinear, load_compressed, lord, save_compressed
from rankwise.compress.layers import from_factors, scheme_matrix, svd_factors
from rankwise.compress.report import count_params
from rankwise.core import checkpoint
from rankwise.core.inject import adapted_modules

DOUBLE = torch.float64


def test_low_rank_linear_is_x_vt_ut_plus_b() -> None:
    layer = LowRankLinear(7, 5, 3)
    x = torch.randn(4, 2, 7)
    expected = (x @ layer.V.weight.T) @ layer.U.weight.T + layer.U.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.dense_weight(), layer.U.weight @ layer.V.weight)
    assert layer.rank == 3
    assert sum(p.numel() for p in layer.parameters()) == 3 * (7 + 5) + 5


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize(
    ("stride", "padding", "dilation"),
    [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2)), ((2, 3), (2, 1), (2, 1))],
)
def test_full_rank_pair_equals_the_convolution(scheme: str, stride, padding, dilation) -> None:
    conv = nn.Conv2d(4, 6, (3, 2), stride, padding, dilation).double()
    matrix = scheme_matrix(conv, "conv2d", scheme)
    left, right, error = svd_factors(matrix, min(matrix.shape), scheme)
    pair = from_factors(conv, "conv2d", scheme, left, right)
    x = torch.randn(2, 4, 11, 9, dtype=DOUBLE)
    assert error < 1e-14
    torch.testing.assert_close(pair(x), conv(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(pair.dense_weight(), conv.weight.detach(), rtol=0, atol=1e-13)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_truncated_pair_equals_the_convolution_with_the_truncated_kernel(scheme: str) -> None:
    conv = nn.Conv2d(5, 7, 3, padding=1).double()
    matrix = scheme_matrix(conv, "conv2d", scheme).detach()
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    truncated = (U[:, :2] * S[:2]) @ Vh[:2]
    pair = from_factors(conv, "conv2d", scheme, *svd_factors(matrix, 2, scheme)[:2])
    reference = nn.Conv2d(5, 7, 3, padding=1).double()
    with torch.no_grad():
        if scheme == "channel":
            reference.weight.copy_(truncated.reshape(7, 5, 3, 3))
        else:  # M[c·kh + a, n·kw + b] = W[n, c, a, b]
            reference.weight.copy_(truncated.reshape(5, 3, 7, 3).permute(2, 0, 1, 3))
        reference.bias.copy_(conv.bias)
    x = torch.randn(2, 5, 6, 6, dtype=DOUBLE)
    torch.testing.assert_close(pair(x), reference(x), rtol=0, atol=1e-12)
    expected = 2 * (5 * 3 * 3 + 7) if scheme == "channel" else 2 * (5 * 3 + 7 * 3)
    assert sum(p.numel() for p in pair.parameters()) == expected + 7


def test_low_rank_conv_rejects_an_unknown_scheme_and_a_zero_rank() -> None:
    with pytest.raises(ValueError, match="scheme='diagonal' is not allowed"):
        LowRankConv2d(3, 4, (3, 3), 2, scheme="diagonal")
    with pytest.raises(ValueError, match="rank=0 must be an integer >= 1"):
        LowRankLinear(3, 4, 0)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def test_save_and_load_a_compressed_model(tmp_path) -> None:
    model = _mlp()
    report = lord(model, targets=("0", "2"), rank_ratio=0.25)
    save_compressed(model, tmp_path)
    fresh = _mlp()
    load_compressed(fresh, tmp_path)
    assert isinstance(fresh[0], LowRankLinear) and fresh[2].rank == report.ranks()["2"] == 8
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))
    layout = json.loads((tmp_path / "compression.json").read_text())
    assert layout["layers"]["0"] == {
        "type": "LowRankLinear",
        "in_features": 16,
        "out_features": 32,
        "rank": 4,
        "bias": True,
    }


def test_an_interrupted_save_leaves_the_previous_files_intact(tmp_path, monkeypatch) -> None:
    first = _mlp()
    lord(first, targets=("0", "2"), rank_ratio=0.25)
    save_compressed(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = _mlp()
    lord(second, targets=("2",), rank_ratio=0.5)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(second, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary left either
    fresh = load_compressed(_mlp(), tmp_path)
    assert isinstance(fresh[0], LowRankLinear) and fresh[2].rank == 8


def test_load_refuses_a_model_that_does_not_fit_before_changing_it(tmp_path) -> None:
    model = _mlp()
    lord(model, targets=("2",), rank_ratio=0.25)
    save_compressed(model, tmp_path)
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 30), nn.ReLU(), nn.Linear(30, 3))
    with pytest.raises(rw.CheckpointError, match="does not fit the model's"):
        load_compressed(other, tmp_path)
    assert isinstance(other[2], nn.Linear)
    wider_head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    expected = r"mis-shaped \['4.bias: file \(3,\) vs model \(4,\)', '4.weight: file \(3, 32\) vs model \(4, 32\)'\]"
    with pytest.raises(rw.CheckpointError, match=expected):
        load_compressed(wider_head, tmp_path)
    assert isinstance(wider_head[2], nn.Linear)


def test_lora_attaches_to_the_factors_of_a_compressed_model(tmp_path) -> None:
    model = _mlp()
    lord(model, targets=("0", "2"), rank_ratio=0.25)
    x = torch.randn(5, 16)
    compressed_out = model(x)
    rw.adapt(model, rw.LoRAConfig(rank=2, targets=("U",)))
    # LoRA starts at zero: the adapted compressed model computes what the compressed one did.
    torch.testing.assert_close(model(x), compressed_out, rtol=0, atol=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * (4 + 32) + 2 * (8 + 32)  # r·(in + out) on each U (in = the LoRD rank)
    for _, layer in adapted_modules(model):
        nn.init.normal_(layer.delta.B)
    adapted_out = model(x)
    rw.save_adapter(model, tmp_path / "adapter")
    save_compressed(rw.unwrap(model, merge=False), tmp_path / "base")
    fresh = _mlp()
    load_compressed(fresh, tmp_path / "base")
    rw.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(x), adapted_out)


def test_report_counts_match_the_model() -> None:
    model = _mlp()
    before = count_params(model)
    report = lord(model, targets=("0", "2"), rank_ratio=0.25)
    assert report.params_before == before
    assert report.params_after == count_params(model)
    assert before - report.params_after == sum(r.params_before - r.params_after for r in report.layers)
    assert [(r.rank, r.params_after) for r in report.layers] == [(4, 4 * 48 + 32), (8, 8 * 64 + 32)]
    assert report.flop_reduction == pytest.approx((16 * 32 + 32 * 32) / (4 * 48 + 8 * 64))
    assert "model: " in str(report)


def test_unsupported_layers_raise_type_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="'1' is a LayerNorm"):
        lord(model, targets=("1",), rank_ratio=0.5)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(TypeError, match="groups=2 is not supported"):
        rw.compress.TRP(grouped, targets=("0",))


def test_decisions_are_unchanged_under_a_one_process_group(tmp_path) -> None:
    # Exercises the broadcast and all-reduce paths (rank 0's decisions, summed calibration moments).
    import torch.distributed as dist

    x = torch.randn(40, 16)
    torch.manual_seed(3)
    expected = _mlp()
    lord(expected, targets=("0", "2"), rank_ratio=0.25, calibration=[x])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(3)
        model = _mlp()
        lord(model, targets=("0", "2"), rank_ratio=0.25, calibration=[x])
        cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
        trp = rw.compress.TRP(cnn, energy=0.5, period=1)
        trp.truncate(0)
        assert trp.convert().ranks() == trp.ranks
        cuttlefish = rw.compress.Cuttlefish(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 16, 3)), window=1)
        assert cuttlefish.epoch_start() is None and cuttlefish.stable == {"1": False}
    finally:
        dist.destroy_process_group()
    assert torch.equal(model(x), expected(x))
