"""top_eigenvalues (curvop.linalg.eigen): against dense matrices of known spectrum, on curvop
operators (float32 ones included), and the arguments it checks."""

import copy

import numpy as np
import pytest
import torch
from conftest import by_operator, split_batches
from linalg_cases import (
    GGN_RANK,
    OUTLIERS,
    SMALL_N,
    SMALL_OP,
    SPECTRA,
    N,
    ProductLog,
    dense_case,
    mlp_problem,
    rotated,
)
from scipy.sparse.linalg import LinearOperator, aslinearoperator, eigsh
from torch import nn

import curvop
from curvop import (
    BlockOperator,
    ConvergenceWarning,
    GaussNewtonOperator,
    HessianOperator,
    ProductCost,
    count_products,
    top_eigenvalues,
)
from curvop.linalg.eigen import _basis_size
from curvop.linalg.workspace import Workspace


def expected(eigenvalues: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        return np.sort(eigenvalues)[::-1][:k]
    if which == "SA":
        return np.sort(eigenvalues)[:k]
    return eigenvalues[np.argsort(-np.abs(eigenvalues), kind="stable")][:k]


def counting_operator(A: np.ndarray) -> tuple[LinearOperator, list[int]]:
    """``A`` as a ``LinearOperator`` that logs the column count of every product."""
    columns = []

    def matmat(X: np.ndarray) -> np.ndarray:
        columns.append(1 if X.ndim == 1 else X.shape[1])
        return A @ X

    return LinearOperator(A.shape, matvec=matmat, matmat=matmat, dtype=A.dtype), columns


# ----------------------------------------------------------------- dense matrices of known spectrum
CASES = [(name, which) for name in SPECTRA for which in ("LA", "LM", "SA")]
CASES.remove(("decaying", "SA"))  # a graded cluster at the wanted end: see the test below


@pytest.mark.parametrize(("name", "which"), CASES)
@pytest.mark.parametrize("k", [1, 4])
def test_eigenpairs_match_the_known_spectrum(name, which, k):
    op, A, eigenvalues = dense_case(name)
    scale = np.abs(eigenvalues).max()
    values, vectors = top_eigenvalues(op, k, which=which, return_eigenvectors=True, seed=0)
    np.testing.assert_allclose(values, expected(eigenvalues, k, which), atol=1e-10 * scale)
    assert vectors.shape == (N, k)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-8)
    residuals = np.linalg.norm(A @ vectors - vectors * values, axis=0)
    assert residuals.max() <= 1e-8 * scale


@pytest.mark.parametrize("k", [1, 3])
def test_smallest_of_a_zero_cluster_never_fails(k):
    """Plain eigsh(which="SA") raises ArpackNoConvergence for some starts here."""
    op, A, _ = dense_case("zero_cluster")
    for seed in range(30):
        values, vectors = top_eigenvalues(op, k, which="SA", return_eigenvectors=True, seed=seed)
        np.testing.assert_allclose(values, 0.0, atol=1e-10 * OUTLIERS.max())
        assert np.linalg.norm(A @ vectors, axis=0).max() <= 1e-8 * OUTLIERS.max()


def test_multiple_eigenvalues_come_back_with_their_multiplicity():
    """One Krylov space sees a single vector per distinct eigenvalue; deflation finds the rest."""
    op, _, _ = dense_case("zero_cluster")
    values, vectors = top_eigenvalues(op, 10, which="SA", return_eigenvectors=True, seed=0)
    np.testing.assert_allclose(values, 0.0, atol=1e-10 * OUTLIERS.max())
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(10), atol=1e-6)


@pytest.mark.parametrize(("sign", "which"), [(1.0, "SA"), (-1.0, "LA")])
def test_degenerate_wanted_end_takes_few_products(sign, which):
    """A GGN-like bottom (negated: top): a 100-fold zero next to tiny graded eigenvalues, n = 150.
    ARPACK (with deflated searches for "SA") took 40000-80000 products here; blocks take 56."""
    eigenvalues = np.concatenate([np.zeros(100), np.geomspace(1e-6, 1.0, 50)])
    A = sign * rotated(eigenvalues)
    op, columns = counting_operator(A)
    values, vectors = top_eigenvalues(op, 3, which=which, return_eigenvectors=True, seed=0)
    assert sum(columns) <= 300
    np.testing.assert_allclose(values, 0.0, atol=1e-8)  # ||A|| = 1
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-8)
    assert np.linalg.norm(A @ vectors, axis=0).max() <= 1e-8


@pytest.mark.parametrize(
    ("name", "which", "k"),
    [("indefinite", "LA", 4), ("zero_cluster", "SA", 4), ("indefinite", "LM", 10)],
)
def test_thick_restarts_keep_the_wanted_pairs(name, which, k):
    """A small basis (ncv = k + 1, raised to 4 (k + 1) < n) is restarted many times on the way;
    "LM" needs the spare Ritz vectors not to settle on -2 instead of the tenth largest, 2.62."""
    op, A, eigenvalues = dense_case(name)
    scale = np.abs(eigenvalues).max()
    values, vectors = top_eigenvalues(
        op, k, which=which, return_eigenvectors=True, seed=0, ncv=k + 1
    )
    np.testing.assert_allclose(values, expected(eigenvalues, k, which), atol=1e-10 * scale)
    assert np.linalg.norm(A @ vectors - vectors * values, axis=0).max() <= 1e-8 * scale


def test_all_but_one_eigenvalue_of_a_zero_cluster():
    """k = n - 1: the block keeps k + 1 columns, so no invariant subspace can hide a zero."""
    op, _, eigenvalues = dense_case("zero_cluster")
    values = top_eigenvalues(op, N - 1, which="SA", seed=0)
    np.testing.assert_allclose(values, eigenvalues[:-1], atol=1e-10 * OUTLIERS.max())


def test_graded_bottom_end_is_found_to_tol_times_the_norm():
    """Eigenvalues 1e-9 apart near zero, in a spectrum of width 1: a Krylov method resolves them
    only to its tolerance, relative to the norm (tol=0 would exhaust ARPACK's iterations)."""
    op, _, eigenvalues = dense_case("decaying")
    tol = 1e-6
    values = top_eigenvalues(op, 4, which="SA", tol=tol, seed=0)
    assert np.all(np.diff(values) >= 0)
    np.testing.assert_allclose(values, eigenvalues[:4], atol=5 * tol * eigenvalues.max())


def test_largest_past_the_rank_returns_the_outliers_then_zeros():
    op, _, _ = dense_case("zero_cluster")
    values = top_eigenvalues(op, 10, seed=1)
    np.testing.assert_allclose(values, np.concatenate([OUTLIERS, [0.0, 0.0]]), atol=1e-10 * 10)


def test_float32_operator_meets_1e4_relative_on_the_top_eigenvalue():
    op, _, eigenvalues = dense_case("decaying", dtype=np.float32)
    values = top_eigenvalues(op, 3, seed=0)
    np.testing.assert_allclose(values, eigenvalues[::-1][:3], rtol=1e-4)


def test_zero_operator_has_zero_eigenvalues():
    values = top_eigenvalues(aslinearoperator(np.zeros((20, 20))), 2, which="SA", seed=0)
    np.testing.assert_array_equal(values, [0.0, 0.0])


def test_same_seed_same_result():
    op, _, _ = dense_case("indefinite")
    first = top_eigenvalues(op, 3, which="LM", return_eigenvectors=True, seed=5)
    second = top_eigenvalues(op, 3, which="LM", return_eigenvectors=True, seed=5)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ block width and basis size
def timed_hessian(seconds_per_column: dict[int, float]):
    """The Hessian of the MLP whose measured costs are ``seconds_per_column`` (a column in a block
    of ``k``: ``seconds_per_column[k]``), logging the width of every product."""
    from linalg_cases import hessian

    op = hessian()
    widths = []
    op.product_observers.append(widths.append)
    op.product_cost = lambda k, memory_bytes=None: ProductCost(k * seconds_per_column[k], 2**20)
    return op, widths


def dense_top(op, k):
    return np.sort(np.linalg.eigvalsh(op.to_dense()))[::-1][:k]


def test_blocks_are_kept_where_they_pay():
    op, widths = timed_hessian({1: 1.0, 4: 0.3})  # a column in a block of 4: 0.3 of one alone
    truth = dense_top(op, 3)
    widths.clear()
    values = top_eigenvalues(op, 3, seed=0)
    np.testing.assert_allclose(values, truth, rtol=1e-10)
    assert widths[0] == 4 and set(widths) <= {4, 3, 2, 1}  # blocks (the last may be narrower)


def test_a_single_vector_runs_where_blocks_do_not_pay():
    op, widths = timed_hessian({1: 1.0, 4: 0.95})  # a transformer: blocks save nothing
    truth = dense_top(op, 3)
    widths.clear()
    values = top_eigenvalues(op, 3, seed=0)
    np.testing.assert_allclose(values, truth, rtol=1e-10)
    assert set(widths) == {1}  # decided from the costs: no product spent on deciding


def test_cheap_operators_keep_blocks_so_that_reruns_take_the_same_path():
    op, widths = timed_hessian({1: 0.001, 4: 0.00095})  # 1 ms a column: noise-sized timings
    top_eigenvalues(op, 3, seed=0)
    assert widths[0] == 4


def test_smallest_eigenvalues_keep_blocks_whatever_they_cost():
    op, widths = timed_hessian({1: 1.0, 4: 0.95})
    top_eigenvalues(op, 3, which="SA", seed=0)
    assert widths[0] == 4


def test_an_operator_measures_its_costs_once_and_then_always_takes_the_same_path():
    """The block width follows the operator's measured costs, which are measured on the first
    call and kept: every later call on the operator takes the same path, without measuring."""
    from linalg_cases import hessian

    op = hessian()
    widths = []
    op.product_observers.append(widths.append)
    first = top_eigenvalues(op, 3, seed=0)
    measured = op.kernel_measurements
    first_widths, widths[:] = widths[:], []
    second = top_eigenvalues(op, 3, seed=0)
    assert op.kernel_measurements == measured
    assert widths == first_widths
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("block_size", [1, 4])
def test_block_size_can_be_forced(block_size):
    op, A, eigenvalues = dense_case("indefinite")
    counted, columns = counting_operator(A)
    values = top_eigenvalues(counted, 3, seed=0, block_size=block_size)
    np.testing.assert_allclose(values, expected(eigenvalues, 3, "LA"), atol=1e-10 * 3)
    assert max(columns) == block_size


class Sized(BlockOperator):
    """A float32 operator of size ``n`` that is never multiplied: a model's size, for sizing."""

    def __init__(self, n: int):
        super().__init__(n, torch.float32, torch.device("cpu"))


def test_the_basis_is_sized_from_k_when_memory_is_short():
    """memory_gb too small for 120 vectors: the basis falls to what a restart needs."""
    op, A, eigenvalues = dense_case("indefinite")
    values = top_eigenvalues(op, 2, seed=0, memory_gb=1e-6, block_size=1)
    np.testing.assert_allclose(values, expected(eigenvalues, 2, "LA"), atol=1e-10 * 3)

    def basis(n: int, width: int) -> int:
        return _basis_size(Workspace(Sized(n), 2**30, explicit=True), 5, width, None)[0]

    assert basis(11_000_000, 6) == 24  # four blocks of k + 1: 1 GiB holds 24 float32 vectors
    assert basis(11_000_000, 1) == 20  # ARPACK's floor
    assert basis(85_000, 6) == 120
    assert basis(100, 6) == 100


def test_k_equal_to_n_returns_the_whole_spectrum():
    A = np.diag([4.0, 1.0, 3.0, 2.0])
    values = top_eigenvalues(aslinearoperator(A), 4, seed=0)
    np.testing.assert_allclose(values, [4.0, 3.0, 2.0, 1.0], atol=1e-12)


# ------------------------------------------------------------------ always k values, bounded runs
def diagonal(values) -> LinearOperator:
    return aslinearoperator(np.diag(np.asarray(values, dtype=np.float64)))


@pytest.mark.parametrize("block_size", [1, None])
@pytest.mark.parametrize(
    ("values", "k", "which", "truth"),
    [
        ([3.0, 2.0, 1.0, *[0.0] * 7], 6, "LA", [3.0, 2.0, 1.0, 0.0, 0.0, 0.0]),
        ([0.0] * 10, 4, "LA", [0.0] * 4),
        ([1.0, 2.0, *[0.0] * 55], 3, "SA", [0.0, 0.0, 0.0]),
        ([1.0, 2.0, *[0.0] * 55], 4, "LM", [2.0, 1.0, 0.0, 0.0]),
    ],
    ids=["rank-3-LA", "zero-matrix", "zero-cluster-SA", "zero-cluster-LM"],
)
def test_rank_deficiency_gives_k_values_with_their_multiplicities(
    values, k, which, truth, block_size
):
    """A single vector's Krylov space becomes invariant after one step per distinct eigenvalue:
    the run then goes on with a block of k + 1 random columns, so that exact zeros come back
    with their multiplicity instead of fewer than k values (or a wrong one)."""
    if block_size == 1 and which == "SA":
        pytest.skip("SA always uses blocks unless forced; forced below")
    found, vectors = top_eigenvalues(
        diagonal(values), k, which=which, return_eigenvectors=True, seed=0, block_size=block_size
    )
    np.testing.assert_allclose(found, truth, atol=1e-12)
    assert vectors.shape == (len(values), k)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-10)


def test_a_forced_single_vector_finds_every_copy_of_the_smallest_eigenvalue():
    values = top_eigenvalues(diagonal([1.0, 2.0, *[0.0] * 55]), 3, which="SA", seed=0, block_size=1)
    np.testing.assert_allclose(values, [0.0, 0.0, 0.0], atol=1e-12)


def test_a_rank_deficient_gauss_newton_gives_all_k_eigenvalues():
    """A GGN of rank 4 (n = 11) with k = 8: the 4 positive eigenvalues and 4 zeros."""
    from linalg_cases import rotated

    spectrum = np.array([5.0, 3.0, 2.0, 1.0, *[0.0] * 7])
    op = aslinearoperator(rotated(spectrum, seed=4))
    for block_size in (1, 9):
        values, vectors = top_eigenvalues(
            op, 8, return_eigenvectors=True, seed=0, block_size=block_size
        )
        np.testing.assert_allclose(values, spectrum[:8], atol=1e-12)
        assert vectors.shape == (11, 8)


def test_the_default_tolerance_follows_the_operators_stated_accuracy():
    """A float64 finite-difference Hessian is accurate to 1e-5: the default tol is no finer, so
    the run ends after a few dozen products (it ran to maxiter at 100 eps)."""
    from linalg_cases import mlp_problem

    import curvop

    model, loss_fn, data = mlp_problem(samples=20)
    fd = curvop.FiniteDifferenceHessianOperator(model, loss_fn, data)
    exact = curvop.HessianOperator(model, loss_fn, data)
    with curvop.count_products(fd) as count:
        values = top_eigenvalues(fd, 3, seed=0)
    assert count.columns < 300
    truth = top_eigenvalues(exact, 3, seed=0)
    np.testing.assert_allclose(values, truth, atol=1e-4 * abs(truth[0]))
    with pytest.raises(
        ValueError, match=r"tol=1e-08 is below the operator's stated accuracy 1e-05"
    ):
        top_eigenvalues(fd, 3, seed=0, tol=1e-8)


def test_a_singular_graded_bottom_ends_in_bounded_time():
    """A transformer GGN's bottom: 464 exact zeros next to positive eigenvalues down to 5e-8 of
    the norm (n = 835). The wanted end is a degenerate cluster the restarts cannot resolve with a
    small basis; the basis grows until it converges (n vectors at most), so the run ends."""
    from linalg_cases import rotated

    rng = np.random.default_rng(0)
    positive = np.geomspace(5e-8, 1.0, 835 - 464) * rng.uniform(0.5, 1.5, 835 - 464)
    spectrum = np.concatenate([np.zeros(464), positive])
    op = aslinearoperator(rotated(spectrum, seed=1))
    with count_products(op) as count:
        values = top_eigenvalues(op, 3, which="SA", seed=0)
    np.testing.assert_allclose(values, 0.0, atol=1e-10)
    assert count.columns <= 4 * 835  # about the whole space, not 10 n block products


def test_a_run_that_cannot_converge_warns_and_says_how_accurate_it_is():
    """A basis that cannot grow (ncv given) and maxiter reached: a ConvergenceWarning with the
    accuracy reached, and the k best estimates."""
    op, A, eigenvalues = dense_case("decaying")
    with pytest.warns(ConvergenceWarning, match=r"converged to tol=1e-14.*within .* \* \|\|A\|\|"):
        values = top_eigenvalues(op, 4, which="SA", seed=0, ncv=20, maxiter=30, tol=1e-14)
    assert values.shape == (4,) and np.all(np.isfinite(values))


# --------------------------------------------------------------------- on curvop operators
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


def float32_problem(cls) -> tuple:
    """An operator on a float32 classifier (three batches, a short last one) and the exact top
    eigenvalue of the float64 twin (same weights, same data), from the dense matrix."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    y = torch.randint(0, 3, (96,), generator=generator)
    batches = split_batches(x, y, [40, 40, 16])
    op32 = cls(model, nn.CrossEntropyLoss(), batches)
    twin = copy.deepcopy(model).double()
    exact = GaussNewtonOperator if cls is GaussNewtonOperator else HessianOperator
    op64 = exact(twin, nn.CrossEntropyLoss(), [(xb.double(), yb) for xb, yb in batches])
    assert op32.dtype == np.float32 and op64.dtype == np.float64
    return op32, float(np.linalg.eigvalsh(op64.to_dense())[-1])


@by_operator
def test_float32_top_eigenvalue_from_eigsh_matches_float64_truth(cls):
    op32, truth = float32_problem(cls)
    v0 = np.random.default_rng(0).standard_normal(op32.shape[0])
    top = float(eigsh(op32, k=1, which="LA", v0=v0, return_eigenvectors=False)[0])
    assert abs(top - truth) <= 1e-4 * abs(truth)


@by_operator
def test_float32_top_eigenvalue_from_curvop_matches_float64_truth(cls):
    op32, truth = float32_problem(cls)
    top = float(np.max(curvop.top_eigenvalues(op32, k=1, seed=0)))
    assert abs(top - truth) <= 1e-4 * abs(truth)


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


# --------------------------------------------------------------------- argument checks
BAD_ARGUMENTS = [
    (lambda: top_eigenvalues(SMALL_OP, 0), ValueError, "k must be a positive integer"),
    (lambda: top_eigenvalues(SMALL_OP, 2.0), ValueError, "k must be a positive integer"),
    (
        lambda: top_eigenvalues(SMALL_OP, SMALL_N + 1),
        ValueError,
        f"k must be at most n={SMALL_N}, got {SMALL_N + 1}",
    ),
    (lambda: top_eigenvalues(SMALL_OP, which="BE"), ValueError, "which must be one of"),
    (lambda: top_eigenvalues(SMALL_OP, tol=-1e-3), ValueError, "tol must be >= 0"),
    (lambda: top_eigenvalues(SMALL_OP, tol=float("nan")), ValueError, "tol must be a finite"),
    (lambda: top_eigenvalues(SMALL_OP, maxiter=0), ValueError, "maxiter must be a positive"),
    (lambda: top_eigenvalues(SMALL_OP, 2, ncv=2), ValueError, "ncv must satisfy k < ncv <= n"),
    (
        lambda: top_eigenvalues(SMALL_OP, 2, ncv=SMALL_N + 1),
        ValueError,
        "ncv must satisfy k < ncv <= n",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_ARGUMENTS)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
