"""The failures that give silent wrong answers elsewhere, each caught or made harmless.

Data that changes between products, non-deterministic models, dropout, BatchNorm in training mode,
the model's state, NaN/Inf, unused parameters and float32 accuracy.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_model_unchanged, model_snapshot
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvop
from curvop import (
    FiniteDifferenceHessianOperator,
    GaussNewtonOperator,
    HessianOperator,
    approximate_hvp,
    exact_hvp,
)

F64 = torch.float64
OPERATORS = [HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator]
OPERATOR_IDS = ["hessian", "ggn", "fd"]
by_operator = pytest.mark.parametrize("cls", OPERATORS, ids=OPERATOR_IDS)


def mlp(*middle: nn.Module, width: int = 5, seed: int = 0) -> nn.Module:
    """``Linear(3, width) -> middle -> Tanh -> Linear(width, 2)`` in float64."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, width), *middle, nn.Tanh(), nn.Linear(width, 2)).double()


def regression_data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=F64), torch.randn(
        n, 2, generator=generator, dtype=F64
    )


def split(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple]:
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def random_vector(op, k: int | None = None, seed: int = 1) -> torch.Tensor:
    shape = (op.shape[0],) if k is None else (op.shape[0], k)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=op.layout.dtype)


# --------------------------------------------------------------------- data that changes
@by_operator
def test_shuffling_loader_raises_on_the_second_product(cls):
    loader = DataLoader(
        TensorDataset(*regression_data()),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    op = cls(mlp(), nn.MSELoss(), loader)
    v = random_vector(op)
    op.apply(v)
    with pytest.raises(RuntimeError, match="data changed between products") as info:
        op.apply(v)
    assert "shuffle=False" in str(info.value) and "augmentation" in str(info.value)


class NoisyDataset(Dataset):
    """Random augmentation: every access adds fresh noise to the inputs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


@by_operator
def test_random_augmentation_raises_on_the_second_product(cls):
    op = cls(mlp(), nn.MSELoss(), DataLoader(NoisyDataset(*regression_data()), batch_size=5))
    v = random_vector(op)
    op.apply(v)
    with pytest.raises(RuntimeError, match="data changed between products.*shuffle=False"):
        op.apply(v)


@by_operator
def test_unshuffled_loader_matches_a_list_of_batches(cls):
    x, y = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)  # 5, 5, 2
    from_loader = cls(mlp(), nn.MSELoss(), loader)
    from_list = cls(mlp(), nn.MSELoss(), split(x, y, [5, 5, 2]))
    V = random_vector(from_loader, k=3)
    first = from_loader.apply(V)
    for _ in range(3):  # repeated passes see the same fingerprints
        assert torch.equal(from_loader.apply(V), first)
    torch.testing.assert_close(first, from_list.apply(V), rtol=1e-12, atol=1e-14)


def test_permuting_the_samples_of_a_single_batch_is_harmless():
    """The fingerprint (and a mean or sum loss) is invariant to the order inside a batch."""
    x, y = regression_data()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    op, reference = (
        HessianOperator(mlp(), nn.MSELoss(), loader),
        HessianOperator(mlp(), nn.MSELoss(), (x, y)),
    )
    v = random_vector(op)
    for _ in range(3):
        torch.testing.assert_close(op.apply(v), reference.apply(v), rtol=1e-12, atol=1e-14)


def test_a_list_changed_between_products_is_detected():
    x, y = regression_data()
    batches = split(x, y, [6, 6])
    op = HessianOperator(mlp(), nn.MSELoss(), batches)
    v = random_vector(op)
    op.apply(v)
    with torch.no_grad():
        batches[1][0][0, 0] += 1e-6  # one input entry, in place
    with pytest.raises(RuntimeError, match=r"contents of batch 1 changed"):
        op.apply(v)
    batches[1][0][0, 0] -= 1e-6
    batches.append(split(x, y, [6, 6])[0])
    with pytest.raises(RuntimeError, match=r"batch 2 differs in count or shape"):
        op.apply(v)
    del batches[1:]
    with pytest.raises(RuntimeError, match=r"1 batches instead of 2"):
        op.apply(v)


class ScaledByNestedInput(nn.Module):
    """Called as ``model(x, {"scale": [s]})``: a tensor nested two levels deep."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x: torch.Tensor, extras: dict) -> torch.Tensor:
        return self.body(x) * extras["scale"][0]


def test_a_change_in_a_nested_input_is_detected():
    x, y = regression_data()
    scale = torch.full((12, 1), 2.0, dtype=F64)
    op = HessianOperator(ScaledByNestedInput(), nn.MSELoss(), ((x, {"scale": [scale]}), y))
    v = random_vector(op)
    op.apply(v)
    scale[3] = 2.5
    with pytest.raises(RuntimeError, match="contents of batch 0 changed"):
        op.apply(v)


# --------------------------------------------------------------------- determinism
@by_operator
def test_check_deterministic_passes_on_a_deterministic_operator(cls):
    x, y = regression_data()
    op = cls(mlp(), nn.MSELoss(), split(x, y, [5, 5, 2]))
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
    op = cls(mlp(noise()), nn.MSELoss(), regression_data())
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


# --------------------------------------------------------------------- dropout
@by_operator
def test_active_dropout_warns_at_construction_naming_the_module(cls):
    model = mlp(nn.Dropout(0.5), width=16)
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
    "model", [mlp(nn.Dropout(0.5)).eval(), mlp(nn.Dropout(0.0)).train(), mlp().train()]
)
def test_no_dropout_warning_when_dropout_is_inactive(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianOperator(model, nn.MSELoss(), regression_data())


def test_dropout_products_agree_and_leave_the_global_rng_alone():
    x, y = regression_data()
    model = mlp(nn.Dropout(0.5), width=16).train()
    batches = split(x, y, [5, 7])
    with pytest.warns(UserWarning):
        ops = [cls(model, nn.MSELoss(), batches) for cls in OPERATORS]
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


# --------------------------------------------------------------------- BatchNorm
def bn_model() -> nn.Module:
    return mlp(nn.BatchNorm1d(5)).train()


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
    batches = split(x, y, [5, 4, 3])
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


# --------------------------------------------------------------------- the model's state
def busy_model() -> nn.Module:
    """BatchNorm, dropout, a frozen layer and a stale ``.grad``: all must survive products."""
    model = mlp(nn.BatchNorm1d(5), nn.Dropout(0.2)).train()
    model[0].bias.requires_grad_(False)
    model[-1].weight.grad = torch.ones_like(model[-1].weight)
    return model


@by_operator
def test_model_is_unchanged_after_every_product(cls):
    x, y = regression_data()
    model = busy_model()
    snapshot = model_snapshot(model)
    with pytest.warns(UserWarning, match="dropout"):
        op = cls(model, nn.MSELoss(), split(x, y, [7, 5]))
    for V in (random_vector(op), random_vector(op, k=3)):
        op.apply(V)
        op.matmat(V.reshape(op.shape[0], -1).numpy())
        assert_model_unchanged(model, snapshot)
    assert torch.equal(model[-1].weight.grad, torch.ones_like(model[-1].weight))


class Boom(Exception):
    """A user error that must reach the caller untouched."""


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
    batches = split(x, y, [9, 3])
    model = mlp(RaisesOnBatchOfThree()) if culprit == "model" else busy_model()
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


# --------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    ("cls", "where", "bad"),
    [(cls, "inputs", float("nan")) for cls in OPERATORS]
    + [(cls, "inputs", float("inf")) for cls in OPERATORS]
    # the GGN of the MSE does not depend on the targets: only the Hessian sees them
    + [
        (cls, "targets", float("inf")) for cls in (HessianOperator, FiniteDifferenceHessianOperator)
    ],
)
def test_non_finite_products_raise_naming_the_batch(cls, where, bad):
    x, y = regression_data()
    (x if where == "inputs" else y)[6, 1] = bad  # batch 1 of [5, 4, 3]
    op = cls(mlp(), nn.MSELoss(), split(x, y, [5, 4, 3]))
    for _ in range(2):  # the second product still blames the data, not a "change" of it
        with pytest.raises(FloatingPointError, match=r"batch 1 gave NaN or Inf"):
            op.apply(random_vector(op))


def test_non_finite_parameters_blame_the_first_batch():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    op = GaussNewtonOperator(model, nn.MSELoss(), regression_data())
    with pytest.raises(FloatingPointError, match="batch 0"):
        op @ np.ones(op.shape[0])


def test_a_non_finite_vector_is_blamed_on_the_vector():
    op = HessianOperator(mlp(), nn.MSELoss(), regression_data())
    v = random_vector(op)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="V must be finite"):
        op.apply(v)


class WithUnusedParts(nn.Module):
    """A model with a layer it never calls and one parameter it never reads."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
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


@by_operator
def test_products_work_inside_no_grad_and_inference_mode(cls):
    op = cls(mlp(), nn.MSELoss(), regression_data())
    V = random_vector(op, k=2)
    expected = op.apply(V)
    with torch.no_grad():
        assert torch.equal(op.apply(V), expected)
    with torch.inference_mode():
        assert torch.equal(op.apply(V), expected)


def float32_problem(cls) -> tuple:
    """An operator on a float32 classifier (three batches, a short last one) and the exact top
    eigenvalue of the float64 twin (same weights, same data), from the dense matrix."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    y = torch.randint(0, 3, (96,), generator=generator)
    batches = split(x, y, [40, 40, 16])
    op32 = cls(model, nn.CrossEntropyLoss(), batches)
    twin = copy.deepcopy(model).double()
    exact = GaussNewtonOperator if cls is GaussNewtonOperator else HessianOperator
    op64 = exact(twin, nn.CrossEntropyLoss(), [(xb.double(), yb) for xb, yb in batches])
    assert op32.dtype == np.float32 and op64.dtype == np.float64
    return op32, float(np.linalg.eigvalsh(op64.to_dense())[-1])


@by_operator
def test_float32_top_eigenvalue_from_eigsh_matches_float64_truth(cls):
    op32, truth = float32_problem(cls)
    v0 = np.random.default_rng(0).standard_normal(op32.shape[0])
    top = float(eigsh(op32, k=1, which="LA", v0=v0, return_eigenvectors=False)[0])
    assert abs(top - truth) <= 1e-4 * abs(truth)


@by_operator
def test_float32_top_eigenvalue_from_curvop_matches_float64_truth(cls):
    op32, truth = float32_problem(cls)
    top = float(np.max(curvop.top_eigenvalues(op32, k=1, seed=0)))
    assert abs(top - truth) <= 1e-4 * abs(truth)
