"""The operator interface (curvop.operators.block): sums, scalings and shifts stay block
operators in torch; SciPy's face keeps working; foreign operators go through numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from linalg_cases import gauss_newton, hessian, rotated

import curvop
from curvop import BlockOperator, IdentityOperator, LinearCombination, ProductCost

F64 = torch.float64


@pytest.fixture
def pair():
    H, G = hessian(), gauss_newton()
    return H, G, torch.from_numpy(H.to_dense()), torch.from_numpy(G.to_dense())


def no_numpy(monkeypatch, *ops) -> None:
    """Make every numpy round trip of ``ops`` fail."""

    def fail(*_):
        raise AssertionError("the numpy round trip was used")

    for op in ops:
        monkeypatch.setattr(op, "_matmat", fail)
        monkeypatch.setattr(op, "_matvec", fail)


def test_a_damped_block_product_stays_in_torch(pair, monkeypatch):
    """H + lam * I multiplies blocks in torch: the Hessian's own torch product, V for the
    identity, never numpy (on a GPU that would be a round trip per product)."""
    H, _, dense, _ = pair
    n = H.shape[0]
    identity = IdentityOperator(n)
    damped = H + 0.1 * identity
    assert isinstance(damped, LinearCombination) and isinstance(damped, BlockOperator)
    no_numpy(monkeypatch, H, identity, damped)
    V = torch.randn(n, 3, dtype=F64)
    product = damped.block_product(V)
    torch.testing.assert_close(product, (dense + 0.1 * torch.eye(n, dtype=F64)) @ V)
    assert damped.torch_dtype == F64 and damped.device == H.device
    values = curvop.top_eigenvalues(damped, 2, seed=0)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(dense.numpy())[::-1][:2] + 0.1)


@pytest.mark.parametrize(
    ("make", "combine"),
    [
        (lambda H, G: H - G, lambda A, B: A - B),
        (lambda H, G: 2 * H, lambda A, B: 2 * A),
        (lambda H, G: H * 2, lambda A, B: 2 * A),
        (lambda H, G: H / 4, lambda A, B: A / 4),
        (lambda H, G: -H, lambda A, B: -A),
        (lambda H, G: sum([H, G]), lambda A, B: A + B),
        (lambda H, G: 0.5 * (H + G) - 0.25 * G, lambda A, B: 0.5 * A + 0.25 * B),
    ],
    ids=["difference", "scaled", "scaled-right", "divided", "negated", "sum", "nested"],
)
def test_algebra_matches_the_dense_matrices(pair, make, combine):
    H, G, A, B = pair
    op = make(H, G)
    truth = combine(A, B)
    V = torch.randn(H.shape[0], 4, dtype=F64)
    torch.testing.assert_close(op @ V, truth @ V)  # torch in, torch out
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(op @ x, truth.numpy() @ x, rtol=1e-10, atol=1e-12)  # SciPy's face
    assert op.T is op and op.H is op


def test_scipy_solvers_and_eigsh_keep_working_on_combinations(pair):
    H, G, A, B = pair
    n = H.shape[0]
    damped = G + 0.5 * IdentityOperator(n)
    b = np.linspace(-1, 1, n)
    x, info = sla.cg(damped, b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose((B.numpy() + 0.5 * np.eye(n)) @ x, b, atol=1e-9)
    top = sla.eigsh(H - G, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh((A - B).numpy())[-2:], rtol=1e-8)


def test_a_foreign_operator_in_a_sum_is_multiplied_through_numpy(pair):
    H, _, A, _ = pair
    n = H.shape[0]
    M = rotated(np.linspace(0.0, 1.0, n))
    combined = H + sla.aslinearoperator(M)
    V = torch.randn(n, 2, dtype=F64)
    torch.testing.assert_close(combined @ V, (A + torch.from_numpy(M)) @ V)


def test_terms_must_agree(pair):
    H, _, _, _ = pair
    with pytest.raises(ValueError, match="operators of different sizes cannot be added"):
        H + IdentityOperator(H.shape[0] + 1)
    with pytest.raises(ValueError, match="operators of different sizes"):
        H + sla.aslinearoperator(np.eye(3))
    with pytest.raises(ValueError, match="operators on different devices cannot be added"):
        LinearCombination([(1.0, H), (1.0, _Elsewhere(H.shape[0]))])


class _Elsewhere(BlockOperator):
    """An operator that says it lives on another device (nothing is multiplied)."""

    def __init__(self, n: int):
        super().__init__(n, F64, torch.device("meta"))


def test_combinations_report_accuracy_cost_and_dtype(pair):
    H, G, _, _ = pair
    fd = curvop.FiniteDifferenceHessianOperator(*_problem())
    combined = fd + 0.1 * H
    assert combined.accuracy == fd.accuracy  # the worst term's
    H.apply(torch.randn(H.shape[0], 2, dtype=F64))
    G.apply(torch.randn(G.shape[0], 2, dtype=F64))
    cost, h, g = (H + G).product_cost(2), H.product_cost(2), G.product_cost(2)
    assert cost == ProductCost(h.seconds + g.seconds, max(h.bytes, g.bytes))
    assert (H + sla.aslinearoperator(np.eye(H.shape[0]))).product_cost(2) is None  # unmeasured
    assert IdentityOperator(4).product_cost(3) == ProductCost(0.0, 0)
    float32 = hessian(torch.float32)
    assert (float32 + IdentityOperator(float32.shape[0])).torch_dtype == torch.float32
    assert (float32 + H).torch_dtype == F64  # the widest


def _problem():
    from linalg_cases import mlp_problem

    return mlp_problem()


def test_counting_sees_the_terms(pair):
    H, G, _, _ = pair
    total = H + G
    V = torch.randn(H.shape[0], 3, dtype=F64)
    with curvop.count_products(total) as outer, curvop.count_products(H) as inner:
        total.block_product(V)
    assert (outer.columns, outer.calls) == (3, 1)
    assert inner.columns == 3


def test_the_identity_alone_works_with_any_dtype():
    identity = IdentityOperator(3)
    for dtype in (torch.float32, F64):
        V = torch.randn(3, 2, dtype=dtype)
        product = identity @ V
        torch.testing.assert_close(product, V)
        assert product.data_ptr() != V.data_ptr()  # a copy: the caller may write into it
    np.testing.assert_array_equal(identity @ np.arange(3.0), np.arange(3.0))
    assert repr(0.5 * identity) == "0.5 * IdentityOperator(3)"


def test_matvec_of_a_column_goes_through_matmat(pair, monkeypatch):
    """SciPy 1.18 warns that matvec on (n, 1) columns stops working in 1.20: curvop never calls
    it with one, its own matvec of a column is a matmat."""
    H, _, A, _ = pair
    original = sla.LinearOperator.matvec

    def strict(self, x):
        assert np.ndim(x) == 1, "LinearOperator.matvec got an (n, 1) column"
        return original(self, x)

    monkeypatch.setattr(sla.LinearOperator, "matvec", strict)
    x = np.random.default_rng(0).standard_normal((H.shape[0], 1))
    for op in (H, H + IdentityOperator(H.shape[0])):
        result = op.matvec(x)
        assert result.shape == x.shape
    np.testing.assert_allclose(H.matvec(x), A.numpy() @ x, rtol=1e-10)
