"""Diagonal estimators (curvop.linalg.diagonal): Hutchinson's variance, XDiag's exactness and
accuracy, any budget; the arguments they check."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linalg_cases import (
    OUTLIERS,
    SMALL_OP,
    CountingOperator,
    budget_settings,
    dense_case,
    matrices,
    rotated,
    scale,
)
from scipy.sparse.linalg import aslinearoperator

from curvop import hutchinson_diagonal, xdiag
from curvop.linalg.probes import draw_probes, make_generator

SEEDS = range(10)


# ----------------------------------------------------------------- dense matrices of known spectrum
def test_hutchinson_diagonal_error_matches_its_variance():
    """Entry j has variance sum_{k != j} A_jk^2 / m."""
    op, A, _ = dense_case("indefinite")
    variance = (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / 50
    errors = [np.sum((hutchinson_diagonal(op, 50, seed=s) - np.diag(A)) ** 2) for s in SEEDS]
    assert np.mean(errors) == pytest.approx(variance, rel=0.2)


def test_hutchinson_diagonal_is_exact_on_a_diagonal_matrix():
    diagonal = np.arange(1.0, 21.0)
    estimate = hutchinson_diagonal(aslinearoperator(np.diag(diagonal)), 1, seed=0)
    np.testing.assert_allclose(estimate, diagonal, rtol=1e-14)


def test_xdiag_is_exact_on_a_low_rank_matrix():
    op, A, _ = dense_case("zero_cluster")
    estimate = xdiag(op, 2 * (len(OUTLIERS) + 1), seed=0)
    assert estimate.shape == (A.shape[0],) and estimate.dtype == np.float64
    np.testing.assert_allclose(estimate, np.diag(A), atol=1e-12 * OUTLIERS.max())


def test_xdiag_beats_hutchinson_on_a_decaying_spectrum():
    op, A, _ = dense_case("decaying")

    def error(estimator):
        return np.mean([np.linalg.norm(estimator(op, 60, seed=s) - np.diag(A)) for s in SEEDS])

    assert error(xdiag) < 0.3 * error(hutchinson_diagonal)


def test_xdiag_matches_its_leave_one_out_definition():
    n, probes = 30, 5
    A = rotated(np.random.default_rng(5).standard_normal(n), seed=6)
    omega = draw_probes(
        n, probes, generator=make_generator(2), dtype=torch.float64, device="cpu"
    ).numpy()
    Y = A @ omega
    estimates = []
    for i in range(probes):
        basis, _ = np.linalg.qr(np.delete(Y, i, axis=1))
        projector = basis @ basis.T
        rest = np.eye(n) - projector
        estimates.append(np.diag(projector @ A) + omega[:, i] * (rest @ A @ omega[:, i]))
    np.testing.assert_allclose(
        xdiag(aslinearoperator(A), 2 * probes, seed=2), np.mean(estimates, axis=0), atol=1e-12
    )


def test_diagonal_estimators_under_a_small_memory_budget():
    op, A, _ = dense_case("decaying", dtype=np.float32)
    np.testing.assert_allclose(
        hutchinson_diagonal(op, 20, seed=0, memory_gb=2 * 2 * 8 * 120 / 2**30),
        hutchinson_diagonal(op, 20, seed=0),
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        xdiag(op, 40, seed=0, memory_gb=1e-6), xdiag(op, 40, seed=0), rtol=1e-3, atol=1e-4
    )


# --------------------------------------------------------------------- any budget on any size
DIAGONAL_ESTIMATORS = {"hutchinson_diagonal": (hutchinson_diagonal, 1), "xdiag": (xdiag, 2)}


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


# --------------------------------------------------------------------- argument checks
BAD_ARGUMENTS = [
    (
        lambda: hutchinson_diagonal(SMALL_OP, -2),
        ValueError,
        "num_matvecs must be a positive integer",
    ),
    (lambda: xdiag(SMALL_OP, 1), ValueError, "num_matvecs must be at least 2 for xdiag"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_ARGUMENTS)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
