"""solve_damped (curvop.linalg.solve): both solvers to the requested tolerance, the kinds of b,
the warning path; on a curvop operator; SolveResult; the arguments it checks."""

import warnings

import numpy as np
import pytest
import torch
from linalg_cases import MAX_LENGTH, SMALL_N, SMALL_OP, N, dense_case

from curvop import ConvergenceWarning, SolveResult, solve_damped

RHS = np.random.default_rng(1).standard_normal(N)


def damped_residual(A, damping, x, b):
    return np.linalg.norm(b - (A + damping * np.eye(N)) @ np.asarray(x, dtype=np.float64))


# --------------------------------------------------- both solvers, the kinds of b, the warning path
@pytest.mark.parametrize(
    ("name", "damping", "method"),
    [
        ("decaying", 1e-2, "cg"),
        ("zero_cluster", 1e-3, "cg"),
        ("decaying", 1e-2, "minres"),
        ("indefinite", 0.5, "minres"),  # A + 0.5 I is indefinite
        ("indefinite", -3.5, "minres"),  # negative shift: negative definite
    ],
)
@pytest.mark.parametrize("rtol", [1e-6, 1e-10])
def test_solves_to_the_requested_tolerance(name, damping, method, rtol):
    op, A, _ = dense_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = solve_damped(op, RHS, damping, method=method, rtol=rtol)
    assert isinstance(result, SolveResult) and result.converged
    true_residual = damped_residual(A, damping, result.x, RHS)
    assert true_residual <= rtol * np.linalg.norm(RHS)
    rounding = 1e-13 * (np.linalg.norm(A, 2) * np.linalg.norm(result.x) + np.linalg.norm(RHS))
    assert result.residual_norm == pytest.approx(true_residual, abs=rounding)
    exact = np.linalg.solve(A + damping * np.eye(N), RHS)
    condition = np.linalg.cond(A + damping * np.eye(N))
    assert np.linalg.norm(result.x - exact) <= 2 * condition * rtol * np.linalg.norm(exact)


def test_torch_in_torch_out():
    op, A, _ = dense_case("decaying")
    b = torch.tensor(RHS, dtype=torch.float32)
    result = solve_damped(op, b, 0.1)
    assert isinstance(result.x, torch.Tensor)
    assert result.x.dtype == torch.float32 and result.x.device == b.device
    assert damped_residual(A, 0.1, result.x.numpy(), RHS) <= 1e-5 * np.linalg.norm(RHS)


def test_numpy_float32_in_float32_out():
    op, _, _ = dense_case("decaying")
    assert solve_damped(op, RHS.astype(np.float32), 0.1).x.dtype == np.float32


def test_nonconvergence_warns_and_suggests_remedies():
    op, A, _ = dense_case("zero_cluster")
    with pytest.warns(ConvergenceWarning, match="did not converge.*damping.*minres"):
        result = solve_damped(op, RHS, 1e-4, maxiter=3)
    assert not result.converged
    assert result.num_iterations == 3
    assert result.residual_norm == pytest.approx(damped_residual(A, 1e-4, result.x, RHS))


def test_callback_sees_every_iterate_as_the_kind_of_b():
    op, A, _ = dense_case("decaying")
    history = []
    result = solve_damped(op, torch.tensor(RHS), 1e-2, callback=lambda x: history.append(x.clone()))
    assert len(history) == result.num_iterations > 1
    assert all(isinstance(x, torch.Tensor) for x in history)
    residuals = [damped_residual(A, 1e-2, x.numpy(), RHS) for x in history]
    assert residuals[-1] < 1e-4 * residuals[0]


def test_exact_initial_guess_takes_no_iteration():
    op, A, _ = dense_case("decaying")
    exact = np.linalg.solve(A + 0.1 * np.eye(N), RHS)
    result = solve_damped(op, RHS, 0.1, x0=exact, rtol=1e-8)
    assert result.converged and result.num_iterations == 0


def test_preconditioner_is_used():
    op, A, _ = dense_case("decaying")
    plain = solve_damped(op, RHS, 1e-3, rtol=1e-8)
    exact_inverse = np.linalg.inv(A + 1e-3 * np.eye(N))
    preconditioned = solve_damped(op, RHS, 1e-3, rtol=1e-8, M=exact_inverse)
    assert preconditioned.converged and preconditioned.num_iterations < plain.num_iterations


def test_unpacks_into_four_fields():
    op, _, _ = dense_case("decaying")
    x, converged, num_iterations, residual_norm = solve_damped(op, RHS, 0.1)
    assert converged and num_iterations > 0 and residual_norm >= 0 and x.shape == (N,)


# --------------------------------------------------------------------- on curvop operators
def test_damped_solve_on_the_gauss_newton(G, dense):
    b = torch.linspace(-1, 1, G.shape[0], dtype=torch.float64)
    result = solve_damped(G, b, 1e-3, rtol=1e-10)
    assert isinstance(result.x, torch.Tensor) and result.converged
    exact = np.linalg.solve(dense["G"] + 1e-3 * np.eye(G.shape[0]), b.numpy())
    np.testing.assert_allclose(result.x.numpy(), exact, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- SolveResult
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_solve_result_repr(kind):
    op, _, _ = dense_case("decaying")
    rhs = np.ones(N) if kind == "numpy" else torch.ones(N, dtype=torch.float32)
    result = solve_damped(op, rhs, 0.1)
    text = repr(result)
    assert str(result) == text
    assert "\n" not in text and len(text) <= MAX_LENGTH
    assert f"converged={result.converged}" in text
    assert f"num_iterations={result.num_iterations}" in text
    assert f"residual_norm={result.residual_norm:.3g}" in text
    expected = "numpy.ndarray (40,) float64" if kind == "numpy" else "torch.Tensor (40,) float32"
    assert expected.replace("40", str(N)) in text


def test_solve_result_repr_of_a_huge_x_stays_short():
    result = SolveResult(np.zeros(10**6), False, 500, 3.25)
    assert repr(result) == (
        "SolveResult(x=<numpy.ndarray (1000000,) float64>, converged=False, "
        "num_iterations=500, residual_norm=3.25)"
    )


def test_solve_result_is_still_a_named_tuple():
    x, converged, iterations, residual = result = SolveResult(np.ones(3), True, 4, 1e-9)
    assert isinstance(result, tuple) and result._fields == (
        "x",
        "converged",
        "num_iterations",
        "residual_norm",
    )
    assert converged and iterations == 4 and residual == 1e-9 and x is result.x
    assert result._replace(num_iterations=5).num_iterations == 5


# --------------------------------------------------------------------- argument checks
B = np.ones(SMALL_N)

BAD_ARGUMENTS = [
    (
        lambda: solve_damped(SMALL_OP, np.ones(SMALL_N + 1), 0.1),
        ValueError,
        rf"b must have shape \({SMALL_N},\)",
    ),
    (lambda: solve_damped(SMALL_OP, np.ones((SMALL_N, 1)), 0.1), ValueError, "b must have shape"),
    (
        lambda: solve_damped(SMALL_OP, [1.0] * SMALL_N, 0.1),
        TypeError,
        "b must be a numpy array or a torch",
    ),
    (
        lambda: solve_damped(SMALL_OP, np.ones(SMALL_N, complex), 0.1),
        TypeError,
        "b must have a real",
    ),
    (
        lambda: solve_damped(SMALL_OP, torch.ones(SMALL_N, dtype=torch.complex64), 0.1),
        TypeError,
        "b must be real",
    ),
    (lambda: solve_damped(SMALL_OP, np.full(SMALL_N, np.nan), 0.1), ValueError, "b must be finite"),
    (lambda: solve_damped(SMALL_OP, B, float("inf")), ValueError, "damping must be a finite"),
    (lambda: solve_damped(SMALL_OP, B, "0.1"), ValueError, "damping must be a finite"),
    (lambda: solve_damped(SMALL_OP, B, -0.1), ValueError, "damping must be >= 0 for method='cg'"),
    (lambda: solve_damped(SMALL_OP, B, 0.1, method="gmres"), ValueError, "method must be one of"),
    (lambda: solve_damped(SMALL_OP, B, 0.1, rtol=0.0), ValueError, "rtol must be a positive"),
    (lambda: solve_damped(SMALL_OP, B, 0.1, maxiter=-1), ValueError, "maxiter must be a positive"),
    (lambda: solve_damped(SMALL_OP, B, 0.1, x0=np.ones(2)), ValueError, "x0 must have shape"),
    (
        lambda: solve_damped(SMALL_OP, B, 0.1, M=np.eye(2)),
        ValueError,
        rf"M must have shape \({SMALL_N}, {SMALL_N}\)",
    ),
    (lambda: solve_damped(SMALL_OP, B, 0.1, M="jacobi"), TypeError, "M must be a LinearOperator"),
    (lambda: solve_damped(SMALL_OP, B, 0.1, callback=3), TypeError, "callback must be callable"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_ARGUMENTS)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_curvop_operator_is_solved_in_torch_without_numpy(monkeypatch):
    """The iterate stays on the operator's device: no product goes through SciPy's numpy face
    (on a GPU that would be a host round trip per iteration)."""
    from linalg_cases import hessian

    op = hessian()

    def fail(*_):
        raise AssertionError("the numpy round trip was used")

    monkeypatch.setattr(op, "_matmat", fail)
    monkeypatch.setattr(op, "_matvec", fail)
    b = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    for method in ("cg", "minres"):
        result = solve_damped(op, b, 1.0, method=method, rtol=1e-10)
        assert result.converged and isinstance(result.x, torch.Tensor)
        residual = b - (op.apply(result.x) + result.x)
        assert float(residual.norm()) <= 1e-10 * float(b.norm())
