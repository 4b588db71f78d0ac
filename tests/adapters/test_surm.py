"""What SURM promises beyond the contract: ΔW equal to dense matrices built here from their
definitions (first-column circulant, skew-circulant, symmetric Toeplitz, Kronecker), on square, odd
and non-square layers; the skew-circulant against its ω-FFT closed form; the adapter form
against its dense formula; the parameter formulas; fp32 FFTs under half precision; and learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.adapters.surm import _fast_size

from _fit import fit

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr")


def _circulant(c: torch.Tensor) -> torch.Tensor:
    n = len(c)
    return torch.stack([torch.stack([c[(i - j) % n] for j in range(n)]) for i in range(n)])


def _skew_circulant(h: torch.Tensor) -> torch.Tensor:
    n = len(h)
    return torch.stack([torch.stack([h[i - j] if i >= j else -h[n + i - j] for j in range(n)]) for i in range(n)])


def _toeplitz(v: torch.Tensor) -> torch.Tensor:
    n = len(v)
    return torch.stack([torch.stack([v[abs(i - j)] for j in range(n)]) for i in range(n)])


def _kron(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    (p, q), (s, t) = b.shape, a.shape  # (b ⊗ a)[p·s + k, q·t + l] = b[p, q] a[k, l]
    return torch.einsum("pq,kl->pkql", b, a).reshape(p * s, q * t)


def _expected_delta(delta: nn.Module, config: rw.SURMConfig) -> torch.Tensor:
    """ΔW from the definitions, with the layer's block cropped from the n × n matrix on non-square layers."""
    a, b = delta.a.detach(), delta.b.detach()
    out_features, in_features = delta.out_features, delta.in_features
    if config.structure == "kronecker":
        return config.alpha / config.kron_factor * _kron(b, a)
    if config.structure == "circulant":
        full = _circulant(b * a)
    elif config.structure == "toeplitz":
        full = _toeplitz(b) @ _toeplitz(a)
    else:
        full = sum(_circulant(b[i]) @ _skew_circulant(a[i]) for i in range(config.displacement_rank))
    return config.alpha * full[:out_features, :in_features]


def _adapted(in_features: int, out_features: int, config: rw.AdapterConfig) -> nn.Module:
    torch.manual_seed(0)
    model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
    with torch.no_grad():
        for p in model[0].delta.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize(
    ("structure", "in_features", "out_features"),
    [
        (structure, *shape)
        for structure in STRUCTURES
        for shape in [(8, 8), (7, 7), (6, 10), (10, 6)]
        if structure != "kronecker" or shape != (7, 7)  # f = 2 must divide both dimensions
    ],
)
def test_delta_weight_and_forward_equal_the_dense_matrix(structure, in_features, out_features) -> None:
    config = rw.SURMConfig(structure=structure, alpha=0.7, displacement_rank=2, kron_factor=2, targets="0")
    model = _adapted(in_features, out_features, config)
    layer = model[0]
    expected = _expected_delta(layer.delta, config)
    torch.testing.assert_close(layer.delta.delta_weight(), expected, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 3, in_features)
    torch.testing.assert_close(layer.delta(x), x @ expected.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), x @ (layer.base.weight + expected).T + layer.base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("structure", "in_features", "out_features"),
    [(structure, *shape) for structure in ("circulant", "toeplitz", "ldr") for shape in [(8, 8), (7, 7), (6, 10)]],
)
def test_gradients_equal_the_dense_formula(structure, in_features, out_features) -> None:
    """The written-out FFT backward against autograd through x ΔWᵀ (ΔW from delta_weight)."""
    config = rw.SURMConfig(structure=structure, alpha=0.7, displacement_rank=2, targets="0")
    delta = _adapted(in_features, out_features, config)[0].delta
    reference = copy.deepcopy(delta)
    x = torch.randn(4, 3, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(4, 3, out_features)
    delta(x).backward(grad)
    (x_ref @ reference.delta_weight().T).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(delta.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)


def test_non_square_circulant_is_a_general_rectangular_toeplitz() -> None:
    model = _adapted(4, 6, rw.SURMConfig(targets="0"))
    delta = model[0].delta
    v = (delta.b * delta.a).detach()  # n = 4 + 6 − 1 = 9 free diagonals
    assert v.shape == (9,)
    first_column, first_row = v[:6], torch.cat([v[:1], v[1:].flip(0)[:3]])
    expected = torch.stack(
        [torch.stack([first_column[i - j] if i >= j else first_row[j - i] for j in range(4)]) for i in range(6)]
    )
    torch.testing.assert_close(delta.delta_weight(), expected, rtol=0, atol=0)


def test_ldr_forward_equals_the_omega_fft_skew_product() -> None:
    """S(h) x = Re(ω⁻¹ ⊙ ifft(fft(ω ⊙ h) ⊙ fft(ω ⊙ x))), ω_k = exp(iπk/n): the skew-circulant's closed form."""
    n = 9
    model = _adapted(n, n, rw.SURMConfig(structure="ldr", displacement_rank=3, targets="0"))
    delta = model[0].delta
    x = torch.randn(5, n, dtype=torch.float64)
    omega = torch.exp(1j * math.pi * torch.arange(n, dtype=torch.float64) / n)
    expected = torch.zeros(5, n, dtype=torch.float64)
    for a, b in zip(delta.a.detach().double(), delta.b.detach().double(), strict=True):
        skew = (torch.fft.ifft(torch.fft.fft(omega * a) * torch.fft.fft(omega * x)) / omega).real
        expected += skew @ _circulant(b).T
    torch.testing.assert_close(delta(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_every_structure_is_the_base_model_at_init() -> None:
    x = torch.randn(3, 12)
    for structure in STRUCTURES:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 8))
        expected = base(x)
        config = rw.SURMConfig(structure=structure, kron_factor=4, displacement_rank=2, targets=("0", "2"))
        torch.testing.assert_close(rw.adapt(base, config)(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config", "in_features", "out_features", "expected"),
    [
        (rw.SURMConfig(), 768, 768, 2 * 768),
        (rw.SURMConfig(), 768, 3072, 2 * (768 + 3072 - 1)),
        (rw.SURMConfig(structure="toeplitz"), 768, 768, 2 * 768),
        (rw.SURMConfig(structure="ldr", displacement_rank=3), 768, 768, 2 * 3 * 768),
        (rw.SURMConfig(structure="ldr", displacement_rank=2), 12, 8, 2 * 2 * 19),
        (rw.SURMConfig(structure="kronecker"), 768, 3072, 768 + 3072),
        (rw.SURMConfig(structure="kronecker", kron_factor=4), 12, 8, 12 + 8),
        (rw.SURMAdapterConfig(), 768, 768, 3 * 768),
        (rw.SURMAdapterConfig(), 768, 3072, 3 * 3072),  # the adapter acts on the output width
        (rw.SURMAdapterConfig(structure="toeplitz"), 16, 12, 3 * 12),
        (rw.SURMAdapterConfig(structure="kronecker"), 768, 768, 16 * 16 + (768 // 16) ** 2 + 768),
        (rw.SURMAdapterConfig(structure="kronecker", kron_factor=4), 16, 12, 16 + 9 + 12),
    ],
)
def test_parameter_count_is_the_formula(config, in_features, out_features, expected) -> None:
    method = rw.core.registry.for_config(config).module_class
    assert method.num_params(in_features, out_features, config) == expected
    if in_features * out_features <= 16 * 12:
        config = type(config)(**{**config.to_dict(), "targets": ("0",)})
        model = rw.adapt(nn.Sequential(nn.Linear(in_features, out_features)), config)
        assert rw.summary(model).trainable == expected


def test_kron_factor_must_divide_both_dims() -> None:
    with pytest.raises(ValueError, match=r"surm on '0': kron_factor=16 must divide in_features=24 and out_features=32"):
        rw.adapt(nn.Sequential(nn.Linear(24, 32)), rw.SURMConfig(structure="kronecker", targets="0"))
    config = rw.SURMAdapterConfig(structure="kronecker", kron_factor=5, targets="0")
    with pytest.raises(ValueError, match=r"surm_adapter on '0': kron_factor=5 must divide the layer's out_features=32"):
        rw.adapt(nn.Sequential(nn.Linear(24, 32)), config)


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "kronecker"])
def test_adapter_equals_its_dense_formula_and_has_no_merge(structure: str) -> None:
    config = rw.SURMAdapterConfig(structure=structure, kron_factor=2, targets="0")
    model = _adapted(10, 6, config)
    delta = model[0].delta
    a, b = delta.a.detach(), delta.b.detach()
    m = {"circulant": lambda: _circulant(b * a), "toeplitz": lambda: _toeplitz(b * a), "kronecker": lambda: _kron(b, a)}
    x = torch.randn(4, 10)
    h = model[0].base(x)
    expected = h + F.gelu(h @ m[structure]().T) + delta.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="no merged form"):
        rw.merge(model)


@pytest.mark.parametrize("structure", ["circulant", "toeplitz"])
def test_adapter_gradients_equal_its_dense_formula(structure: str) -> None:
    model = _adapted(10, 6, rw.SURMAdapterConfig(structure=structure, targets="0"))
    delta = model[0].delta
    a = delta.a.detach().clone().requires_grad_()
    b = delta.b.detach().clone().requires_grad_()
    h = model[0].base(torch.randn(4, 10)).detach()
    matrix = {"circulant": _circulant, "toeplitz": _toeplitz}[structure]
    delta(h).square().sum().backward()
    (h + F.gelu(h @ matrix(b * a).T) + delta.bias.detach()).square().sum().backward()
    torch.testing.assert_close(delta.a.grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(delta.b.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_the_fft_in_fp32(structure: str, dtype: torch.dtype) -> None:
    reference = _adapted(12, 20, rw.SURMConfig(structure=structure, kron_factor=4, targets="0"))
    half = copy.deepcopy(reference).to(dtype)  # parameters and input in half precision
    x = torch.randn(5, 12).to(dtype)
    y = half(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), reference(x.float()), rtol=3e-2, atol=3e-1)


# The bilinear forms (T(b) T(a), Σ C(b_i) S(a_i)) are non-convex in (a, b): on this toy problem
# Toeplitz stalls near 10% of the start loss (a local minimum; other seeds land between 0% and 17%).
@pytest.mark.parametrize(
    ("config", "lr", "bound"),
    [
        (rw.SURMConfig(structure="circulant"), 1e-2, 0.01),
        (rw.SURMConfig(structure="toeplitz"), 3e-2, 0.2),
        (rw.SURMConfig(structure="kronecker", kron_factor=4), 3e-2, 0.01),
        (rw.SURMConfig(structure="ldr", displacement_rank=2), 3e-2, 0.1),
        (rw.SURMAdapterConfig(structure="circulant"), 3e-2, 0.01),
        (rw.SURMAdapterConfig(structure="toeplitz"), 3e-2, 0.01),
        (rw.SURMAdapterConfig(structure="kronecker", kron_factor=4), 3e-2, 0.01),
    ],
)
def test_learns_a_target_of_its_own_structure(config: rw.AdapterConfig, lr: float, bound: float) -> None:
    """Train from the zero-ΔW init towards a teacher with random parameters of the same structure."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    config = type(config)(**{**config.to_dict(), "targets": ("0",)})
    teacher = rw.adapt(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in teacher[0].delta.parameters():
            p.normal_(std=0.3)
    model = rw.adapt(base, config)
    x = torch.randn(256, 16)
    y = teacher(x).detach()
    losses = fit(model, x, y, lr=lr, steps=80, params=model[0].delta.parameters())
    assert losses[-1] < bound * losses[0]


def test_fast_size_is_the_smallest_5_smooth_size_at_least_m() -> None:
    smooth = sorted(2**i * 3**j * 5**k for i in range(14) for j in range(9) for k in range(7))
    for m in range(1, 5001):
        assert _fast_size(m) == next(s for s in smooth if s >= m), m
