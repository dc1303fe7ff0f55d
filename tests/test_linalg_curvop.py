"""The toolkit on curvop operators: dense Hessian/GGN truth, float32, block products in torch."""

import copy
import math

import numpy as np
import pytest
import torch
from linalg_cases import gauss_newton, hessian, hutchinson_std, mlp_problem
from scipy.integrate import trapezoid
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import aslinearoperator

import curvop
from curvop import (
    ProductCost,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    solve_damped,
    spectral_density,
    top_eigenvalues,
    xdiag,
    xtrace,
)

GGN_RANK = 12  # 6 samples x 2 outputs, out of n = 58


@pytest.fixture(scope="module")
def H():
    return hessian()


@pytest.fixture(scope="module")
def G():
    return gauss_newton()


@pytest.fixture(scope="module")
def dense(H, G):
    return {"H": H.to_dense(), "G": G.to_dense()}


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_hessian_extreme_eigenvalues(H, dense, which):
    eigenvalues = np.linalg.eigvalsh(dense["H"])
    expected = {
        "LA": eigenvalues[::-1][:3],
        "SA": eigenvalues[:3],
        "LM": eigenvalues[np.argsort(-np.abs(eigenvalues))][:3],
    }[which]
    values, vectors = top_eigenvalues(H, 3, which=which, return_eigenvectors=True, seed=0)
    np.testing.assert_allclose(values, expected, atol=1e-10)
    np.testing.assert_allclose(dense["H"] @ vectors, vectors * values, atol=1e-8)


def test_gauss_newton_bottom_is_its_zero_cluster(G, dense):
    assert np.linalg.matrix_rank(dense["G"]) == GGN_RANK
    for seed in range(5):
        np.testing.assert_allclose(top_eigenvalues(G, 3, which="SA", seed=seed), 0.0, atol=1e-10)


def test_float32_model_top_eigenvalue_within_1e4_of_float64_truth():
    model, loss_fn, (x, y) = mlp_problem(torch.float32)
    truth_operator = curvop.HessianOperator(
        copy.deepcopy(model).double(), loss_fn, (x.double(), y.double())
    )
    truth = np.linalg.eigvalsh(truth_operator.to_dense())[::-1][:2]
    for seed in range(3):
        values = top_eigenvalues(curvop.HessianOperator(model, loss_fn, (x, y)), 2, seed=seed)
        np.testing.assert_allclose(values, truth, rtol=1e-4)


def test_damped_solve_on_the_gauss_newton(G, dense):
    b = torch.linspace(-1, 1, G.shape[0], dtype=torch.float64)
    result = solve_damped(G, b, 1e-3, rtol=1e-10)
    assert isinstance(result.x, torch.Tensor) and result.converged
    exact = np.linalg.solve(dense["G"] + 1e-3 * np.eye(G.shape[0]), b.numpy())
    np.testing.assert_allclose(result.x.numpy(), exact, rtol=1e-5, atol=1e-5)


def test_lanczos_reproduces_the_hessian_spectrum(H, dense):
    alphas, betas = lanczos(H, H.shape[0], seed=0)
    ritz = eigh_tridiagonal(alphas, betas, eigvals_only=True)
    np.testing.assert_allclose(ritz, np.linalg.eigvalsh(dense["H"]), atol=1e-10)


def test_xtrace_and_xdiag_are_exact_on_the_gauss_newton(G, dense):
    budget = 2 * (GGN_RANK + 1)
    assert xtrace(G, budget, seed=0).value == pytest.approx(np.trace(dense["G"]), rel=1e-10)
    np.testing.assert_allclose(xdiag(G, budget, seed=0), np.diag(dense["G"]), atol=1e-12)


def test_hutchinson_trace_of_the_hessian(H, dense):
    estimate = hutchinson_trace(H, 30, seed=0)
    assert abs(estimate.value - np.trace(dense["H"])) < 4.5 * estimate.std_error


@pytest.mark.parametrize("method", ["slq", "kpm"])
@pytest.mark.parametrize("name", ["H", "G"])
def test_density_moments_match_the_dense_matrix(H, G, dense, name, method):
    A, op = dense[name], {"H": H, "G": G}[name]
    n = A.shape[0]
    result = spectral_density(op, method=method, num_probes=10, num_steps=40, seed=0)
    eigenvalues = np.linalg.eigvalsh(A)
    width = eigenvalues[-1] - eigenvalues[0]
    first = trapezoid(result.grid * result.density, result.grid)
    second = trapezoid(result.grid**2 * result.density, result.grid)
    second -= result.sigma**2 if method == "slq" else 0.0
    assert first == pytest.approx(np.trace(A) / n, abs=4 * hutchinson_std(A, 10) / n + 1e-4 * width)
    assert second == pytest.approx(
        np.sum(A**2) / n, abs=4 * hutchinson_std(A @ A, 10) / n + 1e-3 * width**2
    )


class ProductLog:
    """Records the column count of every pass over the data (the operator's product observers)
    and checks that every block arrives in torch, in the operator's dtype and on its device;
    numpy products fail."""

    def __init__(self, op, monkeypatch):
        self.columns = []
        original = op._block_product

        def block_product(V, memory_bytes):
            assert isinstance(V, torch.Tensor) and V.dim() == 2
            assert V.dtype == op.torch_dtype and V.device == op.device
            return original(V, memory_bytes)

        def no_numpy(*args):
            raise AssertionError("the numpy round trip was used")

        monkeypatch.setattr(op, "_block_product", block_product)
        monkeypatch.setattr(op, "_matvec", no_numpy)
        monkeypatch.setattr(op, "_matmat", no_numpy)
        monkeypatch.setattr(op, "product_observers", [self.columns.append])
        # costs where a wider block is always faster and fits: the widths are the algorithms'
        monkeypatch.setattr(
            op, "product_cost", lambda k, memory_bytes=None: ProductCost(1 + 0.1 * k, 2**10 * k)
        )


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (lambda op: hutchinson_trace(op, 12, seed=0), [12]),
        (lambda op: hutchinson_diagonal(op, 12, seed=0), [12]),
        (lambda op: hutchpp_trace(op, 12, seed=0), [4, 8]),
        (lambda op: xtrace(op, 12, seed=0), [6, 6]),
        (lambda op: xdiag(op, 12, seed=0), [6, 6]),
        (lambda op: lanczos(op, 7, seed=0), [1] * 7),
        (lambda op: spectral_density(op, num_probes=5, num_steps=7, seed=0), [5] * 7),
        (
            lambda op: spectral_density(op, method="kpm", num_probes=5, num_steps=9, seed=0),
            [1] * 20 + [5] * math.ceil((9 - 1) / 2),
        ),
    ],
)
def test_estimators_multiply_blocks_in_torch(H, run, expected, monkeypatch):
    log = ProductLog(H, monkeypatch)
    run(H)
    assert log.columns == expected


def test_sums_with_scipy_operators_work(G, dense):
    """A SciPy operator in a sum is multiplied through its matmat; the curvature stays torch."""
    shifted = G + aslinearoperator(np.eye(G.shape[0])) * 0.5
    values = top_eigenvalues(shifted, 2, which="SA", seed=0)
    np.testing.assert_allclose(values, [0.5, 0.5], atol=1e-10)
    estimate = xtrace(shifted, 2 * (GGN_RANK + 1) + 2, seed=0)
    assert estimate.value == pytest.approx(np.trace(dense["G"]) + 0.5 * G.shape[0], rel=0.05)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_bottom_of_a_rank_deficient_gauss_newton_costs_few_products(dtype, rtol, monkeypatch):
    """The degenerate zero cluster of a real GGN (n = 136, rank 111, smallest positive eigenvalue
    1e-4 of the norm): ARPACK with deflated searches needed 2500-5800 products in float64 and
    1200 in float32, where it also returned a positive eigenvalue for a zero. The block method
    must stay within a few hundred, multiplying blocks of k + 1 columns in torch."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4)
        ).double()
    x = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (300,), generator=generator)
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 300, 64)]
    truth = np.linalg.eigvalsh(
        curvop.GaussNewtonOperator(model, torch.nn.CrossEntropyLoss(), data).to_dense()
    )
    data = [(inputs.to(dtype), targets) for inputs, targets in data]
    G = curvop.GaussNewtonOperator(model.to(dtype), torch.nn.CrossEntropyLoss(), data)
    log = ProductLog(G, monkeypatch)
    bottom = curvop.top_eigenvalues(G, 3, which="SA", seed=0)
    np.testing.assert_allclose(bottom, truth[:3], atol=rtol * truth[-1])
    assert sum(log.columns) < 400 and set(log.columns) == {4}
