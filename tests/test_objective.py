"""The objective (curvop.objective): the loss of one batch as a function of the parameters.

Closures evaluated at displaced points and restored bitwise; the model's state (parameters,
buffers, training mode, ``.grad``, the global random state) never touched, dropout drawing one
mask; the model, its parameters, its output and the loss checked, and a loss that raises
explained (structured outputs, swapped arguments, targets of the wrong length or shape, another
dtype); attention made twice differentiable.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import (
    OPERATOR_CLASSES,
    OPERATOR_IDS,
    TINY_N,
    Case,
    assert_model_unchanged,
    build_operator,
    by_operator,
    dense_ggn,
    dense_hessian,
    make_case,
    model_snapshot,
    random_vector,
    regression_data,
    relative_error,
    small_mlp,
    split_batches,
    tiny_batch,
    tiny_closure,
    tiny_linear,
)
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import curvop
from curvop import (
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
    ParamLayout,
    approximate_hvp,
    exact_hvp,
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


class Boom(Exception):
    """A user error that must reach the caller untouched."""


def closure_failing_on_call(number: int, params: list[torch.Tensor], x: torch.Tensor):
    calls = {"count": 0}

    def func() -> torch.Tensor:
        calls["count"] += 1
        if calls["count"] == number:
            raise Boom(f"func failed on call {number}")
        return (torch.tanh(x @ params[0]) ** 2).sum() + (params[1] ** 4).sum()

    return func


CLOSURE_PRODUCTS = {
    "fd-operator": lambda f, p, v: FiniteDifferenceHessianOperator.from_function(f, p).apply(v),
    "hessian-operator": lambda f, p, v: HessianOperator.from_function(f, p).apply(v),
    "approximate_hvp": lambda f, p, v: approximate_hvp(f, p, [v[:12].reshape(4, 3), v[12:]], 2),
    "exact_hvp": lambda f, p, v: exact_hvp(f, p, [v[:12].reshape(4, 3), v[12:]]),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    ("product", "failing_call"),
    [("fd-operator", 1), ("fd-operator", 2), ("approximate_hvp", 2), ("approximate_hvp", 3)]
    + [("hessian-operator", 1), ("exact_hvp", 1)],
)
def test_closure_parameters_are_restored_bitwise_when_func_raises(product, failing_call, dtype):
    """Finite differences displace the parameters in place; a failure while they sit at
    ``theta + h v`` (call 1), ``theta - h v`` (call 2) or in a later sample (call 3) must still
    restore them bitwise."""
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(4, 3, generator=generator, dtype=dtype).requires_grad_(),
        torch.randn(3, generator=generator, dtype=dtype).requires_grad_(),
    ]
    saved = [p.detach().clone() for p in params]
    func = closure_failing_on_call(failing_call, params, torch.randn(5, 4, dtype=dtype))
    with pytest.raises(Boom, match=f"^func failed on call {failing_call}$"):
        CLOSURE_PRODUCTS[product](func, params, torch.randn(15, dtype=dtype))
    for p, original in zip(params, saved, strict=True):
        assert torch.equal(p.detach(), original) and p.requires_grad and p.grad is None


# -------------------------- the model's state: parameters, buffers, training mode, the random state
def test_dropout_products_agree_and_leave_the_global_rng_alone():
    x, y = regression_data()
    model = small_mlp(nn.Dropout(0.5), width=16).train()
    batches = split_batches(x, y, [5, 7])
    with pytest.warns(UserWarning):
        ops = [cls(model, nn.MSELoss(), batches) for cls in OPERATOR_CLASSES]
    V = random_vector(ops[0], k=2)
    state = torch.get_rng_state()
    products = [op.apply(V) for op in ops]
    for op, product in zip(ops, products, strict=True):
        assert torch.equal(op.apply(V), product)  # the same mask in every product
        assert op.check_deterministic() == 0.0
    assert torch.equal(torch.get_rng_state(), state)
    # every evaluation inside a product shares the mask: finite differences match the Hessian
    hessian_product, _, fd_product = products
    assert (fd_product - hessian_product).norm() <= 1e-6 * hessian_product.norm()
    # and the mask is really active: the curvature differs from the eval-mode network's
    eval_product = HessianOperator(model.eval(), nn.MSELoss(), batches).apply(V)
    assert (eval_product - hessian_product).norm() > 1e-2 * hessian_product.norm()


def bn_model() -> nn.Module:
    return small_mlp(nn.BatchNorm1d(5)).train()


def train_mode_losses(model: nn.Module, loss_fn, batches):
    """The total mean loss as a function of the flat parameters, and of each batch's output."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    counts = [len(y) for _, y in batches]
    weights = [c / sum(counts) for c in counts]

    def output(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = flat.split([s.numel() for s in shapes])
        state = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        state.update({n: b.clone() for n, b in model.named_buffers()})  # never the model's own
        return functional_call(model, state, (x,))

    def total(flat: torch.Tensor) -> torch.Tensor:
        return sum(
            w * loss_fn(output(flat, x), y) for w, (x, y) in zip(weights, batches, strict=True)
        )

    return output, total, weights


def dense_train_mode_hessian(model, loss_fn, batches) -> np.ndarray:
    _, total, _ = train_mode_losses(model, loss_fn, batches)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return hessian(total, flat).numpy()


def dense_train_mode_ggn(model, loss_fn, batches) -> np.ndarray:
    output, _, weights = train_mode_losses(model, loss_fn, batches)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ggn = np.zeros((flat.numel(), flat.numel()))
    for w, (x, y) in zip(weights, batches, strict=True):
        out = output(flat, x).detach()
        J = jacobian(lambda f, x=x: output(f, x), flat).reshape(out.numel(), -1)
        H = hessian(lambda o, y=y, s=out.shape: loss_fn(o.reshape(s), y), out.reshape(-1))
        ggn += w * (J.T @ H @ J).numpy()
    return ggn


@pytest.mark.parametrize(
    ("cls", "truth_of", "tolerance"),
    [
        (HessianOperator, dense_train_mode_hessian, 1e-10),
        (GaussNewtonOperator, dense_train_mode_ggn, 1e-10),
        (FiniteDifferenceHessianOperator, dense_train_mode_hessian, 1e-6),
    ],
    ids=OPERATOR_IDS,
)
def test_batchnorm_in_training_mode_uses_batch_statistics_and_keeps_running_ones(
    cls, truth_of, tolerance
):
    x, y = regression_data()
    batches = split_batches(x, y, [5, 4, 3])
    model = bn_model()
    with torch.no_grad():  # running statistics that differ from the batch statistics
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    snapshot = model_snapshot(model)
    op = cls(model, nn.MSELoss(), batches)
    dense = op.to_dense()
    op.apply(random_vector(op))
    assert_model_unchanged(model, snapshot)
    assert int(model[1].num_batches_tracked) == 0
    truth = truth_of(model, nn.MSELoss(), batches)
    assert np.linalg.norm(dense - truth) <= tolerance * np.linalg.norm(truth)
    eval_truth = truth_of(model.eval(), nn.MSELoss(), batches)
    assert np.linalg.norm(eval_truth - truth) > 1e-2 * np.linalg.norm(truth)


def busy_model() -> nn.Module:
    """BatchNorm, dropout, a frozen layer and a stale ``.grad``: all must survive products."""
    model = small_mlp(nn.BatchNorm1d(5), nn.Dropout(0.2)).train()
    model[0].bias.requires_grad_(False)
    model[-1].weight.grad = torch.ones_like(model[-1].weight)
    return model


@by_operator
def test_model_is_unchanged_after_every_product(cls):
    x, y = regression_data()
    model = busy_model()
    snapshot = model_snapshot(model)
    with pytest.warns(UserWarning, match="dropout"):
        op = cls(model, nn.MSELoss(), split_batches(x, y, [7, 5]))
    for V in (random_vector(op), random_vector(op, k=3)):
        op.apply(V)
        op.matmat(V.reshape(op.shape[0], -1).numpy())
        assert_model_unchanged(model, snapshot)
    assert torch.equal(model[-1].weight.grad, torch.ones_like(model[-1].weight))


BOOM_MESSAGES = {
    "model": "model failed on the short batch",
    "loss": "loss failed on the short batch",
    "data": "data failed on batch 1",
}


class RaisesOnBatchOfThree(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 3:
            raise Boom(BOOM_MESSAGES["model"])
        return x


def loss_raising_on_batch_of_three(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.shape[0] == 3:
        raise Boom(BOOM_MESSAGES["loss"])
    return nn.functional.mse_loss(output, target)


class RaisesAfterOneBatch:
    """Re-iterable data whose second batch fails to load."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        yield self.batches[0]
        raise Boom(BOOM_MESSAGES["data"])


@by_operator
@pytest.mark.parametrize("culprit", ["model", "loss", "data"])
def test_an_exception_midway_propagates_unchanged_and_leaves_the_model_alone(cls, culprit):
    x, y = regression_data()
    batches = split_batches(x, y, [9, 3])
    model = small_mlp(RaisesOnBatchOfThree()) if culprit == "model" else busy_model()
    loss_fn = loss_raising_on_batch_of_three if culprit == "loss" else nn.MSELoss()
    data = RaisesAfterOneBatch(batches) if culprit == "data" else batches
    snapshot = model_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # busy_model's dropout
        op = cls(model, loss_fn, data)
    with pytest.raises(Boom) as info:
        op.apply(random_vector(op, k=2))
    assert type(info.value) is Boom and str(info.value) == BOOM_MESSAGES[culprit]
    assert_model_unchanged(model, snapshot)


# --------------------------------------------------------------------- the model and its parameters
@by_operator
def test_model_must_be_a_module(cls):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        cls(lambda x: x, nn.MSELoss(), tiny_batch())


@by_operator
def test_params_must_belong_to_the_model(cls):
    stranger = nn.Parameter(torch.zeros(2, dtype=F64))
    with pytest.raises(
        ValueError, match=r"params\[0\] \(shape \(2,\)\) is not a parameter of the model"
    ):
        cls(tiny_linear(), nn.MSELoss(), tiny_batch(), [stranger])


@by_operator
def test_params_must_require_grad(cls):
    model = tiny_linear()
    model.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(2,\)\) does not require grad"):
        cls(model, nn.MSELoss(), tiny_batch(), [model.weight, model.bias])


def test_params_must_not_repeat_or_be_empty():
    model = tiny_linear()
    with pytest.raises(ValueError, match="params must not contain the same parameter twice"):
        HessianOperator(model, nn.MSELoss(), tiny_batch(), [model.weight, model.weight])
    with pytest.raises(ValueError, match="params must contain at least one parameter"):
        HessianOperator(model, nn.MSELoss(), tiny_batch(), [])
    with pytest.raises(TypeError, match="params must be a tensor or a sequence of tensors"):
        HessianOperator(model, nn.MSELoss(), tiny_batch(), [model.weight, "bias"])


def test_a_frozen_model_has_no_default_params():
    model = tiny_linear().requires_grad_(False)
    with pytest.raises(ValueError, match="params: the model has no parameters that require grad"):
        HessianOperator(model, nn.MSELoss(), tiny_batch())


def test_closure_params_must_require_grad_and_not_repeat():
    func, (w, b) = tiny_closure()
    with pytest.raises(ValueError, match=r"params\[1\] .* does not require grad"):
        HessianOperator.from_function(func, [w, b.detach()])
    with pytest.raises(ValueError, match="params must not contain the same parameter twice"):
        FiniteDifferenceHessianOperator.from_function(func, [w, w])
    with pytest.raises(TypeError, match="func must be callable, got int"):
        HessianOperator.from_function(3, [w])


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


class HuggingFaceLike(nn.Module):
    """Returns a dict, as Hugging Face models do (their outputs also allow ``.logits``)."""

    def __init__(self):
        super().__init__()
        self.layer = tiny_linear()

    def forward(self, x):
        return {"logits": self.layer(x), "hidden": x}


@pytest.mark.parametrize("output", ["logits", lambda out: out["logits"]])
@by_operator
def test_output_picks_the_tensor_from_a_dict_output(cls, output):
    model = HuggingFaceLike()
    picked = cls(model, nn.MSELoss(), tiny_batch(), output=output)
    plain = cls(model.layer, nn.MSELoss(), tiny_batch())
    v = torch.randn(TINY_N, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(picked.apply(v), plain.apply(v), rtol=1e-10, atol=1e-12)


def test_output_by_index_and_attribute():
    class TupleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = tiny_linear()

        def forward(self, x):
            return x, self.layer(x)

    plain = GaussNewtonOperator(tiny_linear(), nn.MSELoss(), tiny_batch())
    model = TupleModel()
    model.layer.load_state_dict(plain._objective.model.state_dict())
    by_index = GaussNewtonOperator(model, nn.MSELoss(), tiny_batch(), output=1)
    v = torch.ones(TINY_N, dtype=F64)
    torch.testing.assert_close(by_index.apply(v), plain.apply(v))

    class WithLogits(nn.Module):  # an output object with an attribute, like transformers' outputs
        def __init__(self):
            super().__init__()
            self.layer = model.layer

        def forward(self, x):
            return type("Output", (), {"logits": self.layer(x)})()

    by_attribute = GaussNewtonOperator(WithLogits(), nn.MSELoss(), tiny_batch(), output="logits")
    torch.testing.assert_close(by_attribute.apply(v), plain.apply(v))


def test_an_output_that_selects_nothing_says_what_there_is():
    op = HessianOperator(HuggingFaceLike(), nn.MSELoss(), tiny_batch(), output="scores")
    with pytest.raises(
        ValueError, match=r"output='scores' does not select .* \(keys: \['logits', 'hidden'\]\)"
    ):
        op.apply(torch.zeros(TINY_N, dtype=F64))
    with pytest.raises(TypeError, match="output must be None, a key"):
        HessianOperator(HuggingFaceLike(), nn.MSELoss(), tiny_batch(), output=1.5)


# --------------------------------------------------------------------- the loss
@by_operator
def test_loss_fn_must_be_callable(cls):
    with pytest.raises(TypeError, match="loss_fn must be callable, got str"):
        cls(tiny_linear(), "mse", tiny_batch())


def test_a_loss_class_instead_of_an_instance_is_rejected_at_construction():
    with pytest.raises(TypeError, match=r"got the class nn\.CrossEntropyLoss; pass an instance: "):
        curvop.HessianOperator(nn.Linear(4, 3), nn.CrossEntropyLoss, _classification())


@by_operator
def test_a_non_scalar_loss_raises_at_the_first_product(cls):
    def per_sample(output, target):
        return ((output - target) ** 2).sum(1)

    op = cls(tiny_linear(), per_sample, tiny_batch())  # constructing runs no product
    with pytest.raises(ValueError, match=r"loss of batch 0 must be a scalar, got shape \(6,\)"):
        op.apply(torch.zeros(TINY_N, dtype=F64))


def test_a_loss_that_is_not_a_tensor_is_named():
    op = HessianOperator(tiny_linear(), lambda output, target: 1.0, tiny_batch())
    with pytest.raises(TypeError, match="loss of batch 0 must be a scalar tensor, got float"):
        op.apply(torch.zeros(TINY_N, dtype=F64))


def test_a_closure_returning_a_non_scalar_raises_at_the_first_product():
    w = torch.ones(3, dtype=F64, requires_grad=True)
    op = HessianOperator.from_function(lambda: w * 2, [w])
    with pytest.raises(
        ValueError, match=r"loss returned by func must be a scalar, got shape \(3,\)"
    ):
        op.apply(torch.zeros(3, dtype=F64))


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
@by_operator
def test_float64_data_with_a_float32_model_names_the_batch_and_the_fix(cls):
    model = nn.Linear(3, 2)  # float32
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2)
    # (FD differences in float64 by default, converting everything: only native sees a mismatch)
    options = {"precision": "native"} if cls is FiniteDifferenceHessianOperator else {}
    op = cls(model, nn.MSELoss(), [(x[:4].float(), y[:4]), (x[4:], y[4:])], **options)
    with pytest.raises(
        TypeError, match=r"batch 1: the inputs are float64 but the model's parameters are float32"
    ) as info:
        op.apply(torch.zeros(op.shape[0]))
    assert "x.to(torch.float32)" in str(info.value) and "model.to(torch.float64)" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original, chained


@by_operator
def test_targets_of_the_wrong_length_name_the_batch(cls):
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 4, (8,))
    op = cls(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:7])])
    with pytest.raises(
        ValueError, match=r"batch 1: the model returned 4 outputs .* the targets hold 3"
    ) as info:
        op.apply(torch.zeros(op.shape[0], dtype=F64))
    assert info.value.__cause__ is not None


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
