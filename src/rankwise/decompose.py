"""Matrix decompositions: each returns its factors and its relative error in a small dataclass.

The forms follow the survey Jun Lu, "Low-Rank Approximation, Adaptation, and Other Tales",
https://arxiv.org/abs/2408.05883:

* :func:`truncated_svd`: ``A ≈ U diag(S) Vh`` at a rank, an energy or a singular-value threshold
  (Eckart–Young: the best rank-k approximation in Frobenius norm).
* :func:`als`: alternating least squares ``A ≈ W Z`` with a ridge λ.
* :func:`weighted_als`: ``min Σ w_ij (a_ij − (W Z)_ij)²``; 0/1 weights are ALS with missing data.
* :func:`hadamard`: ``A ≈ (W1 Z1) ⊙ (W2 Z2)``, rank up to r1·r2 from (r1 + r2)(m + n) numbers.
* :func:`nearest_kronecker`: ``A ≈ Σ_k B_k ⊗ C_k`` by Van Loan's rearrangement.
* :func:`khatri_rao`: ``A ≈ [b_j ⊗ c_j]_j``, column by column.

Every ``error`` is relative in the Frobenius norm, ``‖A − Â‖_F / ‖A‖_F`` (weighted by ``√w`` for
the weighted fits). Computations run in the input's dtype; pass float64 for tight tolerances.

Every function refuses an input holding an inf or a NaN with ``ValueError``: such an entry runs
through every solve and comes back as NaN factors and ``error=nan``. The one exception is an entry
of ``weighted_als``'s ``A`` whose weight is 0: it is unobserved, so it may hold anything (NaN is the
usual marker of missing data) and is read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .core.checks import check_number


@dataclass(frozen=True)
class SVDResult:
    """``A ≈ U diag(S) Vh`` with U (m, k), S (k,), Vh (k, n)."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    error: float

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def reconstruct(self) -> Tensor:
        return (self.U * self.S) @ self.Vh


@dataclass(frozen=True)
class ALSResult:
    """``A ≈ W Z`` with W (m, k), Z (k, n); ``iterations`` run until the tolerance or the cap."""

    W: Tensor
    Z: Tensor
    error: float
    iterations: int

    def reconstruct(self) -> Tensor:
        return self.W @ self.Z


@dataclass(frozen=True)
class HadamardResult:
    """``A ≈ (W1 Z1) ⊙ (W2 Z2)``."""

    W1: Tensor
    Z1: Tensor
    W2: Tensor
    Z2: Tensor
    error: float
    iterations: int

    def reconstruct(self) -> Tensor:
        return (self.W1 @ self.Z1) * (self.W2 @ self.Z2)


@dataclass(frozen=True)
class KroneckerResult:
    """``A ≈ Σ_k B[k] ⊗ C[k]`` with B (terms, m1, n1), C (terms, m2, n2)."""

    B: Tensor
    C: Tensor
    error: float

    def reconstruct(self) -> Tensor:
        total = sum(torch.kron(b, c) for b, c in zip(self.B, self.C, strict=True))
        assert isinstance(total, Tensor)  # not the empty sum's 0: there is at least one term
        return total


@dataclass(frozen=True)
class KhatriRaoResult:
    """``A ≈ [b_j ⊗ c_j]_j``: column j of A is ``kron(B[:, j], C[:, j])``; B (m1, n), C (m2, n)."""

    B: Tensor
    C: Tensor
    error: float

    def reconstruct(self) -> Tensor:
        return (self.B.unsqueeze(1) * self.C.unsqueeze(0)).reshape(-1, self.B.shape[1])


def rank_for_energy(values: Tensor, energy: float) -> int:
    """The smallest k with ``Σ_{i≤k} v_i / Σ_i v_i ≥ energy``, for non-negative ``values`` sorted
    descending (squared singular values, or covariance eigenvalues).

    Raises:
        ValueError: ``values`` not 1-D or holding an inf or a NaN; ``energy`` outside (0, 1].
    """
    _check_input("rank_for_energy", "values", values, dims=1, floating=False)
    check_number("rank_for_energy", "energy", energy, 0, 1, low_open=True)
    total = values.sum()
    if total <= 0:  # a zero matrix: any rank is exact, and a layer needs at least one
        return 1
    cumulative = torch.cumsum(values, 0) / total
    # The last entry may round to just below 1; energy=1 must still select every value.
    return min(int((cumulative < energy - 1e-12).sum().item()) + 1, values.shape[0])


def truncated_svd(
    A: Tensor, *, rank: int | None = None, energy: float | None = None, threshold: float | None = None
) -> SVDResult:
    """The best approximation of ``A`` (m, n) of a given rank (Eckart–Young–Mirsky).

    Exactly one rule picks the rank: ``rank`` itself; ``energy``, the smallest k whose squared
    singular values keep that fraction of ``Σ σ_i²`` (TRP's criterion, arXiv 2004.14566);
    or ``threshold``, every ``σ_i ≥ threshold`` (TRP's final decomposition). At least one singular
    value is always kept.

    Raises:
        ValueError: ``A`` not a 2-D floating-point matrix of finite numbers; not exactly one rule,
            or its value out of range.
    """
    _check_input("truncated_svd", "A", A)
    rules = {"rank": rank, "energy": energy, "threshold": threshold}
    given = [name for name, value in rules.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"truncated_svd: give exactly one of rank, energy, threshold; got {given or 'none'}")
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if rank is not None:
        check_number("truncated_svd", "rank", rank, 1, S.shape[0], integer=True)
        k = rank
    elif energy is not None:
        k = rank_for_energy(S.square(), energy)
    else:
        check_number("truncated_svd", "threshold", threshold, 0)
        k = max(1, int((S >= threshold).sum().item()))
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    return SVDResult(U, S, Vh, _relative_error(A, (U * S) @ Vh))


def als(
    A: Tensor, rank: int, *, ridge: float = 0.0, iterations: int = 500, tol: float = 1e-10, seed: int = 0
) -> ALSResult:
    """Alternating least squares ``A ≈ W Z`` (survey §(a)): from a random W, alternate
    ``Z ← (WᵀW + λI)⁻¹ Wᵀ A`` and ``W ← A Zᵀ (Z Zᵀ + λI)⁻¹``.

    With ``ridge=0`` the fixed point is the truncated SVD's error; a ridge λ > 0 trades a little
    error for well-posed solves (and shrinks the factors).

    Args:
        rank: k, the inner dimension; 1 <= k <= min(m, n).
        ridge: λ >= 0.
        iterations: cap on the number of W/Z sweeps; >= 1.
        tol: stop when the relative error changes by less than this between sweeps.
        seed: seeds the random start, so a fit is reproducible.

    Raises:
        ValueError: ``A`` not a 2-D floating-point matrix of finite numbers, or a bad argument.
    """
    return _weighted_als("als", A, None, rank, ridge, iterations, tol, seed)


def weighted_als(
    A: Tensor,
    weights: Tensor,
    rank: int,
    *,
    ridge: float = 0.0,
    iterations: int = 500,
    tol: float = 1e-10,
    seed: int = 0,
) -> ALSResult:
    """Weighted low-rank approximation ``min Σ w_ij (a_ij − (W Z)_ij)² + λ(‖W‖² + ‖Z‖²)`` by ALS.

    Each row of W and each column of Z is its own weighted ridge regression (survey §(a), missing
    data): ``w_i = (Σ_j w_ij z_j z_jᵀ + λI)⁻¹ Σ_j w_ij a_ij z_j``. Weights of 0 and 1 mark missing
    and observed entries; all ones is plain ALS. An entry of weight 0 is never read: it may hold
    anything, NaN included, and the fit is the one with 0 stored there.

    Args:
        weights: finite and non-negative, same shape as ``A``.
        rank, ridge, iterations, tol, seed: as in :func:`als`.

    Raises:
        ValueError: ``A`` not a 2-D floating-point matrix, or an inf or NaN in ``A`` where the
            weight is not 0; a weight that is negative, inf or NaN; a bad argument; or a singular
            solve (a row or column with fewer observed entries than the rank): set ``ridge > 0``.
    """
    return _weighted_als("weighted_als", A, weights, rank, ridge, iterations, tol, seed)


def _weighted_als(
    owner: str, A: Tensor, weights: Tensor | None, rank: int, ridge: float, iterations: int, tol: float, seed: int
) -> ALSResult:
    """:func:`weighted_als` (``weights=None``: every entry observed, plain ALS), its errors naming
    ``owner``, the public function called."""
    if weights is None:
        _check_input(owner, "A", A)
        weights = torch.ones_like(A)
    else:
        if weights.shape != A.shape:
            raise ValueError(f"{owner}: weights shape {tuple(weights.shape)} must equal A's {tuple(A.shape)}")
        _check_input(owner, "weights", weights, floating=False, fix="weights must be finite and >= 0")
        if (weights < 0).any():
            raise ValueError(f"{owner}: weights must be >= 0")
        # A weight-0 entry is unobserved and may hold NaN (the usual marker of missing data); left in,
        # it would poison the fit through 0 · NaN = NaN. Zeroing it changes nothing else: it is never read.
        A = A.masked_fill(weights == 0, 0)
        _check_input(owner, "A", A, fix="give missing entries weight 0, or replace them before fitting")
    _check_fit_args(owner, A, rank, ridge, iterations)
    W, Z = _random_factors(A, rank, seed)
    target = weights * A
    previous = float("inf")
    for sweep in range(1, iterations + 1):  # noqa: B007 (returned: the number of sweeps run)
        Z = _solve_rows(weights.T, target.T, W.T, ridge).T
        W = _solve_rows(weights, target, Z, ridge)
        error = _relative_error(A, W @ Z, weights)
        if abs(previous - error) <= tol:
            break
        previous = error
    return ALSResult(W, Z, error, sweep)


def hadamard(
    A: Tensor, ranks: tuple[int, int], *, ridge: float = 0.0, iterations: int = 500, tol: float = 1e-10, seed: int = 0
) -> HadamardResult:
    """Hadamard decomposition ``A ≈ (W1 Z1) ⊙ (W2 Z2)`` (survey §(b)).

    With ``M2 = W2 Z2`` fixed, ``(W1, Z1)`` solve the weighted problem
    ``min Σ (a_ij − M2_ij (W1 Z1)_ij)²``, whose row update is
    ``w_i = (Σ_j M2_ij² z_j z_jᵀ + λI)⁻¹ Σ_j M2_ij a_ij z_j``; then the roles swap. Each update is
    an exact block minimization, so with ``ridge=0`` the error never rises.

    Args:
        ranks: (r1, r2), the inner dimensions of the two products.
        ridge: λ >= 0; the survey advises λ > 0 where the fixed product is near zero.
        iterations, tol, seed: as in :func:`als`.

    Raises:
        ValueError: ``A`` not a 2-D floating-point matrix of finite numbers, a bad argument, or a
            singular solve: set ``ridge > 0``.
    """
    _check_input("hadamard", "A", A)
    for r in ranks:
        _check_fit_args("hadamard", A, r, ridge, iterations)
    generator = torch.Generator().manual_seed(seed)
    W1, Z1 = _random_factors(A, ranks[0], generator)
    W2, Z2 = _random_factors(A, ranks[1], generator)
    previous = float("inf")
    for sweep in range(1, iterations + 1):  # noqa: B007 (returned: the number of sweeps run)
        for _ in range(2):
            fixed = W2 @ Z2
            weights, target = fixed.square(), fixed * A
            Z1 = _solve_rows(weights.T, target.T, W1.T, ridge).T
            W1 = _solve_rows(weights, target, Z1, ridge)
            W1, Z1, W2, Z2 = W2, Z2, W1, Z1
        error = _relative_error(A, (W1 @ Z1) * (W2 @ Z2))
        if abs(previous - error) <= tol:
            break
        previous = error
    return HadamardResult(W1, Z1, W2, Z2, error, sweep)


def nearest_kronecker(A: Tensor, b_shape: tuple[int, int], *, terms: int = 1) -> KroneckerResult:
    """The nearest sum of Kronecker products ``Σ_k B_k ⊗ C_k`` to ``A`` (m1·m2, n1·n2).

    Van Loan and Pitsianis, "Approximation with Kronecker Products" (1993): rearrange A so that row
    (i, j) is the flattened block ``A[i·m2:(i+1)·m2, j·n2:(j+1)·n2]``; then
    ``‖A − B ⊗ C‖_F = ‖R(A) − vec(B) vec(C)ᵀ‖_F``, so the best K terms are the top-K singular
    triplets of R(A), split as ``vec(B_k) = √σ_k u_k`` and ``vec(C_k) = √σ_k v_k``.

    Args:
        b_shape: (m1, n1); each must divide the matching dimension of A.
        terms: K, 1 <= K <= min(m1·n1, m2·n2).

    Raises:
        ValueError: ``A`` not a 2-D floating-point matrix of finite numbers, or a bad argument.
    """
    _check_input("nearest_kronecker", "A", A)
    (m, n), (m1, n1) = A.shape, b_shape
    if m1 < 1 or n1 < 1 or m % m1 or n % n1:
        raise ValueError(f"nearest_kronecker: b_shape={b_shape} must divide A's shape {(m, n)}")
    m2, n2 = m // m1, n // n1
    rearranged = A.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    check_number("nearest_kronecker", "terms", terms, 1, min(rearranged.shape), integer=True)
    svd = truncated_svd(rearranged, rank=terms)
    root = svd.S.sqrt()
    B = (svd.U * root).T.reshape(terms, m1, n1)
    C = (root[:, None] * svd.Vh).reshape(terms, m2, n2)
    # R is an isometric rearrangement of A, so the error of R's fit is the error of A's.
    return KroneckerResult(B, C, svd.error)


def khatri_rao(A: Tensor, m1: int) -> KhatriRaoResult:
    """The nearest column-wise Kronecker (Khatri–Rao) product ``[b_j ⊗ c_j]_j`` to ``A`` (m1·m2, n)
    (survey §(d)): each column, reshaped to (m1, m2), is replaced by its best rank-1 approximation.

    Args:
        m1: rows of B; must divide A's row count.

    Raises:
        ValueError: ``A`` not a 2-D floating-point matrix of finite numbers, or ``m1`` not dividing
            its row count.
    """
    _check_input("khatri_rao", "A", A)
    m, n = A.shape
    if m1 < 1 or m % m1:
        raise ValueError(f"khatri_rao: m1={m1} must divide A's {m} rows")
    blocks = A.T.reshape(n, m1, m // m1)  # (columns, m1, m2)
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
    root = S[:, 0].sqrt()
    B = (U[:, :, 0] * root[:, None]).T  # (m1, n)
    C = (Vh[:, 0, :] * root[:, None]).T  # (m2, n)
    approx = (B.unsqueeze(1) * C.unsqueeze(0)).reshape(m, n)
    return KhatriRaoResult(B, C, _relative_error(A, approx))


def _solve_rows(weights: Tensor, target: Tensor, Z: Tensor, ridge: float) -> Tensor:
    """Rows ``w_i = (Σ_j weights_ij z_j z_jᵀ + λI)⁻¹ Σ_j target_ij z_j`` for Z (k, n): (m, k)."""
    k = Z.shape[0]
    gram = torch.einsum("ij,kj,lj->ikl", weights, Z, Z)  # (m, k, k)
    gram = gram + ridge * torch.eye(k, dtype=Z.dtype, device=Z.device)
    rhs = target @ Z.T  # (m, k)
    try:
        return torch.linalg.solve(gram, rhs)
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            f"singular least-squares solve at ridge={ridge} (a row or column has fewer observed entries "
            f"than the rank {k}); set ridge > 0"
        ) from error


def _random_factors(A: Tensor, rank: int, seed: int | torch.Generator) -> tuple[Tensor, Tensor]:
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    m, n = A.shape
    W = torch.randn(m, rank, generator=generator, dtype=A.dtype).to(A.device)
    Z = torch.randn(rank, n, generator=generator, dtype=A.dtype).to(A.device)
    return W, Z


def _relative_error(A: Tensor, approx: Tensor, weights: Tensor | None = None) -> float:
    residual, reference = A - approx, A
    if weights is not None:
        root = weights.sqrt()
        residual, reference = residual * root, reference * root
    norm = torch.linalg.matrix_norm(reference)
    return float(torch.linalg.matrix_norm(residual) / norm) if norm > 0 else float(torch.linalg.matrix_norm(residual))


def _check_input(
    owner: str,
    name: str,
    tensor: Tensor,
    *,
    dims: int = 2,
    floating: bool = True,
    fix: str = "replace them (torch.nan_to_num) before decomposing",
) -> None:
    """Raise ``ValueError`` naming ``owner`` and the argument ``name`` unless ``tensor`` has ``dims``
    dimensions, a floating dtype (if ``floating``) and only finite entries: an inf or a NaN passes
    through every SVD and solve and comes back as NaN factors and ``error=nan``."""
    kind = "a 2-D matrix" if dims == 2 else f"a {dims}-D tensor"
    if tensor.dim() != dims:
        raise ValueError(f"{owner}: expected {name} to be {kind}, got shape {tuple(tensor.shape)}")
    if floating and not tensor.is_floating_point():
        raise ValueError(f"{owner}: expected {name} to be a floating-point matrix, got {tensor.dtype}")
    non_finite = ~torch.isfinite(tensor)
    if non_finite.any():
        first = tuple(non_finite.nonzero()[0].tolist())
        raise ValueError(
            f"{owner}: {name} has non-finite entries (inf or NaN): {int(non_finite.sum())}, the first at "
            f"index {first}; {fix}"
        )


def _check_fit_args(owner: str, A: Tensor, rank: int, ridge: float, iterations: int) -> None:
    check_number(owner, "rank", rank, 1, min(A.shape), integer=True)
    check_number(owner, "ridge", ridge, 0)
    check_number(owner, "iterations", iterations, 1, integer=True)
