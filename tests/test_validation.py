"""Bad input to the core and functional API: one test per case, each error naming the argument.

Each message must say which argument is wrong and what was expected (and, for shapes, received).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvop import (
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
    ParamLayout,
    approximate_hvp,
    exact_hvp,
    gauss_newton_product,
    hessian_trace,
    model_hvp,
)

F64 = torch.float64
OPERATORS = [HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator]
by_operator = pytest.mark.parametrize("cls", OPERATORS, ids=["hessian", "ggn", "fd"])
N = 3 * 2 + 2  # parameters of nn.Linear(3, 2)


def linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(3, 2).double()


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=generator, dtype=F64), torch.randn(
        n, 2, generator=generator, dtype=F64
    )


def operator(cls=HessianOperator):
    return cls(linear(), nn.MSELoss(), batch())


def closure() -> tuple:
    """``func`` and its two parameters (a (2, 3) matrix and a (3,) vector)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=generator, dtype=F64, requires_grad=True)
    b = torch.randn(3, generator=generator, dtype=F64, requires_grad=True)
    return (lambda: (torch.tanh(w.sum(0) * b) ** 2).sum()), [w, b]


# --------------------------------------------------------------------- vectors of the operators
@pytest.mark.parametrize("shape", [(N - 1,), (N + 1, 2), (N, 2, 1), ()])
def test_apply_rejects_a_wrong_shape_stating_expected_and_received(shape):
    with pytest.raises(ValueError, match=rf"V must have shape \({N},\) or \({N}, k\), got"):
        operator().apply(torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("shape", [(N - 1,), (N, 2)])
def test_matvec_rejects_a_wrong_shape_stating_expected_and_received(shape):
    expected = rf"x must have shape \({N},\) or \({N}, 1\), got \({', '.join(map(str, shape))},?\)"
    with pytest.raises(ValueError, match=expected):
        operator().matvec(np.zeros(shape))


def test_matmul_rejects_a_wrong_length():
    with pytest.raises(ValueError, match=rf"x must have shape \({N},\) or \({N}, 1\), got \(5,\)"):
        operator() @ np.zeros(5)


def test_matmat_rejects_a_wrong_shape_stating_expected_and_received():
    with pytest.raises(ValueError, match=rf"X must have shape \({N}, k\), got \(5, 2\)"):
        operator().matmat(np.zeros((5, 2)))


def test_rmatvec_rejects_a_wrong_length():
    with pytest.raises(ValueError, match=rf"x must have shape \({N},\)"):
        operator().rmatvec(np.zeros(N + 2))


def test_apply_rejects_another_dtype_without_copying():
    with pytest.raises(
        ValueError, match=r"V must have dtype torch.float64 on device cpu, got dtype torch.float32"
    ):
        operator().apply(torch.zeros(N, dtype=torch.float32))


def test_apply_rejects_another_device_without_copying():
    with pytest.raises(ValueError, match=r"V must have dtype .* on device cpu, got .* device meta"):
        operator().apply(torch.zeros(N, dtype=F64, device="meta"))


def test_apply_rejects_numpy():
    with pytest.raises(
        TypeError, match=r"V must be a torch tensor, got a numpy array: for numpy use A @ x"
    ):
        operator().apply(np.zeros(N))


def test_complex_vectors_are_rejected_everywhere():
    op = operator()
    with pytest.raises(TypeError, match="V must be real, got complex"):
        op.apply(torch.zeros(N, dtype=torch.complex128))
    with pytest.raises(TypeError, match="x must be real, got complex"):
        op.matvec(np.zeros(N, dtype=complex))
    with pytest.raises(TypeError, match="X must be real, got complex"):
        op @ np.zeros((N, 2), dtype=complex)
    func, params = closure()
    with pytest.raises(TypeError, match="v must be real, got complex"):
        exact_hvp(func, params, [torch.zeros(2, 3, dtype=torch.complex128), torch.zeros(3)])


def test_a_non_finite_vector_is_named():
    with pytest.raises(ValueError, match="V must be finite"):
        operator().apply(torch.full((N,), float("inf"), dtype=F64))


# --------------------------------------------------------------------- loss and model outputs
@by_operator
def test_a_non_scalar_loss_raises_at_the_first_product(cls):
    def per_sample(output, target):
        return ((output - target) ** 2).sum(1)

    op = cls(linear(), per_sample, batch())  # constructing runs no product
    with pytest.raises(ValueError, match=r"loss of batch 0 must be a scalar, got shape \(6,\)"):
        op.apply(torch.zeros(N, dtype=F64))


def test_a_loss_that_is_not_a_tensor_is_named():
    op = HessianOperator(linear(), lambda output, target: 1.0, batch())
    with pytest.raises(TypeError, match="loss of batch 0 must be a scalar tensor, got float"):
        op.apply(torch.zeros(N, dtype=F64))


def test_a_closure_returning_a_non_scalar_raises_at_the_first_product():
    w = torch.ones(3, dtype=F64, requires_grad=True)
    op = HessianOperator.from_function(lambda: w * 2, [w])
    with pytest.raises(
        ValueError, match=r"loss returned by func must be a scalar, got shape \(3,\)"
    ):
        op.apply(torch.zeros(3, dtype=F64))


def test_ggn_requires_a_tensor_output():
    class DictOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = linear()

        def forward(self, x):
            return {"logits": self.layer(x)}

    op = GaussNewtonOperator(DictOutput(), nn.MSELoss(), batch())
    with pytest.raises(
        TypeError,
        match=r"the model returned a dict with keys \['logits'\].*pass output=\"logits\"",
    ):
        op.apply(torch.zeros(N, dtype=F64))


@by_operator
def test_loss_fn_must_be_callable(cls):
    with pytest.raises(TypeError, match="loss_fn must be callable, got str"):
        cls(linear(), "mse", batch())


@by_operator
def test_model_must_be_a_module(cls):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        cls(lambda x: x, nn.MSELoss(), batch())


# --------------------------------------------------------------------- data
@by_operator
@pytest.mark.parametrize(
    "data",
    [[], DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 2)))],
    ids=["empty-list", "empty-loader"],
)
def test_empty_data_raises_at_construction(cls, data):
    with pytest.raises(ValueError, match="data must contain at least one batch"):
        cls(linear(), nn.MSELoss(), data)


def test_a_batch_without_samples_raises_at_construction():
    with pytest.raises(ValueError, match=r"data must contain at least one sample, got .* \(0, 2\)"):
        HessianOperator(linear(), nn.MSELoss(), (torch.zeros(0, 3), torch.zeros(0, 2)))


@by_operator
@pytest.mark.parametrize(
    "make", [lambda: (b for b in [batch()]), lambda: iter([batch()])], ids=["generator", "iterator"]
)
def test_a_one_shot_iterator_is_rejected(cls, make):
    with pytest.raises(TypeError, match="data must be .* got a one-shot iterator"):
        cls(linear(), nn.MSELoss(), make())


@pytest.mark.parametrize("data", ["xy", {"x": 1}, 3.0], ids=["str", "dict", "float"])
def test_data_that_is_no_batch_collection_is_rejected(data):
    with pytest.raises(TypeError, match="data must be one .*batch"):
        HessianOperator(linear(), nn.MSELoss(), data)


def test_a_malformed_batch_is_named_at_the_first_product():
    op = HessianOperator(linear(), nn.MSELoss(), [batch(), (torch.zeros(2, 3),)])
    with pytest.raises(TypeError, match="batch 1 of data must be an .inputs, targets. tuple"):
        op.apply(torch.zeros(N, dtype=F64))


# --------------------------------------------------------------------- params
@by_operator
def test_params_must_belong_to_the_model(cls):
    stranger = nn.Parameter(torch.zeros(2, dtype=F64))
    with pytest.raises(
        ValueError, match=r"params\[0\] \(shape \(2,\)\) is not a parameter of the model"
    ):
        cls(linear(), nn.MSELoss(), batch(), [stranger])


@by_operator
def test_params_must_require_grad(cls):
    model = linear()
    model.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(2,\)\) does not require grad"):
        cls(model, nn.MSELoss(), batch(), [model.weight, model.bias])


def test_params_must_not_repeat_or_be_empty():
    model = linear()
    with pytest.raises(ValueError, match="params must not contain the same parameter twice"):
        HessianOperator(model, nn.MSELoss(), batch(), [model.weight, model.weight])
    with pytest.raises(ValueError, match="params must contain at least one parameter"):
        HessianOperator(model, nn.MSELoss(), batch(), [])
    with pytest.raises(TypeError, match="params must be a tensor or a sequence of tensors"):
        HessianOperator(model, nn.MSELoss(), batch(), [model.weight, "bias"])


def test_a_frozen_model_has_no_default_params():
    model = linear().requires_grad_(False)
    with pytest.raises(ValueError, match="params: the model has no parameters that require grad"):
        HessianOperator(model, nn.MSELoss(), batch())


def test_closure_params_must_require_grad_and_not_repeat():
    func, (w, b) = closure()
    with pytest.raises(ValueError, match=r"params\[1\] .* does not require grad"):
        HessianOperator.from_function(func, [w, b.detach()])
    with pytest.raises(ValueError, match="params must not contain the same parameter twice"):
        FiniteDifferenceHessianOperator.from_function(func, [w, w])
    with pytest.raises(TypeError, match="func must be callable, got int"):
        HessianOperator.from_function(3, [w])


# --------------------------------------------------------------------- reduction
@by_operator
def test_reduction_contradicting_the_loss_is_rejected(cls):
    with pytest.raises(ValueError, match=r"reduction='mean' contradicts loss_fn.reduction='sum'"):
        cls(linear(), nn.MSELoss(reduction="sum"), batch(), reduction="mean")


@by_operator
def test_reduction_none_is_rejected_naming_its_source(cls):
    with pytest.raises(ValueError, match=r"^loss_fn.reduction must be one of \('mean', 'sum'\)"):
        cls(linear(), nn.MSELoss(reduction="none"), batch())
    with pytest.raises(
        ValueError, match=r"^reduction must be one of \('mean', 'sum'\), got 'none'"
    ):
        cls(linear(), lambda o, t: ((o - t) ** 2).mean(), batch(), reduction="none")


# --------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("scheme", ["backward", "", None])
def test_an_unknown_scheme_is_rejected(scheme):
    with pytest.raises(ValueError, match=r"scheme must be one of \('central', 'forward'\)"):
        FiniteDifferenceHessianOperator(linear(), nn.MSELoss(), batch(), scheme=scheme)
    func, params = closure()
    with pytest.raises(ValueError, match="scheme must be one of"):
        FiniteDifferenceHessianOperator.from_function(func, params, scheme=scheme)


@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), float("inf"), "1e-3", True])
def test_a_bad_step_is_rejected(eps):
    with pytest.raises(ValueError, match=r"eps must be a positive finite real number, got"):
        FiniteDifferenceHessianOperator(linear(), nn.MSELoss(), batch(), eps=eps)


def test_a_valid_step_is_accepted():
    op = FiniteDifferenceHessianOperator(linear(), nn.MSELoss(), batch(), eps=np.float32(1e-4))
    assert op.apply(torch.ones(N, dtype=F64)).isfinite().all()


# --------------------------------------------------------------------- other methods
def test_to_dense_above_max_size_names_the_argument():
    with pytest.raises(ValueError, match=rf"n={N} > max_size=4.*pass max_size={N} or more"):
        operator().to_dense(max_size=4)
    assert operator().to_dense(max_size=N).shape == (N, N)


@pytest.mark.parametrize("max_size", [0, -3, 2.5, True, "big"])
def test_to_dense_rejects_a_bad_max_size(max_size):
    with pytest.raises(ValueError, match="max_size must be a positive integer"):
        operator().to_dense(max_size=max_size)


@pytest.mark.parametrize("rtol", [0, -1.0, float("nan"), "1e-3"])
def test_check_deterministic_rejects_a_bad_rtol(rtol):
    with pytest.raises(ValueError, match="rtol must be a positive finite real number"):
        operator().check_deterministic(rtol=rtol)


def test_check_deterministic_rejects_a_bad_seed():
    with pytest.raises(TypeError, match="seed must be None or an int, got str"):
        operator().check_deterministic(seed="0")


# --------------------------------------------------------------------- ParamLayout
def test_layout_rejects_mixed_dtypes_and_devices():
    with pytest.raises(ValueError, match=r"params must share one dtype .*float32.*float64"):
        ParamLayout([torch.zeros(2), torch.zeros(2, dtype=F64)])


def test_layout_rejects_empty_integer_and_non_tensor_params():
    with pytest.raises(ValueError, match="params must contain at least one tensor"):
        ParamLayout([])
    with pytest.raises(
        TypeError, match="params must be real floating point, got dtype torch.int64"
    ):
        ParamLayout([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(
        TypeError, match="params must be a tensor or a sequence of tensors, got int"
    ):
        ParamLayout(3)


def test_layout_flatten_names_the_argument():
    layout = ParamLayout([torch.zeros(2, 3), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"v\[1\] must have shape \(4,\), got \(5,\)"):
        layout.flatten([torch.zeros(2, 3), torch.zeros(5)], "v")
    with pytest.raises(ValueError, match="tensors must hold 2 tensors, got 1"):
        layout.flatten([torch.zeros(2, 3)])


# --------------------------------------------------------------------- functional API
FUNCTIONAL = {
    "exact_hvp": lambda func, params, v: exact_hvp(func, params, v),
    "approximate_hvp": lambda func, params, v: approximate_hvp(func, params, v),
}


@pytest.mark.parametrize("function", FUNCTIONAL)
def test_functional_v_of_the_wrong_count_or_shape(function):
    func, params = closure()
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
    func, params = closure()
    with pytest.raises(
        ValueError, match="v must have dtype torch.float64 .* got dtype torch.float32"
    ):
        FUNCTIONAL[function](func, params, [torch.zeros(2, 3), torch.zeros(3)])


@pytest.mark.parametrize("product", [model_hvp, gauss_newton_product])
def test_model_functions_validate_v_and_y(product):
    x, y = batch()
    with pytest.raises(ValueError, match=r"v\[0\] must have shape \(2, 3\), got \(3, 2\)"):
        product(linear(), nn.MSELoss(), x, y, [torch.zeros(3, 2, dtype=F64), torch.zeros(2)])
    with pytest.raises(TypeError, match="y must be a tensor of targets, got list"):
        product(linear(), nn.MSELoss(), x, y.tolist(), torch.zeros(N, dtype=F64))


@pytest.mark.parametrize("damping", [float("nan"), float("inf"), "0.1", None])
def test_approximate_hvp_rejects_a_bad_damping(damping):
    func, params = closure()
    with pytest.raises(ValueError, match="damping must be a finite real number"):
        approximate_hvp(
            func, params, [torch.zeros(2, 3, dtype=F64), torch.zeros(3, dtype=F64)], damping=damping
        )


@pytest.mark.parametrize("num_samples", [0, -1, 1.5, True])
def test_sample_counts_must_be_positive_integers(num_samples):
    func, params = closure()
    v = [torch.zeros(2, 3, dtype=F64), torch.zeros(3, dtype=F64)]
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        approximate_hvp(func, params, v, num_samples=num_samples)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        hessian_trace(func, params, num_samples=num_samples)


@pytest.mark.parametrize(
    ("cls", "own"),
    [
        (HessianOperator, "kernel"),
        (GaussNewtonOperator, "output"),
        (FiniteDifferenceHessianOperator, "precision"),
    ],
)
def test_help_shows_each_operators_own_parameters(cls, own):
    """help() used to show SciPy's inherited __init__ text, and the parameters lived elsewhere."""
    import pydoc

    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Initialize this LinearOperator" not in text
    head = text[: text.index(" |  " + "-" * 20)]  # the class docstring, before the methods
    for name in ("model", "loss_fn", "data", "params", "reduction", "process_group", own):
        assert f"\n |  {name}" in head or f" {name}," in head or f"{name}\n" in head, name


class HuggingFaceLike(nn.Module):
    """Returns a dict, as Hugging Face models do (their outputs also allow ``.logits``)."""

    def __init__(self):
        super().__init__()
        self.layer = linear()

    def forward(self, x):
        return {"logits": self.layer(x), "hidden": x}


@pytest.mark.parametrize("output", ["logits", lambda out: out["logits"]])
@by_operator
def test_output_picks_the_tensor_from_a_dict_output(cls, output):
    model = HuggingFaceLike()
    picked = cls(model, nn.MSELoss(), batch(), output=output)
    plain = cls(model.layer, nn.MSELoss(), batch())
    v = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(picked.apply(v), plain.apply(v), rtol=1e-10, atol=1e-12)


def test_output_by_index_and_attribute():
    class TupleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = linear()

        def forward(self, x):
            return x, self.layer(x)

    plain = GaussNewtonOperator(linear(), nn.MSELoss(), batch())
    model = TupleModel()
    model.layer.load_state_dict(plain._objective.model.state_dict())
    by_index = GaussNewtonOperator(model, nn.MSELoss(), batch(), output=1)
    v = torch.ones(N, dtype=F64)
    torch.testing.assert_close(by_index.apply(v), plain.apply(v))

    class WithLogits(nn.Module):  # an output object with an attribute, like transformers' outputs
        def __init__(self):
            super().__init__()
            self.layer = model.layer

        def forward(self, x):
            return type("Output", (), {"logits": self.layer(x)})()

    by_attribute = GaussNewtonOperator(WithLogits(), nn.MSELoss(), batch(), output="logits")
    torch.testing.assert_close(by_attribute.apply(v), plain.apply(v))


def test_an_output_that_selects_nothing_says_what_there_is():
    op = HessianOperator(HuggingFaceLike(), nn.MSELoss(), batch(), output="scores")
    with pytest.raises(
        ValueError, match=r"output='scores' does not select .* \(keys: \['logits', 'hidden'\]\)"
    ):
        op.apply(torch.zeros(N, dtype=F64))
    with pytest.raises(TypeError, match="output must be None, a key"):
        HessianOperator(HuggingFaceLike(), nn.MSELoss(), batch(), output=1.5)


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
