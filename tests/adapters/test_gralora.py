"""What GraLoRA promises beyond the contract: PEFT's outputs on identical weights (plain and hybrid),
ΔW as the k × k block formula, 2-D/3-D/4-D inputs, LoRA's parameter count at rank up to k·r, shape
checks that name the layer, and that it learns."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.core.inject import adapted_modules

from _fit import fit


def _randomize(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            for p in layer.delta.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("hybrid_rank", [0, 4])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_equals_peft_on_identical_weights(hybrid_rank: int, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Sequential(nn.Linear(24, 36), nn.GELU(), nn.Linear(36, 12))
    else:  # GPT-2 layout: Conv1D(nf=out, nx=in)
        base = nn.Sequential(Conv1D(36, 24), nn.GELU(), Conv1D(12, 36))
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.GraloraConfig(
            r=6,
            alpha=10,
            gralora_k=3,
            hybrid_r=hybrid_rank,
            target_modules=["0", "2"],
            init_weights=False,
            fan_in_fan_out=kind == "conv1d",
        ),
    )
    ours = rw.adapt(base, rw.GraLoRAConfig(rank=6, alpha=10.0, k=3, hybrid_rank=hybrid_rank, targets=("0", "2")))
    with torch.no_grad():
        for path, layer in adapted_modules(ours):
            theirs = reference.base_model.model.get_submodule(path)
            layer.delta.A.copy_(theirs.gralora_A["default"])
            layer.delta.B.copy_(theirs.gralora_B["default"])
            if hybrid_rank:
                layer.delta.hybrid_A.copy_(theirs.gralora_A_general["default"].weight)
                layer.delta.hybrid_B.copy_(theirs.gralora_B_general["default"].weight)
            delta_weight = theirs.get_delta_weight("default")
            expected = delta_weight.T if kind == "conv1d" else delta_weight
            torch.testing.assert_close(layer.delta.delta_weight(), expected, rtol=1e-5, atol=1e-5)
    for shape in [(5, 24), (2, 5, 24)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hybrid_rank", [0, 2])
def test_delta_weight_is_the_block_formula(hybrid_rank: int) -> None:
    torch.manual_seed(0)
    config = rw.GraLoRAConfig(rank=4, alpha=3.0, k=2, hybrid_rank=hybrid_rank, targets="0")
    model = rw.adapt(nn.Sequential(nn.Linear(12, 8)), config)
    _randomize(model)
    delta = model[0].delta
    k, c, s = 2, 2, 3.0 / (4 + hybrid_rank)  # k, r/k, α / (r + r_h)
    i, o = 12 // k, 8 // k
    expected = torch.zeros(8, 12)
    for j in range(k):  # output block
        for n in range(k):  # input block
            A_jn = delta.A[n][:, j * c : (j + 1) * c].T  # (r/k, in/k): block (j, n)'s down-projection
            B_jn = delta.B[j][n * c : (n + 1) * c, :].T  # (out/k, r/k): its up-projection
            expected[j * o : (j + 1) * o, n * i : (n + 1) * i] = s * B_jn @ A_jn
    if hybrid_rank:
        expected += s * delta.hybrid_B @ delta.hybrid_A
    torch.testing.assert_close(delta.delta_weight(), expected.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 16), (3, 4, 16), (2, 3, 5, 16)])
@pytest.mark.parametrize("hybrid_rank", [0, 2])
def test_forward_and_add_to_on_2d_3d_4d_and_strided_inputs(shape: tuple[int, ...], hybrid_rank: int) -> None:
    torch.manual_seed(0)
    config = rw.GraLoRAConfig(rank=4, k=4, hybrid_rank=hybrid_rank, targets="0")
    model = rw.adapt(nn.Sequential(nn.Linear(16, 20)), config)
    _randomize(model)
    delta = model[0].delta
    x = torch.randn(*shape)
    expected = x @ delta.delta_weight().T
    torch.testing.assert_close(delta(x), expected, rtol=1e-5, atol=1e-5)
    y = torch.randn(*shape[:-1], 20)
    torch.testing.assert_close(delta.add_to(y, x), y + expected, rtol=1e-5, atol=1e-5)
    strided = torch.randn(*shape[:-1], 32)[..., ::2]  # features with stride 2
    torch.testing.assert_close(delta(strided), strided @ delta.delta_weight().T, rtol=1e-5, atol=1e-5)


def test_total_rank_reaches_k_times_rank() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(16, 16)), rw.GraLoRAConfig(rank=4, k=2, targets="0"))
    _randomize(model)
    assert torch.linalg.matrix_rank(model[0].delta.delta_weight()).item() == 8  # LoRA at r = 4: 4


@pytest.mark.parametrize(
    ("in_features", "out_features", "hybrid_rank", "expected"),
    [(768, 768, 0, 49152), (768, 3072, 0, 122880), (768, 768, 8, 61440)],
)
def test_parameter_count_is_lora_at_the_total_rank(
    in_features: int, out_features: int, hybrid_rank: int, expected: int
) -> None:
    config = rw.GraLoRAConfig(hybrid_rank=hybrid_rank)  # r = 32, k = 2
    assert rw.GraLoRA.num_params(in_features, out_features, config) == expected
    lora = rw.LoRAConfig(rank=32 + hybrid_rank)
    assert expected == (32 + hybrid_rank) * (in_features + out_features)
    assert expected == rw.LoRA.num_params(in_features, out_features, lora)


def test_shapes_that_k_does_not_divide_raise_naming_the_layer() -> None:
    with pytest.raises(ValueError, match=r"gralora on '1'.*k=4 must divide in_features=6"):
        rw.adapt(nn.Sequential(nn.Linear(8, 8), nn.Linear(6, 8)), rw.GraLoRAConfig(rank=4, k=4, targets=("0", "1")))
    with pytest.raises(ValueError, match=r"rank=6 must be divisible by k=4"):
        rw.GraLoRAConfig(rank=6, k=4)


@pytest.mark.parametrize("hybrid_rank", [0, 2])
def test_gradients_equal_the_dense_formula(hybrid_rank: int) -> None:
    """The hand-written backward of the block product against autograd through x ΔWᵀ."""
    model = rw.adapt(
        nn.Sequential(nn.Linear(24, 36)), rw.GraLoRAConfig(rank=6, k=3, hybrid_rank=hybrid_rank, targets="0")
    )
    _randomize(model)
    delta = model[0].delta
    reference = copy.deepcopy(delta)
    x = torch.randn(2, 5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 5, 36)
    delta(x).backward(grad)
    (x_ref @ reference.delta_weight().T).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(delta.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hybrid_rank", [0, 2])
def test_learns_a_block_update(hybrid_rank: int) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    update = torch.zeros(16, 16)
    update[:8, 8:] = torch.randn(8, 1) @ torch.randn(1, 8)  # one off-diagonal block of rank 1
    update[8:, :8] = torch.randn(8, 1) @ torch.randn(1, 8)
    x = torch.randn(64, 16)
    target = base(x).detach() + x @ update.T
    model = rw.adapt(base, rw.GraLoRAConfig(rank=4, alpha=4.0, k=2, hybrid_rank=hybrid_rank, targets="0"))
    losses = fit(model, x, target, lr=0.05)
    assert losses[-1] < 0.02 * losses[0]
