"""GaussNewtonOperator (curvop.operators.gauss_newton): exact GGN products against the dense
``J^T H J``, for any loss, and the tensor output it needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    F64,
    KERNELS,
    TINY_N,
    Case,
    build_operator,
    check_products_match_dense_truth,
    dense_ggn,
    tiny_batch,
    tiny_linear,
)
from torch import nn

from curvop import GaussNewtonOperator, HessianOperator


# ----------------------------------------------------------------- products against the dense truth
@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_products_match_dense_truth(kernel: str, case: Case):
    """Every kernel, forced, and "auto" (which picks one of them by timing), on every case."""
    check_products_match_dense_truth("ggn", case, kernel)


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
            build_operator("ggn", case).to_dense(), dense_ggn(case).numpy(), atol=1e-10
        )


def test_ggn_equals_hessian_for_linear_model_and_convex_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    ggn = GaussNewtonOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    hessian = HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    np.testing.assert_allclose(ggn, hessian, atol=1e-12)


# --------------------------------------------------------------------- the model's output
def test_ggn_requires_a_tensor_output():
    class DictOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = tiny_linear()

        def forward(self, x):
            return {"logits": self.layer(x)}

    op = GaussNewtonOperator(DictOutput(), nn.MSELoss(), tiny_batch())
    with pytest.raises(
        TypeError,
        match=r"the model returned a dict with keys \['logits'\].*pass output=\"logits\"",
    ):
        op.apply(torch.zeros(TINY_N, dtype=F64))
