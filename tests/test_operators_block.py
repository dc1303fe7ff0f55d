"""The operator interface (curvop.operators.block): sums, scalings and shifts stay block
operators in torch; SciPy's face keeps working; foreign operators go through numpy; ``apply``
and the SciPy methods check the vectors they are given."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from conftest import (
    F64,
    OPERATOR_KINDS,
    TINY_N,
    build_operator,
    dense_hessian,
    make_case,
    relative_error,
    tiny_closure,
    tiny_operator,
)
from linalg_cases import GGN_RANK, hessian, rotated
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh
from torch import nn

import curvop
from curvop import (
    BlockOperator,
    HessianOperator,
    IdentityOperator,
    LinearCombination,
    ProductCost,
    exact_hvp,
    top_eigenvalues,
    xtrace,
)


# -------------------------------------- the algebra: sums, scalings and shifts stay block operators
def no_numpy(monkeypatch, *ops) -> None:
    """Make every numpy round trip of ``ops`` fail."""

    def fail(*_):
        raise AssertionError("the numpy round trip was used")

    for op in ops:
        monkeypatch.setattr(op, "_matmat", fail)
        monkeypatch.setattr(op, "_matvec", fail)


def test_a_damped_block_product_stays_in_torch(curvature_pair, monkeypatch):
    """H + lam * I multiplies blocks in torch: the Hessian's own torch product, V for the
    identity, never numpy (on a GPU that would be a round trip per product)."""
    H, _, dense, _ = curvature_pair
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
def test_algebra_matches_the_dense_matrices(curvature_pair, make, combine):
    H, G, A, B = curvature_pair
    op = make(H, G)
    truth = combine(A, B)
    V = torch.randn(H.shape[0], 4, dtype=F64)
    torch.testing.assert_close(op @ V, truth @ V)  # torch in, torch out
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(op @ x, truth.numpy() @ x, rtol=1e-10, atol=1e-12)  # SciPy's face
    assert op.T is op and op.H is op


def test_a_foreign_operator_in_a_sum_is_multiplied_through_numpy(curvature_pair):
    H, _, A, _ = curvature_pair
    n = H.shape[0]
    M = rotated(np.linspace(0.0, 1.0, n))
    combined = H + sla.aslinearoperator(M)
    V = torch.randn(n, 2, dtype=F64)
    torch.testing.assert_close(combined @ V, (A + torch.from_numpy(M)) @ V)


def test_sums_with_scipy_operators_work(G, dense):
    """A SciPy operator in a sum is multiplied through its matmat; the curvature stays torch."""
    shifted = G + aslinearoperator(np.eye(G.shape[0])) * 0.5
    values = top_eigenvalues(shifted, 2, which="SA", seed=0)
    np.testing.assert_allclose(values, [0.5, 0.5], atol=1e-10)
    estimate = xtrace(shifted, 2 * (GGN_RANK + 1) + 2, seed=0)
    assert estimate.value == pytest.approx(np.trace(dense["G"]) + 0.5 * G.shape[0], rel=0.05)


def test_terms_must_agree(curvature_pair):
    H, _, _, _ = curvature_pair
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


def test_combinations_report_accuracy_cost_and_dtype(curvature_pair):
    H, G, _, _ = curvature_pair
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


# --------------------------------------------------------------------- SciPy's face
def test_operator_is_a_symmetric_linear_operator():
    case = make_case()
    op = build_operator("hessian", case)
    assert isinstance(op, LinearOperator)
    assert op.T is op and op.H is op and op.adjoint() is op


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_eigsh_and_cg_on_operator(kind: str):
    case = make_case("mlp", "ce", "mean", (4, 4, 3))
    truth = OPERATOR_KINDS[kind][1](case).numpy()
    op = build_operator(kind, case)
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(truth)[-2:], rtol=1e-8, atol=1e-10)

    damping, b = 0.5, np.ones(op.shape[0])
    x, info = cg(op + damping * aslinearoperator(np.eye(op.shape[0])), b, rtol=1e-10)
    assert info == 0
    expected = np.linalg.solve(truth + damping * np.eye(op.shape[0]), b)
    assert relative_error(x, expected) < 1e-7


def test_scipy_solvers_and_eigsh_keep_working_on_combinations(curvature_pair):
    H, G, A, B = curvature_pair
    n = H.shape[0]
    damped = G + 0.5 * IdentityOperator(n)
    b = np.linspace(-1, 1, n)
    x, info = sla.cg(damped, b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose((B.numpy() + 0.5 * np.eye(n)) @ x, b, atol=1e-9)
    top = sla.eigsh(H - G, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh((A - B).numpy())[-2:], rtol=1e-8)


def test_matvec_of_a_column_goes_through_matmat(curvature_pair, monkeypatch):
    """SciPy 1.18 warns that matvec on (n, 1) columns stops working in 1.20: curvop never calls
    it with one, its own matvec of a column is a matmat."""
    H, _, A, _ = curvature_pair
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


def test_float32_operator_has_float32_dtype_and_numpy_io():
    model = nn.Linear(3, 2)
    op = HessianOperator(model, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2)))
    assert op.dtype == np.float32
    out = op @ np.ones(op.shape[0])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32


# ----------------------------- the vectors: torch in, torch out; shapes, dtypes and devices checked
def test_apply_one_vector_returns_vector():
    case = make_case()
    op = build_operator("hessian", case)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    out = op.apply(v)
    assert out.shape == v.shape and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), dense_hessian(case).numpy() @ v.numpy(), rtol=1e-10)


@pytest.mark.parametrize("shape", [(TINY_N - 1,), (TINY_N + 1, 2), (TINY_N, 2, 1), ()])
def test_apply_rejects_a_wrong_shape_stating_expected_and_received(shape):
    with pytest.raises(
        ValueError, match=rf"V must have shape \({TINY_N},\) or \({TINY_N}, k\), got"
    ):
        tiny_operator().apply(torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("shape", [(TINY_N - 1,), (TINY_N, 2)])
def test_matvec_rejects_a_wrong_shape_stating_expected_and_received(shape):
    expected = rf"x must have shape \({TINY_N},\) or \({TINY_N}, 1\), got \({', '.join(map(str, shape))},?\)"
    with pytest.raises(ValueError, match=expected):
        tiny_operator().matvec(np.zeros(shape))


def test_matmul_rejects_a_wrong_length():
    with pytest.raises(
        ValueError, match=rf"x must have shape \({TINY_N},\) or \({TINY_N}, 1\), got \(5,\)"
    ):
        tiny_operator() @ np.zeros(5)


def test_matmul_with_a_three_dimensional_array_names_the_shape():
    op = build_operator("hessian", make_case())
    with pytest.raises(ValueError, match=r"must have shape .*got \(\d+, 1, 1\)"):
        op @ np.ones((op.shape[0], 1, 1))
    assert (op @ np.ones((op.shape[0], 2))).shape == (op.shape[0], 2)


def test_matmat_rejects_a_wrong_shape_stating_expected_and_received():
    with pytest.raises(ValueError, match=rf"X must have shape \({TINY_N}, k\), got \(5, 2\)"):
        tiny_operator().matmat(np.zeros((5, 2)))


def test_rmatvec_rejects_a_wrong_length():
    with pytest.raises(ValueError, match=rf"x must have shape \({TINY_N},\)"):
        tiny_operator().rmatvec(np.zeros(TINY_N + 2))


def test_apply_rejects_another_dtype_without_copying():
    with pytest.raises(
        ValueError, match=r"V must have dtype torch.float64 on device cpu, got dtype torch.float32"
    ):
        tiny_operator().apply(torch.zeros(TINY_N, dtype=torch.float32))


def test_apply_rejects_another_device_without_copying():
    with pytest.raises(ValueError, match=r"V must have dtype .* on device cpu, got .* device meta"):
        tiny_operator().apply(torch.zeros(TINY_N, dtype=F64, device="meta"))


def test_apply_rejects_numpy():
    with pytest.raises(
        TypeError, match=r"V must be a torch tensor, got a numpy array: for numpy use A @ x"
    ):
        tiny_operator().apply(np.zeros(TINY_N))


def test_complex_vectors_are_rejected_everywhere():
    op = tiny_operator()
    with pytest.raises(TypeError, match="V must be real, got complex"):
        op.apply(torch.zeros(TINY_N, dtype=torch.complex128))
    with pytest.raises(TypeError, match="x must be real, got complex"):
        op.matvec(np.zeros(TINY_N, dtype=complex))
    with pytest.raises(TypeError, match="X must be real, got complex"):
        op @ np.zeros((TINY_N, 2), dtype=complex)
    func, params = tiny_closure()
    with pytest.raises(TypeError, match="v must be real, got complex"):
        exact_hvp(func, params, [torch.zeros(2, 3, dtype=torch.complex128), torch.zeros(3)])
