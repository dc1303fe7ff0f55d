"""The objective: closures evaluated at displaced points, and the loss called on the output."""

from __future__ import annotations

import pytest
import torch

import curvop

F64 = torch.float64


def _closure_problem():
    """Parameters ``(W, b)`` and ``f() -> loss`` whose graph saves both of them for backward."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator, dtype=F64).requires_grad_()
    bias = torch.randn(3, generator=generator, dtype=F64).requires_grad_()
    x = torch.randn(5, 4, generator=generator, dtype=F64)

    def loss() -> torch.Tensor:
        return (torch.tanh(x @ weight.T + bias) ** 2).sum() + (weight**4).sum() + (bias**3).sum()

    return [weight, bias], loss


def _finite_difference_products(params, func) -> None:
    vectors = [torch.ones_like(p) for p in params]
    curvop.approximate_hvp(func, params, vectors, seed=0)
    operator = curvop.FiniteDifferenceHessianOperator.from_function(func, params)
    operator.apply(torch.ones(operator.shape[0], dtype=F64))


def test_finite_differences_leave_a_graph_built_before_them_usable():
    params, func = _closure_problem()
    before = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    expected = torch.autograd.grad(func(), params)
    loss = func()  # the caller's graph, built before the products
    _finite_difference_products(params, func)
    assert [p._version for p in params] == versions
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    loss.backward()
    for p, gradient in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, gradient, rtol=0, atol=0)


def test_a_closure_that_raises_leaves_values_and_versions_as_they_were():
    params, func = _closure_problem()
    before = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    calls = []

    def fails_at_the_displaced_point() -> torch.Tensor:
        calls.append(params[0].detach().clone())
        if len(calls) > 1:  # the first evaluation is at theta, the second displaced
            raise RuntimeError("broken closure")
        return func()

    operator = curvop.FiniteDifferenceHessianOperator.from_function(
        fails_at_the_displaced_point, params
    )
    with pytest.raises(RuntimeError, match="broken closure"):
        operator.apply(torch.ones(operator.shape[0], dtype=F64))
    assert len(calls) == 2 and not torch.equal(calls[1], before[0])  # raised while displaced
    assert [p._version for p in params] == versions
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
