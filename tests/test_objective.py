"""The objective (curvop.objective): the loss of one batch as a function of the parameters.

Closures evaluated at displaced points and restored bitwise; the model's state (parameters,
buffers, training mode, ``.grad``, the global random state) never touched, dropout drawing one
mask; the model, its parameters, its output and the loss checked, and a loss that raises
explained (structured outputs, swapped arguments, targets of the wrong length or shape, another
dtype); attention made twice differentiable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import (
    Case,
    assert_model_unchanged,
    build_operator,
    dense_ggn,
    dense_hessian,
    make_case,
    model_snapshot,
    relative_error,
)
from torch import nn

import curvop
from curvop import (
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
    ParamLayout,
)

F64 = torch.float64


# ------------------------------------------ closures: displaced points, parameters restored bitwise
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


def test_from_function_matches_model_operators():
    case = make_case("mlp", "ce", "mean", (11,))
    x, y = case.data
    params = list(case.model.parameters())

    def loss():
        return case.loss_fn(case.model(x), y)

    truth = dense_hessian(case).numpy()
    snapshot = model_snapshot(case.model)
    exact = HessianOperator.from_function(loss, params)
    approx = FiniteDifferenceHessianOperator.from_function(loss, params)
    assert relative_error(exact.to_dense(), truth) < 1e-12
    assert relative_error(approx.to_dense(), truth) < 1e-6
    assert_model_unchanged(case.model, snapshot)


def test_from_function_restores_parameters_bitwise_on_exception():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:  # fails on the perturbed evaluation
            raise KeyError("boom")
        return (w**3).sum()

    op = FiniteDifferenceHessianOperator.from_function(flaky, [w])
    with pytest.raises(KeyError, match="boom"):
        op @ np.ones(4)
    assert torch.equal(w.detach(), before)


# --------------------------------------------------------------------- the model and its parameters
def test_parameter_subset_is_the_sub_block():
    full = make_case("mlp", "mse", "mean", (4, 4, 3))
    sub = make_case("mlp", "mse", "mean", (4, 4, 3), subset=True)
    full_dense = build_operator("hessian", full).to_dense()
    layout = ParamLayout(list(full.model.parameters()))
    index = np.concatenate(
        [
            np.arange(start, start + numel)
            for (name, _), start, numel in zip(
                full.model.named_parameters(),
                np.cumsum([0, *layout.numels[:-1]]),
                layout.numels,
                strict=True,
            )
            if name.endswith("weight")
        ]
    )
    np.testing.assert_allclose(
        build_operator("hessian", sub).to_dense(), full_dense[np.ix_(index, index)], atol=1e-12
    )


# ------------------------------------------------------------- the output: the tensor the loss sees
class _Logits(nn.Module):
    """A linear classifier whose output wraps its logits: a dict, a tuple or an object."""

    def __init__(self, wrap):
        super().__init__()
        self.linear, self.wrap = nn.Linear(4, 3).double(), wrap

    def forward(self, x: torch.Tensor):
        return self.wrap(self.linear(x), x)


@dataclass
class _ModelOutput:
    """Like a Hugging Face output: attributes, some of them None."""

    loss: torch.Tensor | None
    logits: torch.Tensor


def _classification(size: int = 8):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, 4, generator=generator, dtype=F64)
    return x, torch.randint(0, 3, (size,), generator=generator)


def _product_error(model, loss_fn, data, error_type, **options) -> BaseException:
    operator = curvop.HessianOperator(model, loss_fn, data, **options)
    with pytest.raises(error_type) as raised:
        operator.apply(torch.ones(operator.shape[0], dtype=F64))
    return raised.value


STRUCTURED_OUTPUTS = {
    "dict": (
        lambda logits, x: {"hidden": x, "logits": logits},
        r"output \(dict with keys \['hidden', 'logits'\]\) instead of a tensor.*"
        r'pass output="logits" .*--output logits',
        "logits",
    ),
    "tuple": (
        lambda logits, x: (logits, x),
        r"output \(tuple of 2 values\) instead of a tensor.*pass output=0 .*--output 0",
        0,
    ),
    "object": (
        lambda logits, x: _ModelOutput(None, logits),
        r"output \(_ModelOutput with tensor attributes \['logits'\]\).*pass output=\"logits\"",
        "logits",
    ),
}


@pytest.mark.parametrize(
    ("wrap", "message", "selector"), STRUCTURED_OUTPUTS.values(), ids=STRUCTURED_OUTPUTS.keys()
)
def test_an_output_that_is_not_a_tensor_names_the_selector(wrap, message, selector):
    data = _classification()
    model = _Logits(wrap)
    error = _product_error(model, nn.CrossEntropyLoss(), data, TypeError)
    assert re.search(message, str(error)) and str(error).startswith("batch 0: loss_fn")
    assert isinstance(error.__cause__, TypeError) and "must be Tensor" in str(error.__cause__)
    selected = curvop.HessianOperator(model, nn.CrossEntropyLoss(), data, output=selector)
    reference = curvop.HessianOperator(model.linear, nn.CrossEntropyLoss(), data)
    torch.testing.assert_close(selected.to_dense(), reference.to_dense(), rtol=0, atol=0)


def test_an_output_without_a_floating_tensor_suggests_a_callable():
    model = _Logits(lambda logits, x: {"labels": logits.argmax(1)})
    error = _product_error(model, nn.CrossEntropyLoss(), _classification(), TypeError)
    assert "pass output=a callable that returns the tensor" in str(error)


# --------------------------------------------------------------------- the loss
def test_a_loss_class_instead_of_an_instance_is_rejected_at_construction():
    with pytest.raises(TypeError, match=r"got the class nn\.CrossEntropyLoss; pass an instance: "):
        curvop.HessianOperator(nn.Linear(4, 3), nn.CrossEntropyLoss, _classification())


def test_swapped_loss_arguments_are_named():
    cross_entropy = nn.CrossEntropyLoss()
    model = nn.Linear(4, 3).double()
    error = _product_error(
        model, lambda targets, output: cross_entropy(output, targets), _classification(), TypeError
    )
    assert re.search(
        r"batch 0: loss_fn raised on \(output, targets\) but works on \(targets, output\): it is "
        r"called as loss_fn\(output, targets\).*its arguments look swapped",
        str(error),
    )
    assert "torch.int64, shape (8,)" in str(error) and "torch.float64, shape (8, 3)" in str(error)
    assert isinstance(error.__cause__, NotImplementedError)


def test_a_loss_error_on_integer_targets_that_is_not_a_swap_is_left_alone():
    x, _ = _classification()
    out_of_range = torch.full((8,), 5)
    error = _product_error(
        nn.Linear(4, 3).double(), nn.CrossEntropyLoss(), (x, out_of_range), IndexError
    )
    assert "Target 5 is out of bounds" in str(error)


# --------------------------------------- batches that do not fit the model: dtypes, lengths, shapes
def test_targets_that_do_not_broadcast_name_both_shapes():
    x = torch.randn(40, 4, dtype=F64)
    with pytest.warns(UserWarning, match="target size"):  # torch warns, then fails to broadcast
        error = _product_error(nn.Linear(4, 3).double(), nn.MSELoss(), (x, x[:, 0]), ValueError)
    assert re.search(
        r"batch 0: the targets have shape \(40,\) but the model's output \(40, 3\), and loss_fn "
        r"raised RuntimeError: The size of tensor a.*give targets of the output's shape \(40, 3\) "
        r"\(one value per output; for class labels, one-hot targets F.one_hot\(labels, 3\)",
        str(error),
    )
    assert isinstance(error.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("outputs", "targets_shape", "fix"),
    [(1, (40,), r"\(40, 1\): targets.unsqueeze\(-1\)$"), (3, (40, 1), r"\(40, 3\)$")],
)
@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.functional.l1_loss])
def test_targets_that_an_elementwise_loss_would_broadcast_are_rejected(
    outputs, targets_shape, fix, loss_fn
):
    x = torch.randn(40, 4, dtype=F64)
    data = (x, torch.randn(targets_shape, dtype=F64))
    with pytest.warns(UserWarning, match="target size"):  # torch only warns, and broadcasts
        error = _product_error(nn.Linear(4, outputs).double(), loss_fn, data, ValueError)
    shapes = f"the targets have shape {targets_shape} but the model's output (40, {outputs})"
    assert shapes in str(error) and "loss_fn would broadcast them" in str(error)
    assert re.search(fix, str(error))


# ------------------------------------------------------------------ attention: twice differentiable
class TinyAttention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention, whose fused CPU/GPU backends have
    no double backward (a Hessian product raised "derivative ... not implemented")."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (batch, tokens, 4) -> two heads of 2 -> (batch * tokens, 3)
        heads = [t.unflatten(-1, (2, 2)).transpose(1, 2) for t in self.qkv(x).split(4, dim=-1)]
        y = nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
        return self.head(y.transpose(1, 2).flatten(2)).flatten(0, 1)


@pytest.mark.parametrize("cls", [HessianOperator, GaussNewtonOperator])
def test_scaled_dot_product_attention_models_have_exact_products(cls):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyAttention().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    case = Case("attention", model, nn.CrossEntropyLoss(), (x, y), "mean")
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):  # the truth too
        truth = (dense_hessian if cls is HessianOperator else dense_ggn)(case).numpy()
    assert relative_error(cls(model, nn.CrossEntropyLoss(), (x, y)).to_dense(), truth) < 1e-10
