"""Trace estimators (curvop.linalg.trace): unbiasedness within standard errors, accuracy ranking,
exactness, any budget; on curvop operators; the arguments they check."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from linalg_cases import (
    GGN_RANK,
    OUTLIERS,
    SMALL_OP,
    CountingOperator,
    budget_settings,
    dense_case,
    hutchinson_std,
    matrices,
    rotated,
    scale,
)
from scipy.linalg import orth
from scipy.sparse.linalg import aslinearoperator

from curvop import Estimate, hutchinson_trace, hutchpp_trace, xdiag, xtrace
from curvop.linalg import trace as trace_module
from curvop.linalg.probes import draw_probes, make_generator

SEEDS = range(10)


# ----------------------------------------------------------------- dense matrices of known spectrum
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "sparse_rademacher"])
def test_hutchinson_is_within_a_few_standard_errors(distribution):
    op, A, eigenvalues = dense_case("indefinite")
    errors = []
    for seed in SEEDS:
        estimate = hutchinson_trace(op, 40, distribution=distribution, seed=seed)
        assert isinstance(estimate, Estimate) and estimate.num_matvecs == 40
        assert float(estimate) == estimate.value
        errors.append((estimate.value - eigenvalues.sum()) / estimate.std_error)
    assert np.abs(errors).max() < 4.5
    assert np.mean(errors) == pytest.approx(0.0, abs=4 / np.sqrt(len(SEEDS)))


def test_hutchinson_standard_error_matches_theory():
    op, A, _ = dense_case("indefinite")
    std_errors = [hutchinson_trace(op, 100, seed=seed).std_error for seed in SEEDS]  # n = 120
    assert np.mean(std_errors) == pytest.approx(hutchinson_std(A, 100), rel=0.15)


def test_a_single_probe_has_no_standard_error():
    op, _, _ = dense_case("decaying")
    assert np.isnan(hutchinson_trace(op, 1, seed=0).std_error)


def mean_error(estimator, op, truth, num_matvecs):
    return np.mean([abs(estimator(op, num_matvecs, seed=s).value - truth) for s in SEEDS])


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_decaying_spectrum():
    op, _, eigenvalues = dense_case("decaying")
    truth = eigenvalues.sum()
    hutchinson = mean_error(hutchinson_trace, op, truth, 60)
    hutchpp = mean_error(hutchpp_trace, op, truth, 60)
    assert hutchpp < 0.3 * hutchinson
    assert mean_error(xtrace, op, truth, 60) < 0.5 * hutchpp  # every product used twice


@pytest.mark.parametrize("estimator", [hutchpp_trace, xtrace])
def test_variance_reduced_estimators_stay_unbiased(estimator):
    op, A, eigenvalues = dense_case("indefinite")
    scale = hutchinson_std(A, 10)  # at worst the Monte-Carlo part of 10 probes
    errors = [(estimator(op, 30, seed=seed).value - eigenvalues.sum()) / scale for seed in SEEDS]
    assert np.mean(errors) == pytest.approx(0.0, abs=4 / np.sqrt(len(SEEDS)))


def test_xtrace_is_exact_on_a_low_rank_matrix():
    """The sketch is rank-deficient (9 probes, rank 8): the textbook R^{-1} formula breaks. The
    leave-two-out samples behind the standard error (7 probes) are not exact yet: std_error > 0."""
    op, _, _ = dense_case("zero_cluster")
    estimate = xtrace(op, 2 * (len(OUTLIERS) + 1), seed=0)
    assert estimate.value == pytest.approx(OUTLIERS.sum(), rel=1e-12)
    assert estimate.std_error > 1e-3 * OUTLIERS.sum()
    assert estimate.num_matvecs == len(OUTLIERS) + 1 + len(OUTLIERS)


def test_xtrace_has_no_error_bar_once_every_leave_two_out_sketch_is_exact():
    """10 probes on rank 8: every 8 of them span the range."""
    op, _, _ = dense_case("zero_cluster")
    estimate = xtrace(op, 2 * (len(OUTLIERS) + 2), seed=0)
    assert estimate.value == pytest.approx(OUTLIERS.sum(), rel=1e-12)
    assert estimate.std_error < 1e-12 * OUTLIERS.sum()
    assert estimate.num_matvecs == len(OUTLIERS) + 2 + len(OUTLIERS)


def test_xtrace_stays_exact_on_an_axis_aligned_low_rank_matrix():
    """Rademacher probes would repeat sign patterns here and miss directions; Gaussians do not."""
    A = np.diag(np.concatenate([[3.0, -1.0], np.zeros(48)]))
    for seed in SEEDS:
        assert xtrace(aslinearoperator(A), 8, seed=seed).value == pytest.approx(2.0, rel=1e-12)


def test_hutchpp_is_exact_when_its_sketch_covers_the_rank():
    op, _, _ = dense_case("zero_cluster")
    estimate = hutchpp_trace(op, 3 * len(OUTLIERS), seed=0)
    assert estimate.value == pytest.approx(OUTLIERS.sum(), rel=1e-10)
    assert estimate.num_matvecs == 3 * len(OUTLIERS)


def xtrace_by_definition(A: np.ndarray, omega: np.ndarray) -> tuple[float, float]:
    """XTrace and its standard error from explicit orthonormal bases (``orth`` is rank-revealing)
    of the products of the probes other than ``i`` (and ``k``)."""

    def sample(i: int, left_out: set[int]) -> float:
        basis = orth(A @ omega[:, [j for j in range(omega.shape[1]) if j not in left_out]])
        rest = np.eye(len(A)) - basis @ basis.T
        w = omega[:, i]
        return np.trace(basis.T @ A @ basis) + w @ rest @ A @ rest @ w

    s = omega.shape[1]
    samples = np.array([sample(i, {i}) for i in range(s)])
    changes = {(i, k): samples[i] - sample(i, {i, k}) for i in range(s) for k in range(s) if i != k}
    covariance = sum(changes[i, k] * changes[k, i] for i, k in changes) / (s * (s - 1))
    return samples.mean(), float(np.sqrt(samples.var(ddof=1) / s + abs(covariance)))


@pytest.mark.parametrize(
    ("rank", "n", "probes"),
    [(40, 40, 6), (5, 30, 6), (4, 30, 6), (3, 30, 6)],
    ids=["full-rank", "rank s-1", "rank s-2", "rank s-3"],
)
def test_xtrace_matches_its_definition(rank, n, probes):
    """The estimate is the mean of the leave-one-out samples, the standard error adds their
    covariance estimated from leave-two-out samples; rank-deficient sketches change which probes
    remove a direction."""
    rng = np.random.default_rng(2)
    A = rotated(np.concatenate([rng.standard_normal(rank), np.zeros(n - rank)]), seed=4)
    omega = draw_probes(
        n,
        probes,
        distribution="gaussian",
        generator=make_generator(7),
        dtype=torch.float64,
        device="cpu",
    ).numpy()
    value, std_error = xtrace_by_definition(A, omega)
    estimate = xtrace(aslinearoperator(A), 2 * probes, seed=7)
    scale = np.abs(A).sum()
    assert estimate.value == pytest.approx(value, abs=1e-10 * scale)
    assert estimate.std_error == pytest.approx(std_error, abs=1e-10 * scale)
    assert (std_error == pytest.approx(0.0, abs=1e-10 * scale)) == (rank < probes - 1)


@pytest.mark.parametrize(
    ("estimate", "text"),
    [
        (Estimate(12.718634, 0.4512, 60), "Estimate(value=12.7186 ± 0.45, num_matvecs=60)"),
        (Estimate(10.0, 0.0, 4), "Estimate(value=10 ± 0, num_matvecs=4)"),
        (Estimate(0.1234567, 3.14159e-9, 80), "Estimate(value=0.123457 ± 3.1e-09, num_matvecs=80)"),
        (Estimate(-3.5e8, 1234.5, 7), "Estimate(value=-3.5e+08 ± 1200, num_matvecs=7)"),
        (Estimate(2.0, float("nan"), 1), "Estimate(value=2 ± nan, num_matvecs=1)"),
    ],
)
def test_estimate_prints_short(estimate, text):
    assert repr(estimate) == str(estimate) == text
    assert estimate._replace(num_matvecs=5).num_matvecs == 5 and estimate[2] == estimate.num_matvecs


def test_estimate_unpacks_like_a_named_tuple():
    from scipy.sparse.linalg import aslinearoperator

    import curvop

    value, std_error, num_matvecs = curvop.hutchinson_trace(aslinearoperator(np.eye(5)), 4, seed=0)
    assert value == 5.0 and num_matvecs == 4 and std_error == 0.0


def test_xtrace_standard_error_does_not_depend_on_the_batching(monkeypatch):
    """The leave-two-out samples go in batches of left-out probes; one probe at a time agrees."""
    op, _, _ = dense_case("indefinite")
    whole = xtrace(op, 30, seed=3)
    monkeypatch.setattr(trace_module, "BATCH_ELEMENTS", 1)
    assert xtrace(op, 30, seed=3) == pytest.approx(whole, rel=1e-12)


def test_nearly_redundant_probes_do_not_count_as_unique():
    """Rank s - 2: each sketch without one probe has a one-dimensional null space, and in about
    one call in 25 some probe's component in it is below 1.2e-4 (the former sqrt(eps) rule called
    that probe unique). The others still span far above the rank cutoff without it: exact value,
    zero standard error, every seed."""
    rank, probes = 10, 12
    A = rotated(np.concatenate([np.linspace(1.0, 3.0, rank), np.zeros(40 - rank)]), seed=1)
    for seed in range(60):
        estimate = xtrace(aslinearoperator(A), 2 * probes, seed=seed)
        assert estimate.value == pytest.approx(np.trace(A), rel=1e-10)
        assert estimate.std_error < 1e-10 * np.trace(A)


def test_a_small_memory_budget_streams_hutchinsons_probes_with_the_same_estimate():
    op, _, _ = dense_case("indefinite")
    whole = hutchinson_trace(op, 30, seed=3)
    streamed = hutchinson_trace(op, 30, seed=3, memory_gb=3 * 2 * 8 * 120 / 2**30)  # 3 at a time
    assert streamed.value == pytest.approx(whole.value, rel=1e-12)
    assert streamed.std_error == pytest.approx(whole.std_error, rel=1e-12)


@pytest.mark.parametrize("estimator", [hutchpp_trace, xtrace])
def test_sketches_in_the_operators_dtype_when_float64_does_not_fit(estimator):
    """A float32 operator with a budget too small for float64 sketches: float32 arrays, and an
    estimate as good (its error is statistical, far above float32 rounding)."""
    op, _, eigenvalues = dense_case("decaying", dtype=np.float32)
    tight = estimator(op, 40, seed=0, memory_gb=1e-6)
    roomy = estimator(op, 40, seed=0)
    assert tight.value == pytest.approx(roomy.value, rel=1e-4)
    assert abs(tight.value - eigenvalues.sum()) <= 4 * tight.std_error + 1e-4 * eigenvalues.sum()


@pytest.mark.parametrize("estimator", ["xtrace", "xdiag"])
def test_exchangeable_estimators_refuse_an_asymmetric_operator(estimator):
    """Their sketch assumes A^T = A: on an asymmetric matrix XTrace returned 11.5 +/- 12 for a
    trace of 3.7, silently. The sketch's Q^T A Q shows the asymmetry at no extra product."""
    import curvop

    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 40)) * 0.1 + np.diag(rng.uniform(0, 0.2, 40))
    with pytest.raises(ValueError, match="op must be symmetric"):
        getattr(curvop, estimator)(aslinearoperator(A), 20, seed=0)


# --------------------------------------------------------------------- on curvop operators
def test_xtrace_and_xdiag_are_exact_on_the_gauss_newton(G, dense):
    budget = 2 * (GGN_RANK + 1)
    assert xtrace(G, budget, seed=0).value == pytest.approx(np.trace(dense["G"]), rel=1e-10)
    np.testing.assert_allclose(xdiag(G, budget, seed=0), np.diag(dense["G"]), atol=1e-12)


def test_hutchinson_trace_of_the_hessian(H, dense):
    estimate = hutchinson_trace(H, 30, seed=0)
    assert abs(estimate.value - np.trace(dense["H"])) < 4.5 * estimate.std_error


# --------------------------------------------------------------------- any budget on any size
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


@pytest.mark.parametrize(("n", "budget"), [(4, 15), (73, 300)])
def test_hutchpp_with_a_sketch_wider_than_the_matrix(n, budget):
    """The reported crash: num_matvecs // 3 > n raised a RuntimeError in the sketch."""
    A = rotated(np.arange(1.0, n + 1), seed=n)
    op = CountingOperator(A)
    estimate = hutchpp_trace(op, budget, seed=0)
    assert estimate.value == pytest.approx(np.trace(A), rel=1e-12)
    assert estimate.std_error == 0.0 and estimate.num_matvecs == op.products == n


# --------------------------------------------------------------------- argument checks
BAD_ARGUMENTS = [
    (lambda: hutchinson_trace(SMALL_OP, 0), ValueError, "num_matvecs must be a positive integer"),
    (
        lambda: hutchinson_trace(SMALL_OP, 4, distribution="normal"),
        ValueError,
        "distribution must be",
    ),
    (lambda: hutchpp_trace(SMALL_OP, 2), ValueError, "num_matvecs must be at least 3 for hutchpp"),
    (lambda: xtrace(SMALL_OP, 1), ValueError, "num_matvecs must be at least 2 for xtrace"),
    (lambda: xtrace(SMALL_OP, "8"), ValueError, "num_matvecs must be a positive integer"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_ARGUMENTS)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
