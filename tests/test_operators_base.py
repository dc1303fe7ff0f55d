"""CurvatureOperator (curvop.operators.base): what every curvature operator does with a product.

One pass over the data per block product, the kernels measured once on the first batch and chosen
per width and memory limit, batches weighted by their sample counts, zero rows and columns for
unused parameters, non-finite products blamed on a batch, ``to_dense``, ``check_deterministic``,
``check_symmetric``, the dropout warning, half-precision models and no graph left behind.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from copy import deepcopy as copy_module

import numpy as np
import pytest
import torch
from conftest import (
    F64,
    KERNELS,
    OPERATOR_CLASSES,
    OPERATOR_KINDS,
    TINY_N,
    Case,
    build_operator,
    by_operator,
    conv_hessian,
    dense_ggn,
    dense_hessian,
    make_case,
    random_vector,
    regression_data,
    relu_mlp,
    relu_mlp_data,
    skewed,
    small_mlp,
    split_batches,
    tiny_batch,
    tiny_linear,
    tiny_operator,
)
from torch import nn

import curvop
from curvop import FiniteDifferenceHessianOperator, GaussNewtonOperator, HessianOperator
from curvop.operators.kernels import CALIBRATION_WIDTH


# -------------------------------------- products: one pass over the data, the kernels measured once
def test_block_is_multiplied_in_one_pass_over_the_data():
    """After the operator measured its kernels (on the first product, on the first batch only),
    a block of k columns is one pass: one forward per batch."""
    case = make_case("mlp", "mse", "mean", (4, 4, 3))
    calls = []
    handle = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for kind in OPERATOR_KINDS:
            op = build_operator(kind, case, "batched")
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
        op = build_operator(kind, case)
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
    op = build_operator("hessian", case, kernel)
    V = torch.randn(op.shape[0], 6, dtype=torch.float64)
    whole = op.block_product(V, memory_bytes=2**40)
    one_at_a_time = op.block_product(V, memory_bytes=0)
    assert op.kernel_selections[6].chunk == 1
    torch.testing.assert_close(whole, one_at_a_time, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(whole, dense_hessian(case) @ V, rtol=1e-10, atol=1e-12)


def test_a_product_splits_a_block_that_would_exceed_its_limit():
    op = conv_hessian("batched")  # its memory grows with the columns
    V = torch.randn(op.shape[0], 12)
    whole = op.block_product(V, memory_bytes=2**40)
    single = op.product_cost(1).bytes
    with curvop.count_products(op) as count:
        limited = op.block_product(V, memory_bytes=2 * single)
    assert count.calls > 1 and count.columns == 12  # several passes
    assert op.kernel_selections[12].bytes <= 2 * single
    torch.testing.assert_close(limited, whole, rtol=1e-5, atol=1e-6)
    op.max_block_columns = 5  # a cap on top of the memory limit
    with curvop.count_products(op) as count:
        op.block_product(V, memory_bytes=2**40)
    assert count.calls == 3


@by_operator
def test_products_work_inside_no_grad_and_inference_mode(cls):
    op = cls(small_mlp(), nn.MSELoss(), regression_data())
    V = random_vector(op, k=2)
    expected = op.apply(V)
    with torch.no_grad():
        assert torch.equal(op.apply(V), expected)
    with torch.inference_mode():
        assert torch.equal(op.apply(V), expected)


# ----------------------------------------------- reduction: batches weighted by their sample counts
def test_mean_reduction_weights_batches_by_sample_count():
    """The short last batch must count for its 1 sample, not for a third of the data."""
    split = make_case("mlp", "mse", "mean", (5, 5, 1))
    whole = make_case("mlp", "mse", "mean", (11,))
    np.testing.assert_allclose(
        build_operator("hessian", split).to_dense(),
        build_operator("hessian", whole).to_dense(),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        build_operator("ggn", split).to_dense(), build_operator("ggn", whole).to_dense(), atol=1e-12
    )


def test_sum_reduction_is_sum_over_batches():
    split = make_case("mlp", "ce", "sum", (5, 5, 1))
    whole = make_case("mlp", "ce", "sum", (11,))
    np.testing.assert_allclose(
        build_operator("hessian", split).to_dense(),
        build_operator("hessian", whole).to_dense(),
        atol=1e-12,
    )


def test_reduction_argument_for_plain_function_losses():
    case = make_case("mlp", "mse", "sum", (4, 4, 3))

    def squared_error(out, y):
        return ((out - y) ** 2).sum()

    op = HessianOperator(case.model, squared_error, case.data, reduction="sum")
    assert op.reduction == "sum"
    np.testing.assert_allclose(op.to_dense(), dense_hessian(case).numpy(), atol=1e-10)
    assert HessianOperator(case.model, squared_error, case.data).reduction == "mean"


@by_operator
def test_reduction_contradicting_the_loss_is_rejected(cls):
    with pytest.raises(ValueError, match=r"reduction='mean' contradicts loss_fn.reduction='sum'"):
        cls(tiny_linear(), nn.MSELoss(reduction="sum"), tiny_batch(), reduction="mean")


@by_operator
def test_reduction_none_is_rejected_naming_its_source(cls):
    with pytest.raises(ValueError, match=r"^loss_fn.reduction must be one of \('mean', 'sum'\)"):
        cls(tiny_linear(), nn.MSELoss(reduction="none"), tiny_batch())
    with pytest.raises(
        ValueError, match=r"^reduction must be one of \('mean', 'sum'\), got 'none'"
    ):
        cls(tiny_linear(), lambda o, t: ((o - t) ** 2).mean(), tiny_batch(), reduction="none")


# --------------------------------------------------------------------- unused and frozen parameters
class WithUnusedParts(nn.Module):
    """A model with a layer it never calls and one parameter it never reads."""

    def __init__(self):
        super().__init__()
        self.body = small_mlp()
        self.unused_layer = nn.Linear(2, 2).double()
        self.unused_scale = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@by_operator
def test_unused_parameters_give_zero_rows_and_columns(cls):
    model = WithUnusedParts()
    op = cls(model, nn.MSELoss(), regression_data())
    dense = op.to_dense()
    used = np.concatenate(
        [np.full(p.numel(), name.startswith("body.")) for name, p in model.named_parameters()]
    )
    assert dense.shape == (used.size, used.size) and (~used).sum() == 9
    assert not dense[~used].any() and not dense[:, ~used].any()
    reference = cls(model, nn.MSELoss(), regression_data(), list(model.body.parameters()))
    truth = reference.to_dense()  # the finite-difference step differs: it scales with |theta|
    assert np.linalg.norm(dense[np.ix_(used, used)] - truth) <= 1e-7 * np.linalg.norm(truth)
    assert np.abs(truth).max() > 1e-3


@by_operator
def test_selecting_only_unused_parameters_gives_the_zero_matrix(cls):
    model = WithUnusedParts()
    unused = [model.unused_scale, *model.unused_layer.parameters()]
    op = cls(model, nn.MSELoss(), regression_data(), unused)
    assert op.shape == (9, 9) and not op.to_dense().any()


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
    op = build_operator(kind, case, kernel)
    truth = (dense_hessian if kind == "hessian" else dense_ggn)(case)
    V = torch.randn(
        op.shape[0], width, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    torch.testing.assert_close(op.apply(V), truth @ V, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(op.apply(V)[:4]) == 0  # a module's own parameters come first


# --------------------------------------------------------------------- non-finite products
@pytest.mark.parametrize(
    ("cls", "where", "bad"),
    [(cls, "inputs", float("nan")) for cls in OPERATOR_CLASSES]
    + [(cls, "inputs", float("inf")) for cls in OPERATOR_CLASSES]
    # the GGN of the MSE does not depend on the targets: only the Hessian sees them
    + [
        (cls, "targets", float("inf")) for cls in (HessianOperator, FiniteDifferenceHessianOperator)
    ],
)
def test_non_finite_products_raise_naming_the_batch(cls, where, bad):
    x, y = regression_data()
    (x if where == "inputs" else y)[6, 1] = bad  # batch 1 of [5, 4, 3]
    op = cls(small_mlp(), nn.MSELoss(), split_batches(x, y, [5, 4, 3]))
    for _ in range(2):  # the second product still blames the data, not a "change" of it
        with pytest.raises(FloatingPointError, match=r"batch 1 gave NaN or Inf"):
            op.apply(random_vector(op))


def test_non_finite_parameters_blame_the_first_batch():
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    op = GaussNewtonOperator(model, nn.MSELoss(), regression_data())
    with pytest.raises(FloatingPointError, match="batch 0"):
        op @ np.ones(op.shape[0])


def test_a_non_finite_vector_is_blamed_on_the_vector():
    op = HessianOperator(small_mlp(), nn.MSELoss(), regression_data())
    v = random_vector(op)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="V must be finite"):
        op.apply(v)


def test_a_non_finite_vector_is_named():
    with pytest.raises(ValueError, match="V must be finite"):
        tiny_operator().apply(torch.full((TINY_N,), float("inf"), dtype=F64))


# --------------------------------------------------------------------- to_dense
def test_to_dense_size_limit_can_be_raised():
    op = build_operator("hessian", make_case())
    n = op.shape[0]
    with pytest.raises(ValueError, match="max_size"):
        op.to_dense(max_size=n - 1)
    assert op.to_dense(max_size=n).shape == (n, n)


def test_to_dense_above_max_size_names_the_argument():
    with pytest.raises(
        ValueError, match=rf"n={TINY_N} > max_size=4.*pass max_size={TINY_N} or more"
    ):
        tiny_operator().to_dense(max_size=4)
    assert tiny_operator().to_dense(max_size=TINY_N).shape == (TINY_N, TINY_N)


@pytest.mark.parametrize("max_size", [0, -3, 2.5, True, "big"])
def test_to_dense_rejects_a_bad_max_size(max_size):
    with pytest.raises(ValueError, match="max_size must be a positive integer"):
        tiny_operator().to_dense(max_size=max_size)


# --------------------------------------------------------------------- check_deterministic
@by_operator
def test_check_deterministic_passes_on_a_deterministic_operator(cls):
    x, y = regression_data()
    op = cls(small_mlp(), nn.MSELoss(), split_batches(x, y, [5, 5, 2]))
    assert op.check_deterministic() == 0.0  # CPU kernels are bitwise reproducible


class CallCounterNoise(nn.Module):
    """Multiplicative noise seeded by a Python call counter: curvop's seeding cannot fix it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        generator = torch.Generator().manual_seed(self.calls)
        return x * (1 + torch.rand(x.shape, generator=generator, dtype=x.dtype))


class NumpyNoise(nn.Module):
    """Noise from NumPy's global generator, which curvop does not (and must not) reseed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.as_tensor(1 + np.random.rand(*x.shape), dtype=x.dtype)  # noqa: NPY002


@by_operator
@pytest.mark.parametrize("noise", [CallCounterNoise, NumpyNoise])
def test_check_deterministic_names_the_likely_causes(cls, noise):
    op = cls(small_mlp(noise()), nn.MSELoss(), regression_data())
    if cls is FiniteDifferenceHessianOperator:  # its kink check sees the noise in one product
        with pytest.raises(RuntimeError, match="or the operator is not deterministic"):
            op.check_deterministic()
        return
    with pytest.raises(RuntimeError, match="not deterministic") as info:
        op.check_deterministic()
    message = str(info.value)
    for cause in (
        "outside nn.Dropout",
        "augmentation",
        "shuffling",
        "use_deterministic_algorithms",
    ):
        assert cause in message


@pytest.mark.parametrize("rtol", [0, -1.0, float("nan"), "1e-3"])
def test_check_deterministic_rejects_a_bad_rtol(rtol):
    with pytest.raises(ValueError, match="rtol must be a positive finite real number"):
        tiny_operator().check_deterministic(rtol=rtol)


def test_check_deterministic_rejects_a_bad_seed():
    with pytest.raises(TypeError, match="seed must be None or an int, got str"):
        tiny_operator().check_deterministic(seed="0")


# --------------------------------------------------------------------- check_symmetric
@pytest.mark.parametrize(
    "cls", [HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_symmetric_passes_on_every_operator(cls, dtype):
    model, data = relu_mlp(5), relu_mlp_data(150, 5)
    data = [(x.to(dtype), y) for x, y in data]
    op = cls(model.to(dtype), nn.CrossEntropyLoss(), data)
    gap = op.check_symmetric()
    # rounding only: far below the default allowance sqrt(eps) (10 x accuracy for FD)
    assert 0 <= gap < 0.01 * max(torch.finfo(dtype).eps ** 0.5, 10 * op.accuracy)


def test_check_symmetric_raises_on_an_asymmetric_operator_and_takes_rtol():
    op = skewed(1e-3)
    with pytest.raises(RuntimeError, match="not symmetric") as info:
        op.check_symmetric()
    assert "HessianOperator" in str(info.value)
    gap = op.check_symmetric(rtol=0.5)  # a looser allowance accepts it
    assert 1e-5 < gap < 0.5
    with pytest.raises(ValueError, match="rtol must be a positive"):
        op.check_symmetric(rtol=-1)


# --------------------------------------------------------------------- the dropout warning
@by_operator
def test_active_dropout_warns_at_construction_naming_the_module(cls):
    model = small_mlp(nn.Dropout(0.5), width=16)
    model.train()
    with pytest.warns(UserWarning, match=r"active dropout in \['1'\]") as record:
        cls(model, nn.MSELoss(), regression_data())
    assert record[0].filename == __file__  # stacklevel points at the caller's line


def test_dropout_inside_attention_warns():
    attention = nn.MultiheadAttention(4, 2, dropout=0.1)
    with pytest.warns(UserWarning, match=r"active dropout in \['attention'\]"):
        HessianOperator(
            nn.ModuleDict({"attention": attention}), nn.MSELoss(), (torch.zeros(2), torch.zeros(2))
        )


@pytest.mark.parametrize(
    "model",
    [small_mlp(nn.Dropout(0.5)).eval(), small_mlp(nn.Dropout(0.0)).train(), small_mlp().train()],
)
def test_no_dropout_warning_when_dropout_is_inactive(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianOperator(model, nn.MSELoss(), regression_data())


# ------------------------------------------------------ half precision: float16 and bfloat16 models
HALF = [torch.float16, torch.bfloat16]


def linear_problem(dtype: torch.dtype, samples: int = 512, scale: float = 12.0):
    """A linear model with MSE: the Hessian is 2 X^T X / N, whatever the weights, so a product
    with the ones vector has entries of about ``2 * scale**2`` (288 for scale 12)."""
    generator = torch.Generator().manual_seed(0)
    x = scale * (1 + 0.1 * torch.rand(samples, 3, generator=generator))
    y = torch.randn(samples, 1, generator=generator)
    model = nn.Linear(3, 1, bias=False)
    return model.to(dtype), nn.MSELoss(), (x.to(dtype), y.to(dtype)), x.double()


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_one_large_batch_does_not_overflow(dtype):
    """Summing N_b * H_b v in float16 overflowed at 144 x 512 > 65,504 and returned inf."""
    model, loss_fn, data, x = linear_problem(dtype)
    H = curvop.HessianOperator(model, loss_fn, data)
    assert H.torch_dtype == torch.float32 and H.dtype == np.float32  # the face is float32
    v = torch.ones(3)
    product = H.apply(v)
    truth = 2 * x.T @ x / len(x) @ v.double()
    assert torch.isfinite(product).all() and truth.min() > 144
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(product.double(), truth, rtol=20 * eps, atol=0)
    np.testing.assert_allclose(H @ np.ones(3, np.float32), product.numpy())


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cls", [curvop.HessianOperator, curvop.GaussNewtonOperator])
def test_products_of_a_network_match_float64_to_the_stated_accuracy(dtype, cls):
    generator = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(256, 6, generator=generator)
    y = torch.randint(0, 4, (256,), generator=generator)
    data = [(x[:128], y[:128]), (x[128:], y[128:])]
    copy = nn.Sequential(*(copy_module(m) for m in model))
    exact = cls(model.double(), nn.CrossEntropyLoss(), [(a.double(), b) for a, b in data])
    half = cls(copy.to(dtype), nn.CrossEntropyLoss(), [(a.to(dtype), b) for a, b in data])
    V = torch.randn(exact.shape[0], 3, generator=generator)
    truth, product = exact.apply(V.double()), half.apply(V)
    assert product.dtype == torch.float32
    error = float((product.double() - truth).norm() / truth.norm())
    assert error <= half.accuracy  # 1e-2 (float16) or 5e-2 (bfloat16) stated
    assert half.check_symmetric() <= 10 * half.accuracy


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_the_toolkit_runs_on_half_precision_operators(dtype):
    model, loss_fn, data, x = linear_problem(dtype, samples=64, scale=1.0)
    H = curvop.HessianOperator(model, loss_fn, data)
    truth = np.linalg.eigvalsh((2 * x.T @ x / len(x)).numpy())
    top = curvop.top_eigenvalues(H, 1, seed=0)
    np.testing.assert_allclose(top, truth[-1:], rtol=10 * H.accuracy)
    trace = curvop.xtrace(H, 3, seed=0)  # n = 3: the exact trace from 3 products
    assert trace.value == pytest.approx(truth.sum(), rel=10 * H.accuracy)
    result = curvop.solve_damped(H, torch.ones(3), 1.0, rtol=2 * H.accuracy)
    assert result.converged and result.x.dtype == torch.float32


# ----------------------------------------------------- no graph, cache or tensor survives a product
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def wide_model() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """About 1e5 float32 parameters: a leaked graph keeps at least a gradient's 400 KB per
    product, 800 MB over 2000 products."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(316, 316), nn.Tanh(), nn.Linear(316, 8))
    x, y = torch.randn(2, 316, generator=generator), torch.randn(2, 8, generator=generator)
    return model, (x, y)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_thousands_of_products_do_not_grow_the_resident_set():
    model, batch = wide_model()
    ops = [cls(model, nn.MSELoss(), batch) for cls in OPERATOR_CLASSES]
    n = ops[0].shape[0]
    assert n > 100_000
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    x = v.numpy()
    for op in ops:  # warm-up: allocator pools, autograd caches
        for _ in range(10):
            op.apply(v)
            op.matvec(x)
    gc.collect()
    before = resident_bytes()
    # 2000 products, half through torch and half through the SciPy interface
    for op, count in zip(ops, (500, 250, 250), strict=True):
        for _ in range(count):
            op.apply(v)
            op.matvec(x)
    gc.collect()
    growth = resident_bytes() - before
    assert growth < 32 * 2**20, f"resident set grew by {growth / 2**20:.1f} MiB"


class SavedTensor:
    """Stands in for a tensor saved by the autograd graph; lives exactly as long as the graph."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


@pytest.mark.parametrize("cls", OPERATOR_CLASSES, ids=["hessian", "ggn", "fd"])
@pytest.mark.parametrize("k", [None, 3])
def test_no_autograd_graph_survives_a_product(cls, k):
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator)
    op = cls(model, nn.MSELoss(), [(x, y), (x[:2], y[:2])])
    V = torch.randn((op.shape[0],) if k is None else (op.shape[0], k), generator=generator)
    op.apply(V)  # the first pass records the data fingerprints
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> SavedTensor:
        holder = SavedTensor(tensor)
        saved.append(weakref.ref(holder))
        return holder

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            result = op.apply(V)
        alive = sum(ref() is not None for ref in saved)  # before any collection: no cycles
        gc.collect()
        cyclic_tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert saved, "the hooks saw no saved tensors: the check would be vacuous"
    assert alive == 0, f"{alive} of {len(saved)} saved tensors outlive the product"
    assert not cyclic_tensors, "a product left tensors in reference cycles"
    assert not result.requires_grad and result.grad_fn is None
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------- documentation
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
