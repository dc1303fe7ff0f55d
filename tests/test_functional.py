"""The reference functional API (curvop.functional) against the same dense matrices as the
operators, and the arguments it checks."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    F64,
    TINY_N,
    assert_model_unchanged,
    dense_ggn,
    dense_hessian,
    make_case,
    model_snapshot,
    tiny_batch,
    tiny_closure,
    tiny_linear,
)
from torch import nn

from curvop import (
    ParamLayout,
    approximate_hvp,
    exact_hvp,
    gauss_newton_product,
    hessian_trace,
    model_hvp,
)


@pytest.fixture
def problem():
    case = make_case("mlp", "ce", "mean", (9,))
    x, y = case.data
    params = list(case.model.parameters())
    layout = ParamLayout(params)
    v = torch.randn(layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return case, x, y, params, layout, v


# ----------------------------------------------------------------- products against the dense truth
def test_exact_and_model_hvp(problem):
    case, x, y, params, layout, v = problem
    expected = dense_hessian(case) @ v
    snapshot = model_snapshot(case.model)

    result = exact_hvp(lambda: case.loss_fn(case.model(x), y), params, layout.unflatten(v))
    assert isinstance(result, list | tuple) and len(result) == len(params)
    torch.testing.assert_close(layout.flatten(result), expected)

    result = model_hvp(case.model, case.loss_fn, x, y, layout.unflatten(v))
    torch.testing.assert_close(layout.flatten(result), expected)
    assert_model_unchanged(case.model, snapshot)


def test_gauss_newton_product(problem):
    case, x, y, params, layout, v = problem
    result = gauss_newton_product(case.model, case.loss_fn, x, y, layout.unflatten(v))
    torch.testing.assert_close(layout.flatten(result), dense_ggn(case) @ v)


def test_gauss_newton_product_does_not_loop_over_outputs(problem):
    """A constant number of forward passes, whatever the number of outputs (3 x 9 here)."""
    case, x, y, params, layout, v = problem
    calls = []
    handle = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        gauss_newton_product(case.model, case.loss_fn, x, y, layout.unflatten(v))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_approximate_hvp_accuracy_damping_and_bitwise_restore(problem):
    case, x, y, params, layout, v = problem
    before = [p.detach().clone() for p in params]
    expected = dense_hessian(case) @ v
    result = approximate_hvp(lambda: case.loss_fn(case.model(x), y), params, layout.unflatten(v))
    assert torch.linalg.norm(layout.flatten(result) - expected) / torch.linalg.norm(expected) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))

    damped = approximate_hvp(
        lambda: case.loss_fn(case.model(x), y), params, layout.unflatten(v), damping=0.5
    )
    torch.testing.assert_close(layout.flatten(damped), layout.flatten(result) + 0.5 * v)


def test_approximate_hvp_restores_parameters_when_func_raises():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()

    def broken():
        if not torch.equal(w.detach(), before):
            raise ArithmeticError("perturbed evaluation failed")
        return (w**4).sum()

    with pytest.raises(ArithmeticError, match="perturbed evaluation failed"):
        approximate_hvp(broken, [w], torch.ones(3, dtype=torch.float64))
    assert torch.equal(w.detach(), before)


def test_approximate_hvp_num_samples_averages_a_stochastic_function():
    """E[H] of f(w) = a * w^2 / 2 with a ~ U(0, 2) is 1; each sample draws its own a."""
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)

    def noisy():
        a = 2 * torch.rand(1, dtype=torch.float64)
        return (a * w**2 / 2).sum()

    one = approximate_hvp(noisy, [w], torch.ones(1, dtype=torch.float64))
    many = approximate_hvp(noisy, [w], torch.ones(1, dtype=torch.float64), num_samples=400)
    assert isinstance(one, torch.Tensor) and one.shape == (1,)
    assert abs(float(many) - 1.0) < 0.1


def test_single_parameter_returns_single_tensor_and_create_graph():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([1.0, -1.0], dtype=torch.float64)
    hv = exact_hvp(lambda: (w**3).sum(), [w], v, create_graph=True)
    assert isinstance(hv, torch.Tensor)
    torch.testing.assert_close(hv, 6 * w.detach() * v)
    assert hv.requires_grad  # third derivative: d/dw sum(6 w v) = 6 v
    (third,) = torch.autograd.grad(hv.sum(), w)
    torch.testing.assert_close(third, 6 * v)


def test_hessian_trace_unbiased_dtype_and_private_rng():
    diag = torch.linspace(0.5, 3.0, 40, dtype=torch.float64)
    w = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    A = torch.diag(diag) + 0.1 * torch.ones(40, 40, dtype=torch.float64)

    def quadratic():
        return 0.5 * w @ A @ w

    truth = float(torch.trace(A))
    state = torch.get_rng_state()
    estimate = hessian_trace(quadratic, [w], num_samples=50, seed=0)
    sparse = [
        hessian_trace(quadratic, [w], num_samples=200, sparse=True, seed=s) for s in range(20)
    ]
    assert torch.equal(state, torch.get_rng_state())
    assert abs(estimate - truth) / truth < 0.05
    assert (
        abs(sum(sparse) / len(sparse) - truth) / truth < 0.02
    )  # unbiased: the reference's was 10%
    assert hessian_trace(quadratic, [w], num_samples=5, seed=7) == hessian_trace(
        quadratic, [w], num_samples=5, seed=7
    )


def test_model_hvp_uses_all_parameters_of_float32_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    x, y = torch.randn(5, 2), torch.randn(5, 1)
    v = [torch.randn_like(p) for p in model.parameters()]
    result = model_hvp(model, nn.MSELoss(), x, y, v)
    assert len(result) == 4 and all(r.dtype == torch.float32 for r in result)


def test_create_graph_with_several_parameters_gives_third_derivatives():
    """The graph of Hv must survive the accumulation over batches and parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def loss():
        return nn.functional.mse_loss(model(x), y)

    gradient = torch.autograd.grad(loss(), params, create_graph=True)
    reference = torch.autograd.grad(
        sum((g * t).sum() for g, t in zip(gradient, v, strict=True)), params, create_graph=True
    )
    expected = torch.autograd.grad(sum(r.sum() for r in reference), params)
    for result in (
        exact_hvp(loss, params, v, create_graph=True),
        model_hvp(model, nn.MSELoss(), x, y, v, create_graph=True),
    ):
        for got, want in zip(result, reference, strict=True):
            torch.testing.assert_close(got, want)
        third = torch.autograd.grad(sum(r.sum() for r in result), params)
        for got, want in zip(third, expected, strict=True):
            torch.testing.assert_close(got, want)
    ggn = gauss_newton_product(model, nn.MSELoss(), x, y, v, create_graph=True)
    assert all(t.requires_grad for t in ggn)


def test_stochastic_closure_draws_fresh_numbers_unless_seeded():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)

    def noisy():
        return (torch.rand(3, dtype=torch.float64) * w**2).sum()

    v = torch.ones(3, dtype=torch.float64)
    assert not torch.equal(approximate_hvp(noisy, [w], v), approximate_hvp(noisy, [w], v))
    torch.testing.assert_close(
        approximate_hvp(noisy, [w], v, seed=3), approximate_hvp(noisy, [w], v, seed=3)
    )
    torch.testing.assert_close(
        exact_hvp(noisy, [w], v, seed=3), approximate_hvp(noisy, [w], v, seed=3)
    )


# --------------------------------------------------------------------- argument checks
def test_model_with_a_frozen_parameter_is_named():
    model = nn.Linear(3, 2).double()
    model.bias.requires_grad_(False)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model.parameters\(\).*\['bias'\]"):
        model_hvp(model, nn.MSELoss(), x, y, [torch.ones(2, 3, dtype=torch.float64)] * 2)


FUNCTIONAL = {
    "exact_hvp": lambda func, params, v: exact_hvp(func, params, v),
    "approximate_hvp": lambda func, params, v: approximate_hvp(func, params, v),
}


@pytest.mark.parametrize("function", FUNCTIONAL)
def test_functional_v_of_the_wrong_count_or_shape(function):
    func, params = tiny_closure()
    with pytest.raises(ValueError, match="v must hold 2 tensors, got 1"):
        FUNCTIONAL[function](func, params, [torch.zeros(2, 3, dtype=F64)])
    with pytest.raises(ValueError, match=r"v\[1\] must have shape \(3,\), got \(4,\)"):
        FUNCTIONAL[function](
            func, params, [torch.zeros(2, 3, dtype=F64), torch.zeros(4, dtype=F64)]
        )
    with pytest.raises(TypeError, match="v must be a tensor or a sequence of tensors, got float"):
        FUNCTIONAL[function](func, params, 1.0)


@pytest.mark.parametrize("function", FUNCTIONAL)
def test_functional_v_of_another_dtype(function):
    func, params = tiny_closure()
    with pytest.raises(
        ValueError, match="v must have dtype torch.float64 .* got dtype torch.float32"
    ):
        FUNCTIONAL[function](func, params, [torch.zeros(2, 3), torch.zeros(3)])


@pytest.mark.parametrize("product", [model_hvp, gauss_newton_product])
def test_model_functions_validate_v_and_y(product):
    x, y = tiny_batch()
    with pytest.raises(ValueError, match=r"v\[0\] must have shape \(2, 3\), got \(3, 2\)"):
        product(tiny_linear(), nn.MSELoss(), x, y, [torch.zeros(3, 2, dtype=F64), torch.zeros(2)])
    with pytest.raises(TypeError, match="y must be a tensor of targets, got list"):
        product(tiny_linear(), nn.MSELoss(), x, y.tolist(), torch.zeros(TINY_N, dtype=F64))


@pytest.mark.parametrize("damping", [float("nan"), float("inf"), "0.1", None])
def test_approximate_hvp_rejects_a_bad_damping(damping):
    func, params = tiny_closure()
    with pytest.raises(ValueError, match="damping must be a finite real number"):
        approximate_hvp(
            func, params, [torch.zeros(2, 3, dtype=F64), torch.zeros(3, dtype=F64)], damping=damping
        )


@pytest.mark.parametrize("num_samples", [0, -1, 1.5, True])
def test_sample_counts_must_be_positive_integers(num_samples):
    func, params = tiny_closure()
    v = [torch.zeros(2, 3, dtype=F64), torch.zeros(3, dtype=F64)]
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        approximate_hvp(func, params, v, num_samples=num_samples)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        hessian_trace(func, params, num_samples=num_samples)
