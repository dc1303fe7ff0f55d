"""The workspace of every algorithm (curvop.linalg.workspace): one memory budget for an
algorithm's vectors and the autograd graphs of its block products (peaks measured from the tensors
a call creates); blocks multiplied in torch; the operator checked, and its symmetry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import conv_hessian, skewed
from linalg_cases import SMALL_N, ProductLog
from scipy.sparse.linalg import aslinearoperator

import curvop
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
from curvop.memory import peak_tensor_bytes
from curvop.operators import base as base_module

# ----------------------------------------------- one memory budget for the vectors and the products
MIB = 2**20

CALLS = {
    "top-5": (lambda op, **o: curvop.top_eigenvalues(op, 5, seed=0, tol=1e-3, **o), 20),
    "slq-4x30": (
        lambda op, **o: curvop.spectral_density(op, num_probes=4, num_steps=30, seed=0, **o),
        4 * 30 + 16,
    ),
    "hutchinson-30": (lambda op, **o: curvop.hutchinson_trace(op, 30, seed=0, **o), 60),
    "hutchpp-30": (lambda op, **o: curvop.hutchpp_trace(op, 30, seed=0, **o), 60),
    "xtrace-30": (lambda op, **o: curvop.xtrace(op, 30, seed=0, **o), 4 * 15 + 15),
    "xdiag-30": (lambda op, **o: curvop.xdiag(op, 30, seed=0, **o), 4 * 15 + 15),
}  # (call, the float64 n-vectors it may hold at once)


@pytest.mark.parametrize("name", CALLS)
def test_the_default_budget_holds_a_call_to_five_products_plus_its_vectors(name, monkeypatch):
    """With the defaults, a block product may hold four single products' graphs (small models may
    use a floor of 64 MiB instead; zero here, so that the rule itself is what is tested), so a
    call adds at most five single products plus the n-vectors it keeps."""
    monkeypatch.setattr(base_module, "DEFAULT_GRAPH_FLOOR", 0)
    op = conv_hessian()
    op.apply(torch.randn(op.shape[0], 4))  # the kernels are measured before the call
    single = op.product_cost(1).bytes
    call, vectors = CALLS[name]
    _, peak = peak_tensor_bytes(lambda: call(op))
    allowed = 5 * single + vectors * op.shape[0] * 8
    assert peak <= allowed, f"{peak / MIB:.1f} MiB > {allowed / MIB:.1f} MiB"


@pytest.mark.parametrize("name", CALLS)
def test_an_explicit_budget_bounds_the_peak(name):
    """memory_gb bounds vectors and graphs together: a budget of two single products plus the
    call's vectors is kept (within the error of the measured line, 25%)."""
    op = conv_hessian("batched")  # a graph that grows with the columns
    op.apply(torch.randn(op.shape[0], 4))
    call, vectors = CALLS[name]
    budget = 2 * op.product_cost(1).bytes + vectors * op.shape[0] * 8
    _, peak = peak_tensor_bytes(lambda: call(op, memory_gb=budget / 2**30))
    assert peak <= 1.25 * budget, f"{peak / MIB:.1f} MiB > {budget / MIB:.1f} MiB"


def test_memory_gb_is_checked():
    op = conv_hessian()
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="memory_gb must be a positive finite real number"):
            curvop.hutchinson_trace(op, 3, memory_gb=bad)
    assert np.isfinite(curvop.hutchinson_trace(op, 3, seed=0, memory_gb=None).value)


# ------------------------------------------------------- every algorithm multiplies blocks in torch
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


# ------------------------------------------------------------- the operator: checked, and symmetric
B = np.ones(SMALL_N)

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


@pytest.mark.parametrize(
    "run",
    [
        lambda op: curvop.top_eigenvalues(op, k=2, seed=0),
        lambda op: curvop.top_eigenvalues(op, k=1, which="SA", seed=0),
        lambda op: curvop.lanczos(op, 20, seed=0),
        lambda op: curvop.spectral_density(op, num_probes=2, num_steps=20, seed=0),
        lambda op: curvop.solve_damped(op, np.ones(op.shape[0]), 1.0),
        lambda op: curvop.solve_damped(op, np.ones(op.shape[0]), 1.0, method="minres"),
    ],
    ids=["top-LA", "top-SA", "lanczos", "slq", "cg", "minres"],
)
@pytest.mark.parametrize("kind", ["curvop", "matrix"])
def test_krylov_methods_stop_with_a_clear_error_on_an_asymmetric_operator(run, kind):
    op = skewed(1e-3)
    if kind == "matrix":
        op = aslinearoperator(op.to_dense())
    with (
        curvop.count_products(op) as count,
        pytest.raises(ValueError, match="op must be symmetric"),
    ):
        run(op)
    assert count.columns <= 40  # stopped within a few products, not after maxiter


def test_krylov_methods_accept_asymmetry_within_the_allowance():
    op = skewed(1e-13)  # rounding-sized: below sqrt(eps) of float64
    assert curvop.top_eigenvalues(op, k=2, seed=0).shape == (2,)
    assert curvop.solve_damped(op, np.ones(op.shape[0]), 1.0).converged
