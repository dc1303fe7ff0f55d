"""One product counter (curvop.counting): curvop operators through their observers (a sum's and
its terms'), any other operator through its matvec/matmat, shadowed for the block and restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import F64
from linalg_cases import hessian
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import curvop


def test_counting_sees_the_terms(curvature_pair):
    H, G, _, _ = curvature_pair
    total = H + G
    V = torch.randn(H.shape[0], 3, dtype=F64)
    with curvop.count_products(total) as outer, curvop.count_products(H) as inner:
        total.block_product(V)
    assert (outer.columns, outer.calls) == (3, 1)
    assert inner.columns == 3


def test_a_curvop_operator_counts_columns_and_passes_of_every_face():
    op = hessian()
    n = op.shape[0]
    seen = []
    with curvop.count_products(op, seen.append) as count:
        op @ torch.ones(n, dtype=torch.float64)
        op @ np.ones((n, 3))
        op.matvec(np.ones(n))
    assert (count.columns, count.calls) == (5, 3) and seen == [1, 3, 1]
    assert op.product_observers == []  # counting stops with the block
    op @ torch.ones(n, dtype=torch.float64)
    assert count.columns == 5


def test_a_scipy_operator_is_counted_once_per_column():
    """SciPy's default matmat loops over matvec: the inner calls are not counted again."""
    A = np.diag(np.arange(1.0, 5.0))
    only_matvec = LinearOperator((4, 4), matvec=lambda x: A @ x, dtype=np.float64)
    for op in (aslinearoperator(A), only_matvec):
        with curvop.count_products(op) as count:
            op.matmat(np.ones((4, 3)))
            op.matvec(np.ones(4))
        assert (count.columns, count.calls) == (4, 2)
        assert "matvec" not in vars(op) and "matmat" not in vars(op)


def test_an_object_with_only_matvec_is_counted():
    """hessian-eigenthings' operator has a matvec and no matmat."""

    class OnlyMatvec:
        def matvec(self, x):
            return 2 * x

    op = OnlyMatvec()
    with curvop.count_products(op) as count:
        op.matvec(np.ones(3))
    assert count.columns == 1 and "matvec" not in vars(op)
    no_products = curvop.count_products(object())
    with pytest.raises(TypeError, match="op must be a curvop operator or have matvec/matmat"):
        no_products.__enter__()
