"""Cuttlefish: the stable rank, the detector on a designed rank series, the switch at the scaled
stable ranks against an SVD computed here, Frobenius decay's closed-form gradient, the kept layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rankwise.compress import Cuttlefish, LowRankConv2d, stable_rank
from rankwise.compress.report import count_params

from _tiny_cnn import TinyCNN, batches


def _with_singular_values(values: list[float], shape: tuple[int, ...]) -> torch.Tensor:
    n = shape[0]
    m = math.prod(shape[1:])
    U, _ = torch.linalg.qr(torch.randn(n, len(values)))
    V, _ = torch.linalg.qr(torch.randn(m, len(values)))
    return ((U * torch.tensor(values)) @ V.T).reshape(shape)


@pytest.mark.parametrize(
    ("values", "expected"), [([3.0, 2.0, 1.0], 1), ([2.0, 2.0, 1.0], 2), ([1.0] * 5, 5), ([1.0] * 4 + [0.5], 4)]
)
def test_stable_rank_is_the_floored_energy_over_the_top_value(values: list[float], expected: int) -> None:
    # (9 + 4 + 1) / 9 = 1.56; (4 + 4 + 1) / 4 = 2.25; 5 / 1 exactly; 4.25.
    assert stable_rank(_with_singular_values(values, (6, 7))) == expected


def _set_stable_rank(conv: nn.Conv2d, srank: int) -> None:
    # σ_1 = 1 and the remaining energy srank − 0.5 spread over 20 smaller values: ⌊srank + 0.5⌋ = srank.
    rest = math.sqrt((srank - 0.5) / 20)
    with torch.no_grad():
        conv.weight.copy_(_with_singular_values([1.0] + [rest] * 20, tuple(conv.weight.shape)))


def _add_spike(conv: nn.Conv2d, size: float = 3.0) -> None:
    """Add a dominant rank-1 direction, as training does, so the stable rank drops well below full."""
    n = conv.weight.shape[0]
    with torch.no_grad():
        u, v = torch.randn(n, 1), torch.randn(1, conv.weight[0].numel())
        spike = size * torch.linalg.matrix_norm(conv.weight.flatten(1), 2) * (u / u.norm()) @ (v / v.norm())
        conv.weight.add_(spike.reshape(conv.weight.shape))


def _series_detector(series: list[int], window: int, average: int, tolerance: float, relax: tuple = ()) -> list[bool]:
    """Feed a designed stable-rank series to one layer; return whether it is stable after each epoch."""
    model = TinyCNN()
    cf = Cuttlefish(model, targets=("conv3",), window=window, average=average, tolerance=tolerance, relax=relax)
    flags = []
    for srank in series:
        _set_stable_rank(model.conv3, srank)
        assert cf.epoch_start() is None
        assert cf.history["conv3"][-1] == srank
        flags.append(cf.stable["conv3"])
    return flags


def test_detector_compares_the_mean_ema_slope_with_the_tolerance() -> None:
    # window 2: EMA weight 2/3, so [10, 7, 4] -> EMA [10, 8, 16/3]; np.gradient -> [-2, -7/3, -8/3];
    # the mean of the last two |slopes| is 2.5. Epoch 2 is the first with epoch >= window.
    assert _series_detector([10, 7, 4], window=2, average=2, tolerance=2.5) == [False, False, True]
    assert _series_detector([10, 7, 4], window=2, average=2, tolerance=2.49) == [False, False, False]
    # relax: with one layer unstable the tolerance is multiplied (0.5 × 5 = 2.5).
    assert _series_detector([10, 7, 4], window=2, average=2, tolerance=0.5, relax=((1, 5.0),))[-1] is True


def test_switch_factorizes_at_the_scaled_stable_ranks_one_epoch_after_all_are_stable() -> None:
    model = TinyCNN()
    initial = {name: model.get_submodule(name).weight.detach().clone() for name in ("conv1", "conv2", "conv3")}
    cf = Cuttlefish(model, window=2, average=2, tolerance=100.0)
    # ξ is fixed from the initial weights; then conv2 and conv3 turn low-rank, as training makes
    # them, while conv1 stays near full rank, past break-even (r ≥ 16·72/88): it is kept.
    _add_spike(model.conv2)
    _add_spike(model.conv3)
    optimizer = torch.optim.SGD(cf.param_groups(1e-4), lr=0.05, momentum=0.9)
    data = batches(3)
    report, snapshot, epoch = None, None, 0
    while report is None:
        snapshot = copy.deepcopy(model)
        report = cf.epoch_start()
        if report is None:
            for x, y in data:
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
            epoch += 1
    assert epoch == 3  # stable at epoch 2 (the first with epoch >= window), switched at epoch 3
    x = batches(1, seed=9)[0][0]
    assert report.kept_full_rank == ("conv1",) and isinstance(model.conv1, nn.Conv2d)
    for name, weight in initial.items():
        if name == "conv1":
            continue
        matrix0 = weight.reshape(weight.shape[0], -1)
        full = min(matrix0.shape)
        scale = full / int(torch.linalg.svdvals(matrix0).square().sum() / torch.linalg.svdvals(matrix0)[0] ** 2)
        conv = snapshot.get_submodule(name)
        matrix = conv.weight.detach().reshape(conv.weight.shape[0], -1)
        S = torch.linalg.svdvals(matrix)
        rank = min(full, math.ceil(int(S.square().sum() / S[0] ** 2) * scale))
        assert report.ranks()[name] == rank
        assert isinstance(model.get_submodule(name), LowRankConv2d) and model.get_submodule(name).rank == rank
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        with torch.no_grad():
            conv.weight.copy_(((U[:, :rank] * S[:rank]) @ Vh[:rank]).reshape(conv.weight.shape))
    torch.testing.assert_close(model(x), snapshot(x), rtol=0, atol=1e-5)
    assert report.params_after == count_params(model)
    assert cf.epoch_start() is None  # one switch only


def test_frobenius_decay_adds_the_closed_form_gradient() -> None:
    model = TinyCNN()
    cf = Cuttlefish(model, targets=("conv2",), frobenius_decay=0.1)
    cf.apply_frobenius_decay()  # before the switch: nothing to decay
    assert model.conv2.weight.grad is None
    _add_spike(model.conv2)
    cf.factorize()
    layer = model.conv2
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    grad_u, grad_v = layer.U.weight.grad.clone(), layer.V.weight.grad.clone()
    cf.apply_frobenius_decay()
    U, V = layer.U.weight.detach().flatten(1), layer.V.weight.detach().flatten(1)  # (N, r), (r, C·kh·kw)
    torch.testing.assert_close(layer.U.weight.grad, grad_u + 0.1 * ((U @ V) @ V.T).reshape(grad_u.shape))
    torch.testing.assert_close(layer.V.weight.grad, grad_v + 0.1 * (U.T @ (U @ V)).reshape(grad_v.shape))


def test_param_groups_exempt_factors_and_one_dimensional_parameters() -> None:
    model = TinyCNN()
    cf = Cuttlefish(model, targets=("conv2",))
    _add_spike(model.conv2)
    cf.factorize()
    decayed, free = cf.param_groups(1e-4)
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    free_ids = {id(p) for p in free["params"]}
    assert id(model.conv2.U.weight) in free_ids and id(model.conv2.V.weight) in free_ids
    assert id(model.conv2.U.bias) in free_ids and id(model.conv1.weight) not in free_ids
    without_fd = Cuttlefish(TinyCNN(), targets=("conv2",), frobenius_decay=0.0)
    _add_spike(without_fd.model.conv2)
    without_fd.factorize()
    assert id(without_fd.model.conv2.U.weight) in {id(p) for p in without_fd.param_groups(1e-4)[0]["params"]}


def test_the_stem_shortcut_head_and_leading_layers_stay_full_rank() -> None:
    model = TinyCNN()
    cf = Cuttlefish(model, keep_leading=1)
    assert [path for path, _, _ in cf.layers] == ["conv2", "conv3"]
    _add_spike(model.conv1)  # low-rank, yet kept: it is a leading layer
    _add_spike(model.conv2)
    _add_spike(model.conv3)
    assert cf.factorize().ranks().keys() == {"conv2", "conv3"}
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.stem, nn.Conv2d)
    assert isinstance(model.shortcut, nn.Conv2d) and isinstance(model.head, nn.Linear)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="window=0 must be an integer >= 1"):
        Cuttlefish(TinyCNN(), window=0)
    with pytest.raises(ValueError, match="no layer to factorize"):
        Cuttlefish(TinyCNN(), keep_leading=3)
