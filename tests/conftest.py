"""Shared fixtures and helpers of the tests; every test file may import from here.

- The cases: small float64 problems (``CASES``, the ``case`` fixture) and their dense curvature,
  computed independently with torch.func: ``dense_hessian`` / ``dense_ggn`` evaluate the full
  loss as a function of one flat vector; ``model_snapshot`` / ``assert_model_unchanged``.
- Operators built on the cases (``build_operator``) and the products check every operator passes
  (``check_products_match_dense_truth``).
- Small problems for the operators' edge cases: a tanh MLP on regression data (``small_mlp``,
  ``regression_data``), a linear model for argument checks (``tiny_*``), a float32 conv net
  (``conv_hessian``), a ReLU MLP and a Hessian with a skew-symmetric part (``skewed``).
- Fixtures of curvop operators on the tiny MLP of ``linalg_cases`` (``H``, ``G``, ``dense``,
  ``curvature_pair``).
"""

from __future__ import annotations

import os

# tiny matrices: BLAS threads only fight over the cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from linalg_cases import gauss_newton, hessian
from torch import nn
from torch.func import functional_call

import curvop
from curvop import FiniteDifferenceHessianOperator, GaussNewtonOperator, HessianOperator

# -------------------------------------- the cases: small float64 problems and their dense curvature
F64 = torch.float64


class DictInputModel(nn.Module):
    """A model taking keyword inputs: ``model(features=..., scale=...)``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.body(features) * scale


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)
    )


def _inputs(kind: str, n: int, generator: torch.Generator):
    if kind == "cnn":
        return torch.randn(n, 1, 6, 6, generator=generator, dtype=F64)
    if kind == "dict":
        return {
            "features": torch.randn(n, 3, generator=generator, dtype=F64),
            "scale": torch.rand(n, 1, generator=generator, dtype=F64) + 0.5,
        }
    return torch.randn(n, 3, generator=generator, dtype=F64)


def _targets(loss: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, 3, (n,), generator=generator)
    return torch.randn(n, 3, generator=generator, dtype=F64)


def _split(inputs, targets, sizes: list[int]):
    batches, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        x = {k: v[part] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[part]
        batches.append((x, targets[part]))
        start += size
    return batches


@dataclass
class Case:
    """One problem: model, loss, data split into batches, parameter subset."""

    name: str
    model: nn.Module
    loss_fn: Callable
    data: list | tuple
    reduction: str
    params: list[torch.Tensor] | None = None

    @property
    def batches(self) -> list:
        return [self.data] if isinstance(self.data, tuple) else self.data

    @property
    def chosen(self) -> list[torch.Tensor]:
        return self.params if self.params is not None else list(self.model.parameters())


ARCHITECTURES = {"mlp": mlp, "cnn": cnn, "dict": DictInputModel}


def make_case(
    arch: str = "mlp",
    loss: str = "mse",
    reduction: str = "mean",
    sizes: tuple[int, ...] = (4, 4, 3),
    subset: bool = False,
    seed: int = 0,
) -> Case:
    """Build a case; ``sizes`` of one element means a single ``(inputs, targets)`` batch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHITECTURES[arch]().double()
    n = sum(sizes)
    inputs, targets = _inputs(arch, n, generator), _targets(loss, n, generator)
    batches = _split(inputs, targets, list(sizes))
    data = batches[0] if len(sizes) == 1 else batches
    loss_fn = (
        nn.MSELoss(reduction=reduction)
        if loss == "mse"
        else nn.CrossEntropyLoss(reduction=reduction)
    )
    params = (
        [p for name, p in model.named_parameters() if name.endswith("weight")] if subset else None
    )
    name = f"{arch}-{loss}-{reduction}-{'x'.join(map(str, sizes))}{'-subset' if subset else ''}"
    return Case(name, model, loss_fn, data, reduction, params)


CASES = [
    make_case("mlp", "mse", "mean", (11,)),
    make_case("mlp", "mse", "mean", (4, 4, 3)),
    make_case("mlp", "ce", "sum", (4, 4, 3)),
    make_case("mlp", "ce", "mean", (5, 2), subset=True),
    make_case("cnn", "ce", "mean", (3, 3, 2)),
    make_case("cnn", "mse", "sum", (5,)),
    make_case("dict", "mse", "mean", (4, 3)),
    make_case("dict", "ce", "sum", (6,), subset=True),
]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models: intra-op threads only fight over the cores (several times slower when shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request) -> Case:
    return request.param


def _model_call(model: nn.Module, state: dict, inputs):
    if isinstance(inputs, dict):
        return functional_call(model, state, (), inputs)
    return functional_call(model, state, (inputs,))


def _unflatten_into(case: Case, flat: torch.Tensor) -> dict:
    names = {id(p): name for name, p in case.model.named_parameters()}
    state = {name: p.detach() for name, p in case.model.named_parameters()}
    pieces = torch.split(flat, [p.numel() for p in case.chosen])
    for p, piece in zip(case.chosen, pieces, strict=True):
        state[names[id(p)]] = piece.reshape(p.shape)
    return state


def _flat_params(case: Case) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in case.chosen])


def _batch_weights(case: Case) -> list[float]:
    counts = [targets.shape[0] for _, targets in case.batches]
    return [c / sum(counts) if case.reduction == "mean" else 1.0 for c in counts]


def dense_hessian(case: Case) -> torch.Tensor:
    """The Hessian of the total loss, by torch.autograd.functional.hessian on a flat vector."""

    def total_loss(flat: torch.Tensor) -> torch.Tensor:
        state = _unflatten_into(case, flat)
        return sum(
            w * case.loss_fn(_model_call(case.model, state, x), y)
            for w, (x, y) in zip(_batch_weights(case), case.batches, strict=True)
        )

    return torch.autograd.functional.hessian(total_loss, _flat_params(case))


def dense_ggn(case: Case) -> torch.Tensor:
    """``sum_b w_b J_b^T H_b J_b`` from dense Jacobians and dense loss Hessians."""
    flat = _flat_params(case)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=F64)
    for w, (x, y) in zip(_batch_weights(case), case.batches, strict=True):
        total += w * _batch_ggn(case, flat, x, y)
    return total


def _batch_ggn(case: Case, flat: torch.Tensor, x, y) -> torch.Tensor:
    def output_of(f: torch.Tensor) -> torch.Tensor:
        return _model_call(case.model, _unflatten_into(case, f), x)

    output = output_of(flat).detach()
    jacobian = torch.func.jacrev(output_of)(flat).reshape(output.numel(), -1)
    loss_hessian = torch.autograd.functional.hessian(
        lambda out: case.loss_fn(out.reshape(output.shape), y), output.reshape(-1)
    )
    return jacobian.T @ loss_hessian @ jacobian


def model_snapshot(model: nn.Module) -> dict:
    """Everything about a model that curvop promises not to touch."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def assert_model_unchanged(model: nn.Module, snapshot: dict) -> None:
    after = model_snapshot(model)
    for name, value in snapshot["params"].items():
        assert torch.equal(value, after["params"][name]), f"parameter {name} changed"
    for name, value in snapshot["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), f"buffer {name} changed"
    assert snapshot["requires_grad"] == after["requires_grad"]
    assert all(g is None for g in after["grads"].values()) or snapshot["grads"] == after["grads"]
    assert snapshot["training"] == after["training"]


# --------------------------------------------------------------------- operators on the cases
OPERATOR_KINDS = {
    "hessian": (HessianOperator, dense_hessian, 1e-10),
    "ggn": (GaussNewtonOperator, dense_ggn, 1e-10),
    "fd": (FiniteDifferenceHessianOperator, dense_hessian, 1e-6),
}

KERNELS = ["batched", "looped", "forward"]


def build_operator(kind: str, case: Case, kernel: str | None = "auto"):
    cls = OPERATOR_KINDS[kind][0]
    options = {} if kind == "fd" else {"kernel": kernel}
    return cls(case.model, case.loss_fn, case.data, case.params, **options)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check_products_match_dense_truth(kind: str, case: Case, kernel: str | None) -> None:
    """Every way to multiply (``@``, ``matvec``, ``rmatvec``, ``matmat``, ``apply``, ``to_dense``)
    with the ``kind`` operator and ``kernel`` on ``case``, against the dense float64 truth; the
    model left unchanged."""
    _, truth_of, tolerance = OPERATOR_KINDS[kind]
    truth = truth_of(case).numpy()
    snapshot = model_snapshot(case.model)
    op = build_operator(kind, case, kernel)
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


# ------------------------------------------------ a tanh MLP on regression data, split into batches
OPERATOR_CLASSES = [HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator]
OPERATOR_IDS = ["hessian", "ggn", "fd"]
by_operator = pytest.mark.parametrize("cls", OPERATOR_CLASSES, ids=OPERATOR_IDS)


def small_mlp(*middle: nn.Module, width: int = 5, seed: int = 0) -> nn.Module:
    """``Linear(3, width) -> middle -> Tanh -> Linear(width, 2)`` in float64."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, width), *middle, nn.Tanh(), nn.Linear(width, 2)).double()


def regression_data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=F64), torch.randn(
        n, 2, generator=generator, dtype=F64
    )


def split_batches(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple]:
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


def random_vector(op, k: int | None = None, seed: int = 1) -> torch.Tensor:
    shape = (op.shape[0],) if k is None else (op.shape[0], k)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=op.layout.dtype)


# ----------------------------------------------------------- a linear model for the argument checks
TINY_N = 3 * 2 + 2  # parameters of nn.Linear(3, 2)


def tiny_linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(3, 2).double()


def tiny_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=generator, dtype=F64), torch.randn(
        n, 2, generator=generator, dtype=F64
    )


def tiny_operator(cls=HessianOperator):
    return cls(tiny_linear(), nn.MSELoss(), tiny_batch())


def tiny_closure() -> tuple:
    """``func`` and its two parameters (a (2, 3) matrix and a (3,) vector)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=generator, dtype=F64, requires_grad=True)
    b = torch.randn(3, generator=generator, dtype=F64, requires_grad=True)
    return (lambda: (torch.tanh(w.sum(0) * b) ** 2).sum()), [w, b]


# -------------------------------- larger problems: a float32 conv net, a ReLU MLP, a skewed Hessian
def conv_hessian(kernel: str = "auto") -> curvop.HessianOperator:
    """A small float32 conv net whose products hold several MiB of graph per column."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )  # fmt: skip
    x = torch.randn(96, 3, 16, 16, generator=generator)
    y = torch.randint(0, 10, (96,), generator=generator)
    data = [(x[:48], y[:48]), (x[48:], y[48:])]
    return curvop.HessianOperator(model, nn.CrossEntropyLoss(), data, kernel=kernel)


def relu_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )


def relu_mlp_data(samples: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 64, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return [(x[:100], y[:100]), (x[100:], y[100:])]


class SkewedHessian(HessianOperator):
    """The Hessian plus a skew-symmetric part: not symmetric, as FD across kinks once was."""

    def __init__(self, *args, skew: float):
        super().__init__(*args)
        n = self.shape[0]
        S = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.skew = skew * (S - S.T)

    def _block_product(self, V: torch.Tensor, memory_bytes: int | None) -> torch.Tensor:
        return super()._block_product(V, memory_bytes) + self.skew.to(V.dtype) @ V


def skewed(skew: float) -> SkewedHessian:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 2, generator=generator, dtype=torch.float64)
    return SkewedHessian(model, nn.MSELoss(), (x, y), skew=skew)


# ------------------------------------------------- curvop operators on the tiny MLP of linalg_cases
@pytest.fixture(scope="module")
def H():
    return hessian()


@pytest.fixture(scope="module")
def G():
    return gauss_newton()


@pytest.fixture(scope="module")
def dense(H, G):
    return {"H": H.to_dense(), "G": G.to_dense()}


@pytest.fixture
def curvature_pair():
    H, G = hessian(), gauss_newton()
    return H, G, torch.from_numpy(H.to_dense()), torch.from_numpy(G.to_dense())
