"""Properties every curvature operator has, over random small architectures, batch splits and vectors.

Symmetry, linearity, blocks equal to stacked columns, batch lists equal to their concatenation
(mean and sum, uneven splits), and a positive semi-definite GGN for losses convex in the output.
All in float64 on tiny models. Finite differences are approximate: their checks allow for the
method's error, the exact operators' only for rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvop import FiniteDifferenceHessianOperator, GaussNewtonOperator, HessianOperator

F64 = torch.float64
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
# the relative error each operator is allowed on these properties
TOLERANCE = {
    HessianOperator: 1e-10,
    GaussNewtonOperator: 1e-10,
    FiniteDifferenceHessianOperator: 1e-6,
}
LOSSES = {
    "mse": nn.MSELoss,
    "ce": nn.CrossEntropyLoss,
    "bce": nn.BCEWithLogitsLoss,
}


property_settings = settings(max_examples=12, deadline=None)


@dataclass
class Problem:
    model: nn.Module
    loss: str
    inputs: torch.Tensor
    targets: torch.Tensor
    sizes: list[int]
    seed: int

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.inputs.split(self.sizes), self.targets.split(self.sizes), strict=True))

    def operator(self, cls, reduction: str = "mean", *, split: bool = True):
        data = self.batches() if split else (self.inputs, self.targets)
        return cls(self.model, LOSSES[self.loss](reduction=reduction), data)

    def vectors(self, n: int, k: int, scale: float = 1.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return scale * torch.randn(n, k, generator=generator, dtype=F64)


@st.composite
def problems(draw, losses=tuple(LOSSES)) -> Problem:
    """A random MLP (depth 1-3, width 1-4, tanh/relu/sigmoid) with 1-4 uneven batches."""
    loss = draw(st.sampled_from(losses))
    depth, width = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    activation = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    n_in, n_out = draw(st.integers(1, 3)), draw(st.integers(2 if loss == "ce" else 1, 3))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    widths = [n_in] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), activation()]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(*layers, nn.Linear(width, n_out)).double()
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    inputs = 2 * torch.randn(n, n_in, generator=generator, dtype=F64)
    if loss == "ce":
        targets = torch.randint(0, n_out, (n,), generator=generator)
    elif loss == "bce":
        targets = torch.rand(n, n_out, generator=generator, dtype=F64)
    else:
        targets = torch.randn(n, n_out, generator=generator, dtype=F64)
    return Problem(model, loss, inputs, targets, sizes, seed)


operators = st.sampled_from([HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator])
reductions = st.sampled_from(["mean", "sum"])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, scale=None):
    """``|actual - expected| <= tolerance * scale``, the scale defaulting to ``|expected|``."""
    scale = expected.norm() if scale is None else scale
    error = (actual - expected).norm()
    assert error <= tolerance * scale + 1e-300, f"error {error:.3g} > {tolerance:.1g} * {scale:.3g}"


@property_settings
@given(problem=problems(), cls=operators, reduction=reductions)
def test_symmetry(problem, cls, reduction):
    op = problem.operator(cls, reduction)
    uv = problem.vectors(op.shape[0], 2)
    u, v = uv[:, 0], uv[:, 1]
    Au, Av = op.apply(u), op.apply(v)
    scale = u.norm() * Av.norm() + v.norm() * Au.norm()
    assert_close(u @ Av, v @ Au, TOLERANCE[cls], scale)


@property_settings
@given(
    problem=problems(),
    cls=operators,
    coefficients=st.tuples(st.floats(-10, 10), st.floats(-10, 10)),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_linearity(problem, cls, coefficients, scale):
    op = problem.operator(cls)
    uv = problem.vectors(op.shape[0], 2, scale)
    a, b = coefficients
    combined = op.apply(a * uv[:, 0] + b * uv[:, 1])
    parts = a * op.apply(uv[:, 0]) + b * op.apply(uv[:, 1])
    bound = abs(a) * op.apply(uv[:, 0]).norm() + abs(b) * op.apply(uv[:, 1]).norm()
    assert_close(combined, parts, TOLERANCE[cls], bound)


@property_settings
@given(problem=problems(), cls=operators, k=st.integers(1, 4))
def test_matmat_equals_stacked_matvec(problem, cls, k):
    op = problem.operator(cls)
    V = problem.vectors(op.shape[0], k)
    block = op.apply(V)
    columns = torch.stack([op.apply(V[:, j]) for j in range(k)], dim=1)
    assert_close(block, columns, 1e-12)
    np.testing.assert_allclose(op.matmat(V.numpy()), block.numpy(), rtol=0, atol=0)


@property_settings
@given(problem=problems(), cls=operators, reduction=reductions)
def test_batch_list_equals_their_concatenation(problem, cls, reduction):
    split, whole = problem.operator(cls, reduction), problem.operator(cls, reduction, split=False)
    V = problem.vectors(split.shape[0], 2)
    assert_close(split.apply(V), whole.apply(V), TOLERANCE[cls], whole.apply(V).norm() + 1e-12)


@property_settings
@given(problem=problems(losses=("mse", "ce", "bce")), reduction=reductions)
def test_ggn_is_positive_semi_definite_for_convex_losses(problem, reduction):
    dense = problem.operator(GaussNewtonOperator, reduction).to_dense()
    np.testing.assert_allclose(dense, dense.T, rtol=0, atol=1e-12 * max(1.0, np.abs(dense).max()))
    eigenvalues = np.linalg.eigvalsh(dense)
    assert eigenvalues.min() >= -1e-10 * max(1.0, eigenvalues.max())
