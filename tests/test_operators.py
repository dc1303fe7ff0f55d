"""Every operator against dense float64 ground truth, over every case in conftest.CASES."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    Case,
    assert_model_unchanged,
    dense_ggn,
    dense_hessian,
    make_case,
    model_snapshot,
)
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh
from torch import nn

import curvop
from curvop import (
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
    ParamLayout,
)
from curvop.operators.kernels import CALIBRATION_WIDTH

OPERATORS = {
    "hessian": (HessianOperator, dense_hessian, 1e-10),
    "ggn": (GaussNewtonOperator, dense_ggn, 1e-10),
    "fd": (FiniteDifferenceHessianOperator, dense_hessian, 1e-6),
}
KERNELS = ["batched", "looped", "forward"]
# every kernel of the exact operators, forced (the default "auto" picks one of them by timing)
VARIANTS = {
    **{f"{kind}-{kernel}": (kind, kernel) for kind in ("hessian", "ggn") for kernel in KERNELS},
    "hessian": ("hessian", "auto"),
    "ggn": ("ggn", "auto"),
    "fd": ("fd", None),
}


def build(kind: str, case: Case, kernel: str | None = "auto"):
    cls = OPERATORS[kind][0]
    options = {} if kind == "fd" else {"kernel": kernel}
    return cls(case.model, case.loss_fn, case.data, case.params, **options)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("variant", VARIANTS)
def test_products_match_dense_truth(variant: str, case: Case):
    kind, kernel = VARIANTS[variant]
    if variant == "hessian-forward" and isinstance(case.loss_fn, nn.MSELoss):
        pytest.skip("torch.func cannot run forward-over-reverse through mse_loss (torch 2.13)")
    _, truth_of, tolerance = OPERATORS[kind]
    truth = truth_of(case).numpy()
    snapshot = model_snapshot(case.model)
    op = build(kind, case, kernel)
    n = truth.shape[0]
    assert op.shape == (n, n) and op.dtype == np.float64 and op.layout.size == n
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(n), rng.standard_normal((n, 3))

    assert relative_error(op @ x, truth @ x) < tolerance
    assert relative_error(op.matvec(x), truth @ x) < tolerance
    assert relative_error(op.rmatvec(x), truth @ x) < tolerance
    assert relative_error(op.matmat(X), truth @ X) < tolerance
    assert relative_error(op @ X, truth @ X) < tolerance
    assert relative_error(op.matvec(x[:, None]).ravel(), truth @ x) < tolerance
    applied = op.apply(torch.as_tensor(X))
    assert isinstance(applied, torch.Tensor) and applied.shape == (n, 3)
    assert relative_error(applied.numpy(), truth @ X) < tolerance
    assert relative_error(op.to_dense(), truth) < tolerance
    assert_model_unchanged(case.model, snapshot)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_eigsh_and_cg_on_operator(kind: str):
    case = make_case("mlp", "ce", "mean", (4, 4, 3))
    truth = OPERATORS[kind][1](case).numpy()
    op = build(kind, case)
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(truth)[-2:], rtol=1e-8, atol=1e-10)

    damping, b = 0.5, np.ones(op.shape[0])
    x, info = cg(op + damping * aslinearoperator(np.eye(op.shape[0])), b, rtol=1e-10)
    assert info == 0
    expected = np.linalg.solve(truth + damping * np.eye(op.shape[0]), b)
    assert relative_error(x, expected) < 1e-7


def test_operator_is_a_symmetric_linear_operator():
    case = make_case()
    op = build("hessian", case)
    assert isinstance(op, LinearOperator)
    assert op.T is op and op.H is op and op.adjoint() is op


def test_apply_one_vector_returns_vector():
    case = make_case()
    op = build("hessian", case)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    out = op.apply(v)
    assert out.shape == v.shape and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), dense_hessian(case).numpy() @ v.numpy(), rtol=1e-10)


def test_block_is_multiplied_in_one_pass_over_the_data():
    """After the operator measured its kernels (on the first product, on the first batch only),
    a block of k columns is one pass: one forward per batch."""
    case = make_case("mlp", "mse", "mean", (4, 4, 3))
    calls = []
    handle = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for kind in OPERATORS:
            op = build(kind, case, "batched")
            assert not calls, "constructing an operator must not evaluate the model"
            V = torch.randn(op.shape[0], 5, dtype=torch.float64)
            op.apply(V)
            calls.clear()
            with curvop.count_products(op) as count:
                op.apply(V)
            per_batch = {"hessian": 1, "ggn": 1, "fd": 2 * 5 + 1}[kind]  # fd: 2k + 1 gradients
            assert len(calls) == 3 * per_batch, kind
            assert (count.calls, count.columns) == (1, 5)
            calls.clear()
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_auto_measures_every_candidate_once_on_the_first_batch(kind: str):
    """The first product measures each candidate with one column and with CALIBRATION_WIDTH
    columns on batch 0 (time and peak bytes); every later product, of any width, chooses from
    those figures without running anything more, and the kernels agree to rounding."""
    case = make_case("mlp", "ce", "mean", (4, 4, 3))
    calls = []
    handle = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        op = build(kind, case)
        V = torch.randn(op.shape[0], 5, dtype=torch.float64)
        first = op.apply(V)
        measured = op.kernel_measurements
        assert measured.pop("failures") == {}
        assert {name: set(widths) for name, widths in measured.items()} == {
            name: {1, CALIBRATION_WIDTH} for name in KERNELS
        }
        assert all(m.seconds > 0 and m.bytes > 0 for w in measured.values() for m in w.values())
        selection = op.kernel_selections[5]
        assert selection.kernel in KERNELS and 1 <= selection.chunk <= 5
        calls.clear()
        for width in (5, 1, 3, 7):
            op.apply(V[:, :width] if width <= 5 else torch.randn(op.shape[0], width).double())
        assert op.kernel_measurements == {**measured, "failures": {}}
        forward_passes = {"hessian": 1, "ggn": 2}[kind]  # the GGN's forward kernel runs two
        most = 4 * 3 * forward_passes * 2  # at most two passes (chunks) per product
        assert len(calls) <= most
        torch.testing.assert_close(first, op.apply(V), rtol=1e-12, atol=1e-14)
    finally:
        handle.remove()


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_gives_the_same_block_product_at_every_chunk_width(kernel):
    """The memory limit decides the columns per pass; every width gives the same product."""
    case = make_case("mlp", "ce", "mean", (4, 4, 3))
    op = build("hessian", case, kernel)
    V = torch.randn(op.shape[0], 6, dtype=torch.float64)
    whole = op.block_product(V, memory_bytes=2**40)
    one_at_a_time = op.block_product(V, memory_bytes=0)
    assert op.kernel_selections[6].chunk == 1
    torch.testing.assert_close(whole, one_at_a_time, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(whole, dense_hessian(case) @ V, rtol=1e-10, atol=1e-12)


def test_a_forced_kernel_is_used_alone_and_an_unknown_one_is_refused():
    case = make_case("mlp", "mse", "mean", (4, 4, 3))
    op = build("hessian", case, "looped")
    op.apply(torch.randn(op.shape[0], 3, dtype=torch.float64))
    assert op.kernel_selections[3].kernel == "looped"
    assert set(op.kernel_measurements) == {"looped", "failures"}
    with pytest.raises(
        ValueError, match=r"kernel must be one of \('auto', 'batched', 'looped', 'forward'\)"
    ):
        build("hessian", case, "fastest")
    closure = HessianOperator.from_function(
        lambda: case.model[0].weight.square().sum(), list(case.model.parameters())
    )
    closure.apply(torch.randn(closure.shape[0], 2, dtype=torch.float64))
    assert set(closure.kernel_measurements) == {"batched", "looped", "failures"}


class Cube(torch.autograd.Function):
    """A custom op with a backward (so double backward works) but no torch.func support, as
    custom CUDA kernels often are."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CustomOpModel(nn.Module):
    """A model torch.func cannot transform: a custom autograd.Function without setup_context."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2).double()

    def forward(self, x):
        return Cube.apply(self.layer(x))


@pytest.mark.parametrize("cls", [HessianOperator, GaussNewtonOperator])
def test_auto_falls_back_when_torch_func_cannot_trace_the_model(cls):
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    op = cls(CustomOpModel(), nn.MSELoss(), (x, y))
    V = torch.randn(op.shape[0], 4, dtype=torch.float64)
    product = op.apply(V)
    assert "forward" in op.kernel_measurements["failures"]
    assert op.kernel_selections[4].kernel in ("batched", "looped")
    forced = cls(CustomOpModel(), nn.MSELoss(), (x, y), kernel="forward")
    with pytest.raises(RuntimeError):
        forced.apply(V)
    assert product.shape == V.shape


def test_mean_reduction_weights_batches_by_sample_count():
    """The short last batch must count for its 1 sample, not for a third of the data."""
    split = make_case("mlp", "mse", "mean", (5, 5, 1))
    whole = make_case("mlp", "mse", "mean", (11,))
    np.testing.assert_allclose(
        build("hessian", split).to_dense(), build("hessian", whole).to_dense(), atol=1e-12
    )
    np.testing.assert_allclose(
        build("ggn", split).to_dense(), build("ggn", whole).to_dense(), atol=1e-12
    )


def test_sum_reduction_is_sum_over_batches():
    split = make_case("mlp", "ce", "sum", (5, 5, 1))
    whole = make_case("mlp", "ce", "sum", (11,))
    np.testing.assert_allclose(
        build("hessian", split).to_dense(), build("hessian", whole).to_dense(), atol=1e-12
    )


def test_reduction_argument_for_plain_function_losses():
    case = make_case("mlp", "mse", "sum", (4, 4, 3))

    def squared_error(out, y):
        return ((out - y) ** 2).sum()

    op = HessianOperator(case.model, squared_error, case.data, reduction="sum")
    assert op.reduction == "sum"
    np.testing.assert_allclose(op.to_dense(), dense_hessian(case).numpy(), atol=1e-10)
    assert HessianOperator(case.model, squared_error, case.data).reduction == "mean"


def test_ggn_works_for_bce_and_custom_losses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6, 2)).double()

    def custom(out, target):
        return (torch.cosh(out - target)).mean()

    for loss_fn in (nn.BCEWithLogitsLoss(), custom):
        case = Case("bce", model, loss_fn, (x, y), "mean")
        np.testing.assert_allclose(
            build("ggn", case).to_dense(), dense_ggn(case).numpy(), atol=1e-10
        )


def test_ggn_equals_hessian_for_linear_model_and_convex_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    ggn = GaussNewtonOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    hessian = HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    np.testing.assert_allclose(ggn, hessian, atol=1e-12)


def test_finite_differences_float32_accuracy_on_relu_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    exact = HessianOperator(model, nn.CrossEntropyLoss(), data)
    approx = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data)
    assert approx.dtype == np.float32
    V = torch.randn(exact.shape[0], 4, generator=torch.Generator().manual_seed(1))
    errors = (approx.apply(V) - exact.apply(V)).norm(dim=0) / exact.apply(V).norm(dim=0)
    assert errors.max() < 1e-2


def test_finite_differences_forward_scheme_and_explicit_step():
    case = make_case("mlp", "mse", "mean", (4, 4, 3))
    truth = dense_hessian(case).numpy()
    forward = FiniteDifferenceHessianOperator(case.model, case.loss_fn, case.data, scheme="forward")
    fixed = FiniteDifferenceHessianOperator(case.model, case.loss_fn, case.data, eps=1e-5)
    assert relative_error(forward.to_dense(), truth) < 1e-5
    assert relative_error(fixed.to_dense(), truth) < 1e-8


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


def test_parameter_subset_is_the_sub_block():
    full = make_case("mlp", "mse", "mean", (4, 4, 3))
    sub = make_case("mlp", "mse", "mean", (4, 4, 3), subset=True)
    full_dense = build("hessian", full).to_dense()
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
        build("hessian", sub).to_dense(), full_dense[np.ix_(index, index)], atol=1e-12
    )


def test_dataloader_and_tuple_inputs():
    torch.manual_seed(0)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(4, 3)

        def forward(self, u, w):
            return torch.tanh(self.a(u)) + self.b(w)

    model = TwoInputs().double()
    u, w = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, 3, dtype=torch.float64)
    dataset = [((u[i], w[i]), y[i]) for i in range(10)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    from_loader = HessianOperator(model, nn.MSELoss(), loader).to_dense()
    whole = HessianOperator(model, nn.MSELoss(), ((u, w), y)).to_dense()
    np.testing.assert_allclose(from_loader, whole, atol=1e-12)


def test_float32_operator_has_float32_dtype_and_numpy_io():
    model = nn.Linear(3, 2)
    op = HessianOperator(model, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2)))
    assert op.dtype == np.float32
    out = op @ np.ones(op.shape[0])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32


def test_to_dense_size_limit_can_be_raised():
    op = build("hessian", make_case())
    n = op.shape[0]
    with pytest.raises(ValueError, match="max_size"):
        op.to_dense(max_size=n - 1)
    assert op.to_dense(max_size=n).shape == (n, n)


def test_hessian_of_a_model_returning_a_tuple():
    """Only the GGN needs a tensor output; the Hessian takes whatever the loss consumes."""
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 2)

        def forward(self, x):
            out = torch.tanh(self.body(x))
            return out, out.sum(dim=1)

    model = TwoHeads().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def loss_fn(outputs, targets):
        return ((outputs[0] - targets) ** 2).mean() + outputs[1].pow(2).mean()

    op = HessianOperator(model, loss_fn, (x, y))
    closure = HessianOperator.from_function(lambda: loss_fn(model(x), y), list(model.parameters()))
    np.testing.assert_allclose(op.to_dense(), closure.to_dense(), atol=1e-12)


def test_matmul_with_a_three_dimensional_array_names_the_shape():
    op = build("hessian", make_case())
    with pytest.raises(ValueError, match=r"must have shape .*got \(\d+, 1, 1\)"):
        op @ np.ones((op.shape[0], 1, 1))
    assert (op @ np.ones((op.shape[0], 2))).shape == (op.shape[0], 2)


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


class PartlyUsed(nn.Module):
    """A parameter the loss never uses and a frozen layer next to the trained ones."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.body(self.frozen(x))


def partly_used_case(loss: str) -> Case:
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = PartlyUsed().double()
    x = torch.randn(11, 3, generator=generator, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (11,), generator=generator)
        if loss == "ce"
        else torch.randn(11, 3, generator=generator, dtype=torch.float64)
    )
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    params = [p for p in model.parameters() if p.requires_grad]
    return Case(
        f"partly-used-{loss}", model, loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])], "mean", params
    )


@pytest.mark.parametrize("width", [1, 2, 5])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_every_kernel_and_width_agrees_with_unused_and_frozen_parameters(loss, kind, kernel, width):
    """Each kernel at every block width, on a model with a parameter the loss never uses (its
    products are zeros, which forward mode returns as expanded stride-0 tensors) and a frozen
    layer: the dense truth, zero rows and columns for the unused parameter."""
    if (kind, kernel, loss) == ("hessian", "forward", "mse"):
        pytest.skip("torch.func cannot run forward-over-reverse through mse_loss (torch 2.13)")
    case = partly_used_case(loss)
    op = build(kind, case, kernel)
    truth = (dense_hessian if kind == "hessian" else dense_ggn)(case)
    V = torch.randn(
        op.shape[0], width, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    torch.testing.assert_close(op.apply(V), truth @ V, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(op.apply(V)[:4]) == 0  # a module's own parameters come first
