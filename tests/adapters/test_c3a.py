"""What C3A promises beyond the contract: the block-circulant ΔW (first-row convention), PEFT's
C3A on identical weights, the gcd block-size rule and its errors, half precision through fp32 FFTs,
layers that do not interfere, its parameter formula, and that it learns."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import transformers
from torch import nn

import rankwise as rw
from rankwise.core.inject import adapted_modules

from _fit import fit


def _block_circulant(kernel: torch.Tensor, in_features: int) -> torch.Tensor:
    """ΔW from its definition: block (i, j) has row k = w_ij shifted right by k, over in."""
    q, p, b = kernel.shape
    delta = torch.zeros(q * b, p * b, dtype=kernel.dtype)
    for i in range(q):
        for j in range(p):
            for k in range(b):
                delta[i * b + k, j * b : (j + 1) * b] = torch.roll(kernel[i, j], k)
    return delta / in_features


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in adapted_modules(model):
            nn.init.normal_(layer.delta.kernel)


@pytest.mark.parametrize(("in_features", "out_features", "block_size"), [(10, 15, 5), (12, 8, 4), (6, 6, 6)])
def test_delta_weight_and_forward_are_the_block_circulant(in_features, out_features, block_size) -> None:
    config = rw.C3AConfig(block_size=block_size, targets="0")
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
    _randomize(model)
    layer = model[0]
    expected = _block_circulant(layer.delta.kernel.detach(), in_features)
    torch.testing.assert_close(layer.delta.delta_weight(), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 3, in_features)
    torch.testing.assert_close(layer.delta(x), x @ expected.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), x @ (layer.base.weight + expected).T + layer.base.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("in_features", "out_features", "block_size"), [(10, 15, 5), (24, 16, 8)])
def test_gradients_equal_the_dense_formula(in_features, out_features, block_size) -> None:
    """The written-out backward against autograd through x ΔWᵀ, odd and even block sizes."""
    torch.manual_seed(0)
    model = rw.adapt(
        nn.Sequential(nn.Linear(in_features, out_features)), rw.C3AConfig(block_size=block_size, targets="0")
    )
    _randomize(model)
    delta = model[0].delta
    kernel = delta.kernel.detach().clone().requires_grad_()
    x = torch.randn(3, 4, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(3, 4, out_features)
    delta(x).backward(grad)
    (x_ref @ _block_circulant(kernel, in_features).T).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.kernel.grad, kernel.grad, rtol=1e-5, atol=1e-6)


def test_a_single_circulant_block_can_be_full_rank() -> None:
    model = rw.adapt(nn.Sequential(nn.Linear(16, 16)), rw.C3AConfig(block_size=16, targets="0"))
    _randomize(model)
    # 16 parameters, rank 16: rank is decoupled from the parameter count (a LoRA of rank 16 needs 512).
    assert torch.linalg.matrix_rank(model[0].delta.delta_weight()).item() == 16
    assert rw.summary(model).trainable == 16


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize(
    ("build", "targets", "block_size", "make_input"),
    [
        (_tiny_bert, ["query", "value", "intermediate.dense"], 16, lambda: {"input_ids": torch.randint(0, 50, (2, 7))}),
        (
            lambda: nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16)),
            ["0", "2"],
            8,
            lambda: {"input": torch.randn(3, 5, 24)},
        ),
    ],
)
def test_equals_peft_c3a_on_identical_weights(build, targets, block_size, make_input) -> None:
    base = build()
    torch.manual_seed(1)
    reference = peft.get_peft_model(
        copy.deepcopy(base),
        peft.C3AConfig(block_size=block_size, target_modules=targets, init_weights="xavier_uniform"),
    )
    ours = rw.adapt(base, rw.C3AConfig(block_size=block_size, init="xavier_uniform", targets=tuple(targets)))
    paths = [path for path, _ in adapted_modules(ours)]
    assert len(paths) == (6 if len(targets) == 3 else 2)
    with torch.no_grad():
        for path, layer in adapted_modules(ours):
            theirs = reference.base_model.model.get_submodule(path)
            # PEFT starts at xavier_uniform, so its kernels are already non-zero and distinct per layer.
            layer.delta.kernel.copy_(theirs.c3a_kernel["default"])
            expected = theirs.get_delta_weight("default")
            torch.testing.assert_close(layer.delta.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    inputs = make_input()

    def run(model: nn.Module) -> torch.Tensor:
        out = model(**inputs) if "input_ids" in inputs else model(inputs["input"])
        return out.last_hidden_state if "input_ids" in inputs else out

    torch.testing.assert_close(run(ours), run(reference), rtol=1e-5, atol=1e-5)
    rw.merge(ours)
    reference.merge_adapter()
    torch.testing.assert_close(run(ours), run(reference), rtol=1e-5, atol=1e-5)


def test_inits() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    zeros = rw.adapt(copy.deepcopy(model), rw.C3AConfig(targets="0"))[0].delta
    assert zeros.kernel.abs().max() == 0
    xavier = rw.adapt(copy.deepcopy(model), rw.C3AConfig(block_size=4, init="xavier_uniform", targets="0"))[0].delta
    bound = math.sqrt(6 / (64 + 32))
    assert xavier.kernel.abs().max() <= bound
    assert xavier.kernel.abs().max() > 0.95 * bound  # uniform over PEFT's whole range
    x = torch.randn(3, 64)
    assert (xavier(x).abs() > 0).any()  # PEFT's init: not the base model at step 0


@pytest.mark.parametrize(
    ("in_features", "out_features", "block_size", "expected"),
    [
        (768, 768, None, 768),  # gcd 768: a single circulant, d parameters
        (768, 3072, None, 3072),
        (3072, 1024, 64, 3072 * 1024 // 64),  # Llama-3.2-3B's v_proj: 49,152 per layer
        (144, 32, None, 144 * 32 // 16),  # a 3 × 3 convolution 16 -> 32, gcd 16
    ],
)
def test_parameter_count_is_in_times_out_over_block(in_features, out_features, block_size, expected) -> None:
    config = rw.C3AConfig(block_size=block_size, targets="0")
    assert rw.C3A.num_params(in_features, out_features, config) == expected
    if in_features * out_features <= 144 * 32:
        model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
        assert rw.summary(model).trainable == expected


def test_block_size_must_divide_both_dims_and_the_error_names_layer_and_sizes() -> None:
    model = nn.Sequential(nn.Linear(768, 3072))
    message = r"c3a on '0': block_size=40 must divide in_features=768 and out_features=3072"
    with pytest.raises(ValueError, match=message):
        rw.adapt(model, rw.C3AConfig(block_size=40, targets="0"))
    with pytest.raises(ValueError, match="block_size=0"):
        rw.C3AConfig(block_size=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_the_fft_in_fp32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    reference = rw.adapt(nn.Sequential(nn.Linear(24, 36)), rw.C3AConfig(block_size=12, targets="0"))
    _randomize(reference)
    half = copy.deepcopy(reference).to(dtype)  # kernel and input in half precision: no FFT exists there
    x = torch.randn(5, 24)
    y = half(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), reference(x.to(dtype).float()), rtol=2e-2, atol=2e-2)
    # adapt() on a half-precision model keeps the kernel in fp32.
    adapted = rw.adapt(nn.Sequential(nn.Linear(24, 36)).to(dtype), rw.C3AConfig(block_size=12, targets="0"))
    assert adapted[0].delta.kernel.dtype == torch.float32
    assert adapted(x.to(dtype)).dtype == dtype


def test_adapted_layers_each_read_their_own_input() -> None:
    """PEFT's forward rebinds x to one adapter's output, so the next adapter reads it; here each
    layer's branch must see exactly that layer's input, and the input tensor is left unchanged."""
    torch.manual_seed(0)
    model = rw.adapt(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)),
        rw.C3AConfig(block_size=4, targets=("0", "1", "2")),
    )
    _randomize(model)
    x = torch.randn(3, 8)
    before = x.clone()
    h = x
    for layer in model:
        h = h @ (layer.base.weight + _block_circulant(layer.delta.kernel.detach(), 8)).T + layer.base.bias
    torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before)


def test_learns_a_block_circulant_target() -> None:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(32, 32)), rw.C3AConfig(block_size=8, targets="0"))
    target_kernel = torch.randn(4, 4, 8)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = x @ (model[0].base.weight + _block_circulant(target_kernel, 32)).T + model[0].base.bias
    losses = fit(model, x, y, lr=rw.C3AConfig.recommended_lr, steps=40, params=model[0].delta.parameters())
    assert losses[-1] < 0.01 * losses[0]
