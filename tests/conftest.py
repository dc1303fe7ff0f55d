"""Small float64 problems and their dense curvature, computed independently with torch.func.

Each case is one line in ``CASES``; every operator test runs over all of them and compares with
``dense_hessian`` / ``dense_ggn``, which evaluate the full loss as a function of one flat vector.
"""

from __future__ import annotations

import os

# tiny matrices: BLAS threads only fight over the cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call

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
