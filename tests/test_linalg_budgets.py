"""Any budget on any size: no estimator crashes, overspends or wastes products, and a budget of
``n`` products or more buys the exact answer (the identity's columns span the space)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_cases import rotated
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator

from curvop import (
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
    xdiag,
    xtrace,
)
from curvop.linalg import estimation as estimation_module

budget_settings = settings(max_examples=25, deadline=None)


class CountingOperator(LinearOperator):
    """A dense matrix that counts the columns it multiplies."""

    def __init__(self, A: np.ndarray):
        super().__init__(A.dtype, A.shape)
        self.A, self.products = A, 0

    def _matmat(self, X):
        self.products += X.shape[1]
        return self.A @ X

    def _matvec(self, x):
        self.products += 1
        return self.A @ x


@st.composite
def matrices(draw, max_size: int = 100) -> np.ndarray:
    """Symmetric ``n x n``, ``1 <= n <= max_size``, of any rank: diagonal (axis-aligned range, the
    hard case for Rademacher sketches) or randomly rotated."""
    n = draw(st.integers(1, max_size))
    rank = draw(st.integers(0, n))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    eigenvalues = np.concatenate([rng.standard_normal(rank), np.zeros(n - rank)])
    return np.diag(eigenvalues) if draw(st.booleans()) else rotated(eigenvalues, seed=rank)


def scale(A: np.ndarray) -> float:
    return float(np.abs(A).sum()) + 1e-300


# name -> (estimator, smallest budget on a large matrix)
TRACE_ESTIMATORS = {
    "hutchinson_rademacher": (hutchinson_trace, 1),
    "hutchinson_gaussian": (
        lambda op, m, seed: hutchinson_trace(op, m, distribution="gaussian", seed=seed),
        1,
    ),
    "hutchinson_sparse_rademacher": (
        lambda op, m, seed: hutchinson_trace(op, m, distribution="sparse_rademacher", seed=seed),
        1,
    ),
    "hutchpp_trace": (hutchpp_trace, 3),
    "xtrace": (xtrace, 2),
}
DIAGONAL_ESTIMATORS = {"hutchinson_diagonal": (hutchinson_diagonal, 1), "xdiag": (xdiag, 2)}


@budget_settings
@given(
    A=matrices(),
    name=st.sampled_from(sorted(TRACE_ESTIMATORS)),
    budget_fraction=st.floats(0, 3.2),
    seed=st.integers(0, 2**16),
)
def test_trace_estimators_take_any_budget(A, name, budget_fraction, seed):
    estimator, minimum = TRACE_ESTIMATORS[name]
    n = len(A)
    budget = max(min(minimum, n), round(budget_fraction * n))
    op = CountingOperator(A)
    estimate = estimator(op, budget, seed=seed)
    assert op.products == estimate.num_matvecs <= budget
    if budget >= n:
        assert estimate.num_matvecs == n and estimate.std_error == 0.0
        assert estimate.value == pytest.approx(np.trace(A), abs=1e-12 * scale(A))
    else:
        assert np.isfinite(estimate.value)


@budget_settings
@given(
    A=matrices(),
    name=st.sampled_from(sorted(DIAGONAL_ESTIMATORS)),
    budget_fraction=st.floats(0, 3.2),
    seed=st.integers(0, 2**16),
)
def test_diagonal_estimators_take_any_budget(A, name, budget_fraction, seed):
    estimator, minimum = DIAGONAL_ESTIMATORS[name]
    n = len(A)
    budget = max(min(minimum, n), round(budget_fraction * n))
    op = CountingOperator(A)
    estimate = estimator(op, budget, seed=seed)
    assert isinstance(estimate, np.ndarray) and estimate.shape == (n,)
    assert estimate.dtype == np.float64 and np.all(np.isfinite(estimate))
    assert op.products <= budget
    if budget >= n:
        assert op.products == n
        np.testing.assert_allclose(estimate, np.diag(A), rtol=0, atol=1e-12 * scale(A))


@budget_settings
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_xtrace_is_exact_below_the_sketch_rank(data, seed):
    """With s = budget // 2 Gaussian probes and rank(A) < s - 1, every leave-two-out sketch spans
    the range of A: exact value, zero standard error, s + rank products."""
    A = data.draw(matrices(max_size=60))
    n = len(A)
    rank = int(np.linalg.matrix_rank(A))
    if 2 * (rank + 2) >= n:  # the budget would already buy the exact answer
        return
    budget = data.draw(st.integers(2 * (rank + 2), n - 1))
    op = CountingOperator(A)
    estimate = xtrace(op, budget, seed=seed)
    assert estimate.value == pytest.approx(np.trace(A), abs=1e-9 * scale(A))
    assert estimate.std_error <= 1e-9 * scale(A)
    assert op.products == estimate.num_matvecs == budget // 2 + rank


@budget_settings
@given(A=matrices(max_size=40), step_fraction=st.floats(0, 3.2), seed=st.integers(0, 2**16))
def test_lanczos_and_density_take_any_number_of_steps(A, step_fraction, seed):
    """At most n Lanczos steps, one product each; from n steps on, the extreme Ritz values are
    the extreme eigenvalues."""
    n = len(A)
    num_steps = max(1, round(step_fraction * n))
    eigenvalues = np.linalg.eigvalsh(A)
    tolerance = 1e-8 * (np.abs(eigenvalues).max() + 1e-300)
    op = CountingOperator(A)
    alphas, betas = lanczos(op, num_steps, seed=seed)
    assert len(alphas) == op.products <= min(num_steps, n) and len(betas) == len(alphas) - 1
    ritz = eigh_tridiagonal(alphas, betas, eigvals_only=True)
    assert eigenvalues[0] - tolerance <= ritz.min() and ritz.max() <= eigenvalues[-1] + tolerance
    if num_steps >= n:
        assert ritz.min() == pytest.approx(eigenvalues[0], abs=tolerance)
        assert ritz.max() == pytest.approx(eigenvalues[-1], abs=tolerance)
    for method in ("slq", "kpm"):
        op = CountingOperator(A)
        result = spectral_density(op, method=method, num_probes=3, num_steps=num_steps, seed=seed)
        assert np.all(np.isfinite(result.density)) and np.all(result.density >= 0)
        if method == "slq":
            assert op.products <= 3 * min(num_steps, n)


@pytest.mark.parametrize(("n", "budget"), [(4, 15), (73, 300)])
def test_hutchpp_with_a_sketch_wider_than_the_matrix(n, budget):
    """The reported crash: num_matvecs // 3 > n raised a RuntimeError in the sketch."""
    A = rotated(np.arange(1.0, n + 1), seed=n)
    op = CountingOperator(A)
    estimate = hutchpp_trace(op, budget, seed=0)
    assert estimate.value == pytest.approx(np.trace(A), rel=1e-12)
    assert estimate.std_error == 0.0 and estimate.num_matvecs == op.products == n


def test_exact_answers_multiply_the_identity_in_bounded_blocks(monkeypatch):
    """Identity columns go in blocks of at most IDENTITY_BLOCK_ELEMENTS / n columns."""
    monkeypatch.setattr(estimation_module, "IDENTITY_BLOCK_ELEMENTS", 100)
    A = rotated(np.linspace(-1.0, 2.0, 30), seed=3)
    widths = []

    class Logging(CountingOperator):
        def _matmat(self, X):
            widths.append(X.shape[1])
            return super()._matmat(X)

    np.testing.assert_allclose(xdiag(Logging(A), 30, seed=0), np.diag(A), rtol=0, atol=1e-14)
    assert widths == [3] * 10


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda op: hutchpp_trace(op, 1), "num_matvecs must be at least 2 for hutchpp_trace"),
        (lambda op: xtrace(op, 0), "num_matvecs must be a positive integer"),
    ],
)
def test_a_matrix_smaller_than_the_minimum_budget_lowers_it_to_n(call, match):
    op = CountingOperator(np.eye(2))
    with pytest.raises(ValueError, match=match):
        call(op)
    assert op.products == 0
