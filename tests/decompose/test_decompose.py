"""Decompositions against exact answers: known-rank and known-structure matrices are recovered."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
import torch

from rankwise import decompose

DOUBLE = torch.float64


def _matrix(m: int, n: int, singular_values: list[float]) -> torch.Tensor:
    """A matrix with exactly the given singular values (random orthonormal factors)."""
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=DOUBLE))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=DOUBLE))
    return (U * torch.tensor(singular_values, dtype=DOUBLE)) @ V.T


def test_truncated_svd_recovers_a_known_rank_matrix() -> None:
    A = torch.randn(12, 3, dtype=DOUBLE) @ torch.randn(3, 10, dtype=DOUBLE)
    result = decompose.truncated_svd(A, rank=3)
    assert result.rank == 3
    assert result.error < 1e-13
    torch.testing.assert_close(result.reconstruct(), A, rtol=0, atol=1e-12)


def test_truncated_svd_error_is_the_eckart_young_tail() -> None:
    A = _matrix(9, 7, [5.0, 4.0, 3.0, 2.0, 1.0])
    result = decompose.truncated_svd(A, rank=2)
    assert result.error == pytest.approx(((9 + 4 + 1) / 55) ** 0.5, rel=1e-12)


@pytest.mark.parametrize(("energy", "rank"), [(0.45, 1), (0.5, 2), (41 / 55, 2), (0.75, 3), (0.99, 5), (1.0, 5)])
def test_energy_rule_counts_squared_singular_values(energy: float, rank: int) -> None:
    # σ² = 25, 16, 9, 4, 1 (sum 55): cumulative energy 25/55, 41/55, 50/55, 54/55, 1.
    A = _matrix(9, 7, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert decompose.truncated_svd(A, energy=energy).rank == rank


def test_threshold_rule_keeps_values_at_or_above_it() -> None:
    A = _matrix(9, 7, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert decompose.truncated_svd(A, threshold=2.5).rank == 3


def test_truncated_svd_needs_exactly_one_rule() -> None:
    A = torch.randn(4, 4, dtype=DOUBLE)
    with pytest.raises(ValueError, match="exactly one of rank, energy, threshold"):
        decompose.truncated_svd(A, rank=2, energy=0.9)
    with pytest.raises(ValueError, match=r"rank=5 must be an integer in \[1, 4\]"):
        decompose.truncated_svd(A, rank=5)
    with pytest.raises(ValueError, match=r"energy=1.5 must be in \(0, 1\]"):
        decompose.truncated_svd(A, energy=1.5)


def test_als_recovers_a_known_rank_matrix() -> None:
    A = torch.randn(15, 4, dtype=DOUBLE) @ torch.randn(4, 11, dtype=DOUBLE)
    result = decompose.als(A, 4, seed=3)
    assert result.error < 1e-10
    torch.testing.assert_close(result.reconstruct(), A, rtol=0, atol=1e-9)


def test_weighted_als_with_unit_weights_reaches_the_svd_error() -> None:
    # A clear gap after σ_4 makes ALS converge fast to the Eckart-Young optimum.
    A = _matrix(20, 15, [10.0, 8.0, 6.0, 5.0, 1.0, 0.5, 0.25])
    svd_error = decompose.truncated_svd(A, rank=4).error
    result = decompose.weighted_als(A, torch.ones_like(A), 4, seed=1)
    assert result.error == pytest.approx(svd_error, rel=1e-8)
    assert decompose.als(A, 4, seed=1).error == pytest.approx(svd_error, rel=1e-8)


def test_weighted_als_fills_missing_entries_of_a_low_rank_matrix() -> None:
    A = torch.randn(30, 2, dtype=DOUBLE) @ torch.randn(2, 25, dtype=DOUBLE)
    observed = (torch.rand(30, 25) < 0.6).to(DOUBLE)
    result = decompose.weighted_als(A, observed, 2, iterations=400, tol=0)
    assert result.error < 1e-8  # on the observed entries
    # A rank-2 matrix seen on 60% of its entries is determined by them: the hidden ones come back.
    torch.testing.assert_close(result.reconstruct(), A, rtol=0, atol=1e-5)


def test_weighted_als_explains_a_singular_solve() -> None:
    A = torch.randn(6, 5, dtype=DOUBLE)
    weights = torch.ones_like(A)
    weights[0] = 0  # row 0 has no observed entry: its least-squares problem is singular
    with pytest.raises(ValueError, match="set ridge > 0"):
        decompose.weighted_als(A, weights, 2)
    assert decompose.weighted_als(A, weights, 2, ridge=1e-3).W[0].abs().max() == 0


def test_ridge_shrinks_the_factors() -> None:
    A = torch.randn(10, 8, dtype=DOUBLE)
    plain = decompose.als(A, 3)
    ridged = decompose.als(A, 3, ridge=5.0)
    assert ridged.error > plain.error
    assert torch.linalg.norm(ridged.reconstruct()) < torch.linalg.norm(plain.reconstruct())


def test_nearest_kronecker_reproduces_a_kronecker_product() -> None:
    B, C = torch.randn(3, 4, dtype=DOUBLE), torch.randn(5, 2, dtype=DOUBLE)
    A = torch.kron(B, C)
    result = decompose.nearest_kronecker(A, (3, 4))
    assert result.error < 1e-14
    torch.testing.assert_close(torch.kron(result.B[0], result.C[0]), A, rtol=0, atol=1e-13)
    # The factors are unique up to a scalar c: B̂ = c B, Ĉ = C / c.
    scale = result.B[0] / B
    torch.testing.assert_close(scale, torch.full_like(scale, scale[0, 0].item()))


def test_nearest_kronecker_sum_of_two_terms_is_exact_for_two_terms() -> None:
    A = sum(torch.kron(torch.randn(2, 3, dtype=DOUBLE), torch.randn(4, 4, dtype=DOUBLE)) for _ in range(2))
    assert decompose.nearest_kronecker(A, (2, 3), terms=1).error > 0.01
    two = decompose.nearest_kronecker(A, (2, 3), terms=2)
    assert two.error < 1e-14
    torch.testing.assert_close(two.reconstruct(), A, rtol=0, atol=1e-13)


def test_nearest_kronecker_error_is_the_rearranged_svd_tail() -> None:
    A = torch.randn(6, 6, dtype=DOUBLE)
    result = decompose.nearest_kronecker(A, (2, 3))
    direct = torch.linalg.norm(A - result.reconstruct()) / torch.linalg.norm(A)
    assert result.error == pytest.approx(direct.item(), rel=1e-12)


def test_nearest_kronecker_rejects_a_non_dividing_shape() -> None:
    with pytest.raises(ValueError, match=r"b_shape=\(4, 2\) must divide"):
        decompose.nearest_kronecker(torch.randn(6, 6), (4, 2))


def test_khatri_rao_recovers_a_column_wise_kronecker_product() -> None:
    B, C = torch.randn(3, 7, dtype=DOUBLE), torch.randn(4, 7, dtype=DOUBLE)
    A = torch.stack([torch.kron(B[:, j], C[:, j]) for j in range(7)], dim=1)
    result = decompose.khatri_rao(A, 3)
    assert result.error < 1e-14
    torch.testing.assert_close(result.reconstruct(), A, rtol=0, atol=1e-13)


def test_hadamard_recovers_a_rank_one_product() -> None:
    A = (torch.randn(8, 1, dtype=DOUBLE) @ torch.randn(1, 6, dtype=DOUBLE)) * (
        torch.randn(8, 1, dtype=DOUBLE) @ torch.randn(1, 6, dtype=DOUBLE)
    )
    result = decompose.hadamard(A, (1, 1), seed=5)
    assert result.error < 1e-12
    torch.testing.assert_close(result.reconstruct(), A, rtol=0, atol=1e-11)


def test_hadamard_error_never_rises() -> None:
    # Each half-step is an exact least-squares minimization, so the error is monotone.
    A = torch.randn(10, 8, dtype=DOUBLE)
    errors = [decompose.hadamard(A, (2, 2), iterations=i, tol=0, seed=2).error for i in (1, 2, 5, 20, 60)]
    assert all(later <= earlier + 1e-12 for earlier, later in pairwise(errors))
    assert errors[-1] < errors[0]


def test_decompositions_reject_non_matrices() -> None:
    with pytest.raises(ValueError, match=r"truncated_svd: expected A to be a 2-D matrix, got shape \(2, 3, 4\)"):
        decompose.truncated_svd(torch.randn(2, 3, 4), rank=1)


# Each public function on a tensor with two bad entries, at (1, 2) and (3, 0) of a 6×4 matrix.
_REFUSING: dict[str, Callable[[torch.Tensor], Any]] = {
    "truncated_svd": lambda A: decompose.truncated_svd(A, rank=2),
    "als": lambda A: decompose.als(A, 2),
    "weighted_als": lambda A: decompose.weighted_als(A, torch.ones_like(A), 2),
    "hadamard": lambda A: decompose.hadamard(A, (1, 1), iterations=5),
    "nearest_kronecker": lambda A: decompose.nearest_kronecker(A, (2, 2)),
    "khatri_rao": lambda A: decompose.khatri_rao(A, 2),
}


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("name", list(_REFUSING))
def test_decompositions_refuse_a_non_finite_matrix(name: str, bad: float) -> None:
    # An inf or NaN would come back as NaN factors and error=nan; the call must refuse instead.
    A = torch.randn(6, 4, dtype=DOUBLE)
    A[1, 2], A[3, 0] = bad, -bad
    before = A.clone()
    fix = "give missing entries weight 0" if name == "weighted_als" else r"replace them \(torch.nan_to_num\)"
    message = rf"{name}: A has non-finite entries \(inf or NaN\): 2, the first at index \(1, 2\); {fix}"
    with pytest.raises(ValueError, match=message):
        _REFUSING[name](A)
    torch.testing.assert_close(A, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_rank_for_energy_refuses_non_finite_values(bad: float) -> None:
    values = torch.tensor([4.0, bad, 1.0, bad], dtype=DOUBLE)
    message = r"rank_for_energy: values has non-finite entries \(inf or NaN\): 2, the first at index \(1,\)"
    with pytest.raises(ValueError, match=message):
        decompose.rank_for_energy(values, 0.9)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_weighted_als_refuses_a_non_finite_weight(bad: float) -> None:
    A = torch.randn(6, 4, dtype=DOUBLE)
    weights = torch.ones_like(A)
    weights[2, 1] = bad
    before = weights.clone()
    message = (
        r"weighted_als: weights has non-finite entries \(inf or NaN\): 1, the first at index \(2, 1\); "
        r"weights must be finite and >= 0"
    )
    with pytest.raises(ValueError, match=message):
        decompose.weighted_als(A, weights, 2)
    torch.testing.assert_close(weights, before, rtol=0, atol=0, equal_nan=True)


def test_weighted_als_reads_nan_at_a_zero_weight_as_missing() -> None:
    # NaN marks missing data; with weight 0 the entry is unobserved, so the fit is the one with 0 there.
    A = torch.randn(8, 6, dtype=DOUBLE)
    weights = torch.ones_like(A)
    weights[[0, 3, 5], [1, 4, 2]] = 0
    zeros, nans = A.clone(), A.clone()
    zeros[weights == 0], nans[weights == 0] = 0.0, float("nan")
    with_zeros = decompose.weighted_als(zeros, weights, 2, seed=4)
    with_nans = decompose.weighted_als(nans, weights, 2, seed=4)
    assert torch.equal(with_nans.W, with_zeros.W)
    assert torch.equal(with_nans.Z, with_zeros.Z)
    assert with_nans.error == with_zeros.error
    assert with_nans.iterations == with_zeros.iterations
    assert 0 < with_nans.error < 1  # a real fit, not NaN
    assert torch.isnan(nans[weights == 0]).all()  # the caller's matrix is not modified
