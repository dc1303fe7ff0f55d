"""Every reported standard error is calibrated: over many seeds, about 5% of the estimates fall
farther than two standard errors from the exact trace.

Bars: with a true share ``p``, the count of 300 seeds outside is Binomial(300, p). At p = 5%
(15 ± 3.8) the bars [1%, 10%] = [3, 30] lie 3.2 standard deviations below and 4 above; a
t-statistic from 20 samples (XTrace's s = 20) has p ≈ 6% (18 ± 4.1), still 2.9 below the upper
bar. They catch what matters: a standard error 20% too small gives p ≈ 11%, one 30% too large
p ≈ 0.9% (at this budget the former naive XTrace error gave 13-16% on the first two spectra, a
jackknife over its probes 0-1%). Budgets give every estimator at least 20 Monte-Carlo samples,
enough for the normal approximation on these spectra (Hutch++ spends two thirds of its budget
on the sketch).
"""

import numpy as np
import pytest
from linalg_cases import SPECTRA, N, rotated
from scipy.sparse.linalg import aslinearoperator

from curvop import hutchinson_trace, hutchpp_trace, xtrace

NUM_SEEDS = 300
LOW, HIGH = 0.01, 0.10

CALIBRATION_SPECTRA = {
    "decaying": SPECTRA["decaying"],
    "indefinite": SPECTRA["indefinite"],
    # a regression Hessian: one large outlier per class over a flat bulk
    "regression": np.concatenate([[40.0, 15.0, 6.0, 2.0], np.full(N - 4, 0.05)]),
}

ESTIMATORS = {
    "hutchinson_rademacher": lambda op, seed: hutchinson_trace(op, 100, seed=seed),
    "hutchinson_gaussian": lambda op, seed: hutchinson_trace(
        op, 100, distribution="gaussian", seed=seed
    ),
    "hutchinson_sparse_rademacher": lambda op, seed: hutchinson_trace(
        op, 100, distribution="sparse_rademacher", seed=seed
    ),
    "hutchpp_trace": lambda op, seed: hutchpp_trace(op, 100, seed=seed),
    "xtrace": lambda op, seed: xtrace(op, 40, seed=seed),
}


@pytest.mark.parametrize("spectrum", list(CALIBRATION_SPECTRA))
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_two_standard_errors_cover_about_95_percent(name, spectrum):
    eigenvalues = CALIBRATION_SPECTRA[spectrum]
    op = aslinearoperator(rotated(eigenvalues))
    estimates = [ESTIMATORS[name](op, seed) for seed in range(NUM_SEEDS)]
    errors = np.array([abs(e.value - eigenvalues.sum()) for e in estimates])
    std_errors = np.array([e.std_error for e in estimates])
    assert np.all(std_errors > 0)
    share = np.mean(errors > 2 * std_errors)
    assert LOW <= share <= HIGH, f"{share:.1%} of {NUM_SEEDS} estimates outside 2 std_error"
