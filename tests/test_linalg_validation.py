"""Bad arguments raise ValueError/TypeError naming the argument, before any product."""

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

from curvop import (
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

N = 6
OP = aslinearoperator(np.diag(np.arange(1.0, N + 1)))
B = np.ones(N)

FUNCTIONS = {
    "top_eigenvalues": lambda op: top_eigenvalues(op),
    "solve_damped": lambda op: solve_damped(op, B, 0.1),
    "lanczos": lambda op: lanczos(op, 3),
    "hutchinson_trace": lambda op: hutchinson_trace(op, 4),
    "hutchpp_trace": lambda op: hutchpp_trace(op, 4),
    "xtrace": lambda op: xtrace(op, 4),
    "hutchinson_diagonal": lambda op: hutchinson_diagonal(op, 4),
    "xdiag": lambda op: xdiag(op, 4),
    "spectral_density": lambda op: spectral_density(op),
}

BAD_OPERATORS = [
    ("not an operator", TypeError, "op must be a scipy.sparse.linalg.LinearOperator"),
    (aslinearoperator(np.zeros((3, 4))), ValueError, r"op must be a square.*\(3, 4\)"),
    (aslinearoperator(np.eye(3, dtype=complex)), TypeError, "op must be real"),
]


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(("op", "error", "match"), BAD_OPERATORS, ids=["type", "shape", "complex"])
def test_every_function_checks_the_operator(name, op, error, match):
    with pytest.raises(error, match=match):
        FUNCTIONS[name](op)


SEEDED = {
    "top_eigenvalues": lambda seed: top_eigenvalues(OP, seed=seed),
    "lanczos": lambda seed: lanczos(OP, 3, seed=seed),
    "hutchinson_trace": lambda seed: hutchinson_trace(OP, 4, seed=seed),
    "hutchpp_trace": lambda seed: hutchpp_trace(OP, 4, seed=seed),
    "xtrace": lambda seed: xtrace(OP, 4, seed=seed),
    "hutchinson_diagonal": lambda seed: hutchinson_diagonal(OP, 4, seed=seed),
    "xdiag": lambda seed: xdiag(OP, 4, seed=seed),
    "spectral_density": lambda seed: spectral_density(OP, seed=seed),
}


@pytest.mark.parametrize("name", list(SEEDED))
@pytest.mark.parametrize("seed", ["1", 1.5, True])
def test_every_randomized_function_checks_the_seed(name, seed):
    with pytest.raises(TypeError, match="seed must be None or an int"):
        SEEDED[name](seed)


CASES = [
    # top_eigenvalues
    (lambda: top_eigenvalues(OP, 0), ValueError, "k must be a positive integer"),
    (lambda: top_eigenvalues(OP, 2.0), ValueError, "k must be a positive integer"),
    (lambda: top_eigenvalues(OP, N + 1), ValueError, f"k must be at most n={N}, got {N + 1}"),
    (lambda: top_eigenvalues(OP, which="BE"), ValueError, "which must be one of"),
    (lambda: top_eigenvalues(OP, tol=-1e-3), ValueError, "tol must be >= 0"),
    (lambda: top_eigenvalues(OP, tol=float("nan")), ValueError, "tol must be a finite"),
    (lambda: top_eigenvalues(OP, maxiter=0), ValueError, "maxiter must be a positive"),
    (lambda: top_eigenvalues(OP, 2, ncv=2), ValueError, "ncv must satisfy k < ncv <= n"),
    (lambda: top_eigenvalues(OP, 2, ncv=N + 1), ValueError, "ncv must satisfy k < ncv <= n"),
    # solve_damped
    (lambda: solve_damped(OP, np.ones(N + 1), 0.1), ValueError, rf"b must have shape \({N},\)"),
    (lambda: solve_damped(OP, np.ones((N, 1)), 0.1), ValueError, "b must have shape"),
    (lambda: solve_damped(OP, [1.0] * N, 0.1), TypeError, "b must be a numpy array or a torch"),
    (lambda: solve_damped(OP, np.ones(N, complex), 0.1), TypeError, "b must have a real"),
    (
        lambda: solve_damped(OP, torch.ones(N, dtype=torch.complex64), 0.1),
        TypeError,
        "b must be real",
    ),
    (lambda: solve_damped(OP, np.full(N, np.nan), 0.1), ValueError, "b must be finite"),
    (lambda: solve_damped(OP, B, float("inf")), ValueError, "damping must be a finite"),
    (lambda: solve_damped(OP, B, "0.1"), ValueError, "damping must be a finite"),
    (lambda: solve_damped(OP, B, -0.1), ValueError, "damping must be >= 0 for method='cg'"),
    (lambda: solve_damped(OP, B, 0.1, method="gmres"), ValueError, "method must be one of"),
    (lambda: solve_damped(OP, B, 0.1, rtol=0.0), ValueError, "rtol must be a positive"),
    (lambda: solve_damped(OP, B, 0.1, maxiter=-1), ValueError, "maxiter must be a positive"),
    (lambda: solve_damped(OP, B, 0.1, x0=np.ones(2)), ValueError, "x0 must have shape"),
    (lambda: solve_damped(OP, B, 0.1, M=np.eye(2)), ValueError, rf"M must have shape \({N}, {N}\)"),
    (lambda: solve_damped(OP, B, 0.1, M="jacobi"), TypeError, "M must be a LinearOperator"),
    (lambda: solve_damped(OP, B, 0.1, callback=3), TypeError, "callback must be callable"),
    # lanczos
    (lambda: lanczos(OP, 0), ValueError, "num_steps must be a positive integer"),
    (lambda: lanczos(OP, 3, v0=np.ones(2)), ValueError, "v0 must have shape"),
    (lambda: lanczos(OP, 3, v0=np.zeros(N)), ValueError, "v0 must be nonzero"),
    (lambda: lanczos(OP, 3, v0=np.ones(N), seed=0), ValueError, "give either v0 or seed"),
    # trace and diagonal
    (lambda: hutchinson_trace(OP, 0), ValueError, "num_matvecs must be a positive integer"),
    (lambda: hutchinson_trace(OP, 4, distribution="normal"), ValueError, "distribution must be"),
    (lambda: hutchpp_trace(OP, 2), ValueError, "num_matvecs must be at least 3 for hutchpp"),
    (lambda: xtrace(OP, 1), ValueError, "num_matvecs must be at least 2 for xtrace"),
    (lambda: xtrace(OP, "8"), ValueError, "num_matvecs must be a positive integer"),
    (lambda: hutchinson_diagonal(OP, -2), ValueError, "num_matvecs must be a positive integer"),
    (lambda: xdiag(OP, 1), ValueError, "num_matvecs must be at least 2 for xdiag"),
    # spectral_density
    (lambda: spectral_density(OP, method="exact"), ValueError, "method must be one of"),
    (lambda: spectral_density(OP, num_probes=0), ValueError, "num_probes must be a positive"),
    (lambda: spectral_density(OP, num_steps=1.5), ValueError, "num_steps must be a positive"),
    (lambda: spectral_density(OP, num_points=1), ValueError, "num_points must be at least 2"),
    (lambda: spectral_density(OP, sigma=0.0), ValueError, "sigma must be a positive"),
    (lambda: spectral_density(OP, method="kpm", sigma=0.1), ValueError, "sigma applies to"),
]


@pytest.mark.parametrize(("call", "error", "match"), CASES)
def test_bad_argument_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
