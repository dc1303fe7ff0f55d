"""HessianOperator (curvop.operators.hessian): exact products against the dense Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import KERNELS, Case, check_products_match_dense_truth
from torch import nn

from curvop import HessianOperator


# ----------------------------------------------------------------- products against the dense truth
@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_products_match_dense_truth(kernel: str, case: Case):
    """Every kernel, forced, and "auto" (which picks one of them by timing), on every case."""
    if kernel == "forward" and isinstance(case.loss_fn, nn.MSELoss):
        pytest.skip("torch.func cannot run forward-over-reverse through mse_loss (torch 2.13)")
    check_products_match_dense_truth("hessian", case, kernel)


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
