"""The workspace of every algorithm (curvop.linalg.workspace): one memory budget for an
algorithm's vectors and the autograd graphs of its block products (peaks measured from the tensors
a call creates); blocks multiplied in torch; the operator checked, and its symmetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import conv_hessian, skewed
from scipy.sparse.linalg import aslinearoperator

import curvop
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
    from curvop.linalg import workspace

    monkeypatch.setattr(base_module, "DEFAULT_GRAPH_FLOOR", 0)
    monkeypatch.setattr(workspace, "DEFAULT_GRAPH_FLOOR", 0)
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


# ------------------------------------------------------------- the operator: checked, and symmetric
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
