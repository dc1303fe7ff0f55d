"""What every randomized estimator does first (curvop.linalg.estimation): the budget checked and
lowered to ``n`` on a small matrix, and the exact diagonal from the identity's columns, in bounded
blocks, once the budget reaches ``n``."""

from __future__ import annotations

import numpy as np
import pytest
from linalg_cases import CountingOperator, rotated

from curvop import hutchpp_trace, xdiag, xtrace
from curvop.linalg import estimation as estimation_module


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
