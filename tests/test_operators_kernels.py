"""The kernels of an operator (curvop.operators.kernels): a forced kernel is used alone, an
unknown one is refused, and "auto" drops a kernel torch.func cannot run."""

from __future__ import annotations

import pytest
import torch
from conftest import build_operator, make_case
from torch import nn

from curvop import GaussNewtonOperator, HessianOperator


def test_a_forced_kernel_is_used_alone_and_an_unknown_one_is_refused():
    case = make_case("mlp", "mse", "mean", (4, 4, 3))
    op = build_operator("hessian", case, "looped")
    op.apply(torch.randn(op.shape[0], 3, dtype=torch.float64))
    assert op.kernel_selections[3].kernel == "looped"
    assert set(op.kernel_measurements) == {"looped", "failures"}
    with pytest.raises(
        ValueError, match=r"kernel must be one of \('auto', 'batched', 'looped', 'forward'\)"
    ):
        build_operator("hessian", case, "fastest")
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
