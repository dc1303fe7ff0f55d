"""Half-precision models (float16, bfloat16): products weighted and summed in float32, a float32
SciPy face, accuracy stated at the half dtype's level, and the toolkit on top."""

from __future__ import annotations

from copy import deepcopy as copy_module

import numpy as np
import pytest
import torch
from torch import nn

import curvop

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
