"""lanczos (curvop.linalg.lanczos): extremes, the full spectrum without ghosts, early stopping,
any number of steps; on a curvop operator; the arguments it checks."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linalg_cases import (
    OUTLIERS,
    SMALL_N,
    SMALL_OP,
    CountingOperator,
    N,
    budget_settings,
    dense_case,
    matrices,
    rotated,
)
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import aslinearoperator

from curvop import lanczos, spectral_density


def ritz_values(alphas, betas):
    return eigh_tridiagonal(alphas, betas, eigvals_only=True)


# ----------------------------------------------------------------- dense matrices of known spectrum
def test_extremes_match_the_true_extremes():
    op, _, eigenvalues = dense_case("indefinite")
    alphas, betas = lanczos(op, 40, seed=0)
    assert alphas.shape == (40,) and betas.shape == (39,)
    ritz = ritz_values(alphas, betas)
    width = eigenvalues[-1] - eigenvalues[0]
    assert eigenvalues[0] - 1e-12 <= ritz[0] <= eigenvalues[0] + 1e-4 * width  # interlacing
    assert eigenvalues[-1] - 1e-4 * width <= ritz[-1] <= eigenvalues[-1] + 1e-12


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_n_steps_reproduce_the_whole_spectrum_without_ghosts(dtype):
    """Without reorthogonalization, converged Ritz values repeat (ghosts), worst in float32."""
    op, _, eigenvalues = dense_case("indefinite", dtype=dtype)
    alphas, betas = lanczos(op, N, seed=0)
    ritz = ritz_values(alphas, betas)
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    assert len(ritz) == N
    np.testing.assert_allclose(ritz, eigenvalues, atol=tolerance * 3)


def test_stops_early_on_an_invariant_subspace():
    op, _, _ = dense_case("zero_cluster")
    alphas, betas = lanczos(op, 50, seed=0)
    assert len(alphas) == len(OUTLIERS) + 1 and len(betas) == len(alphas) - 1
    ritz = ritz_values(alphas, betas)
    np.testing.assert_allclose(ritz, np.concatenate([[0.0], np.sort(OUTLIERS)]), atol=1e-10)


def test_an_eigenvector_start_gives_one_step():
    op, A, eigenvalues = dense_case("indefinite")
    vector = np.linalg.eigh(A)[1][:, 7]
    alphas, betas = lanczos(op, 10, v0=torch.tensor(3 * vector))
    assert len(alphas) == 1 and len(betas) == 0
    assert alphas[0] == pytest.approx(eigenvalues[7], abs=1e-12)


def test_v0_is_deterministic_and_the_first_alpha_is_its_rayleigh_quotient():
    op, A, _ = dense_case("decaying")
    v0 = np.random.default_rng(3).standard_normal(N)
    first, second = lanczos(op, 12, v0=v0), lanczos(op, 12, v0=v0)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0][0] == pytest.approx(v0 @ A @ v0 / (v0 @ v0), rel=1e-12)


def test_more_steps_than_n_stop_at_n():
    op, _, _ = dense_case("indefinite")
    alphas, _ = lanczos(op, N + 30, seed=1)
    assert len(alphas) <= N


def test_float32_lanczos_goes_on_in_a_narrow_bulk_next_to_large_outliers():
    """Outliers in [20, 100] and a bulk in [0, 0.02]: the residuals inside the bulk are real,
    far above float32 rounding; stopping at sqrt(eps) of the norm ended SLQ after 7 steps with
    2 nodes in the bulk."""
    from scipy.linalg import eigh_tridiagonal

    rng = np.random.default_rng(0)
    eigenvalues = np.concatenate([rng.uniform(20, 100, 5), rng.uniform(0, 0.02, 995)])
    A = rotated(eigenvalues).astype(np.float32)
    alphas, betas = lanczos(aslinearoperator(A), 80, seed=0)
    assert len(alphas) == 80
    nodes = eigh_tridiagonal(alphas, betas)[0]
    assert np.sum(nodes < 0.03) >= 70


def test_a_graded_spectrum_runs_to_the_end_and_gives_the_right_quadrature():
    """logspace(-12, 0, 100): every step is needed; the Gauss quadrature of log(A) with all 100
    nodes is exact."""
    from scipy.linalg import eigh_tridiagonal

    eigenvalues = np.logspace(-12, 0, 100)
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((100, 100)))
    A = (basis * eigenvalues) @ basis.T
    v0 = np.random.default_rng(1).standard_normal(100)
    alphas, betas = lanczos(aslinearoperator((A + A.T) / 2), 100, v0=v0)
    assert len(alphas) >= 95
    nodes, vectors = eigh_tridiagonal(alphas, betas)
    quadrature = float(np.sum(vectors[0] ** 2 * np.log(np.abs(nodes))))
    q = basis.T @ (v0 / np.linalg.norm(v0))
    exact = float(np.sum(q**2 * np.log(eigenvalues)))
    assert quadrature == pytest.approx(exact, abs=0.05)


# --------------------------------------------------------------------- on curvop operators
def test_lanczos_reproduces_the_hessian_spectrum(H, dense):
    alphas, betas = lanczos(H, H.shape[0], seed=0)
    ritz = eigh_tridiagonal(alphas, betas, eigvals_only=True)
    np.testing.assert_allclose(ritz, np.linalg.eigvalsh(dense["H"]), atol=1e-10)


# --------------------------------------------------------------------- any number of steps
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


# --------------------------------------------------------------------- argument checks
BAD_ARGUMENTS = [
    (lambda: lanczos(SMALL_OP, 0), ValueError, "num_steps must be a positive integer"),
    (lambda: lanczos(SMALL_OP, 3, v0=np.ones(2)), ValueError, "v0 must have shape"),
    (lambda: lanczos(SMALL_OP, 3, v0=np.zeros(SMALL_N)), ValueError, "v0 must be nonzero"),
    (
        lambda: lanczos(SMALL_OP, 3, v0=np.ones(SMALL_N), seed=0),
        ValueError,
        "give either v0 or seed",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_ARGUMENTS)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
