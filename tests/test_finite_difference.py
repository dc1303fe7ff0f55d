"""The finite-difference Hessian on float32 ReLU networks, and the symmetry checks that guard
every Krylov method against an operator that is not symmetric.

float32 differences across ReLU kinks once gave products wrong by factors of 10-100 on a small
CNN (and an operator so asymmetric that the eigensolver never converged): these cases would have
caught it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

import curvop
from curvop import FiniteDifferenceHessianOperator, GaussNewtonOperator, HessianOperator, KinkError
from curvop.operators.finite_difference import ACCURACY

STATED = ACCURACY["float64"]  # the documented relative accuracy of a product: 1e-5
BAR = 10 * STATED  # measured ~2e-6 on these cases: the bar keeps a margin of 10 over the doc


def relu_cnn(seed: int, size: int) -> nn.Module:
    """Conv(3->8)-ReLU-Conv(8->8)-ReLU-pool-Linear, as in the report (1,138 parameters at 32x32)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip


def relu_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )


def images(seed: int, samples: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random CIFAR-like images in two batches (the second one shorter)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    cut = samples * 2 // 3
    return [(x[:cut], y[:cut]), (x[cut:], y[cut:])]


def vectors(samples: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 64, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return [(x[:100], y[:100]), (x[100:], y[100:])]


def float64_twin(model: nn.Module, data: list) -> HessianOperator:
    """The exact Hessian of the same weights and data in float64: what FD approximates."""
    twin = [(x.double(), y) for x, y in data]
    return HessianOperator(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), twin)


CASES = {
    # name: (model, data); CIFAR-shaped (3x32x32) at 32 and 64 samples, 16x16 at 128 and 200
    "cnn-32x32-32": lambda: (relu_cnn(0, 32), images(0, 32, 32)),
    "cnn-32x32-64": lambda: (relu_cnn(1, 32), images(1, 64, 32)),
    "cnn-16x16-128": lambda: (relu_cnn(2, 16), images(2, 128, 16)),
    "cnn-16x16-200": lambda: (relu_cnn(3, 16), images(3, 200, 16)),
    "mlp-200": lambda: (relu_mlp(4), vectors(200, 4)),
    "mlp-150": lambda: (relu_mlp(5), vectors(150, 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_relu_products_match_the_exact_hessian_and_are_symmetric(name):
    model, data = CASES[name]()
    fd = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data)
    assert fd.dtype == np.float32
    V = torch.randn(fd.shape[0], 2, generator=torch.Generator().manual_seed(7))
    FV = fd.apply(V).double()
    truth = float64_twin(model, data).apply(V.double())
    errors = (FV - truth).norm(dim=0) / truth.norm(dim=0)
    assert errors.max() < BAR, errors
    # the issue's own bar, against the float32 exact Hessian (which itself differs from the
    # float64 one by up to ~1e-3 where a pre-activation sits within rounding of a kink)
    exact32 = HessianOperator(model, nn.CrossEntropyLoss(), data).apply(V).double()
    assert ((FV - exact32).norm(dim=0) / exact32.norm(dim=0)).max() < 1e-2
    v, w = V.double().unbind(1)
    asymmetry = abs(w @ FV[:, 0] - v @ FV[:, 1]) / (FV[:, 0].norm() * w.norm())
    assert asymmetry < BAR
    assert fd.check_symmetric() < BAR


def test_top_eigenvalues_of_a_float32_relu_cnn_match_the_exact_hessian():
    """The report's journey: FD printed eigenvalues 9.02, 7.80, 4.20 for exact 0.66, 0.55, 0.51."""
    model, data = relu_cnn(6, 16), images(6, 48, 16)
    fd = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data)
    truth = float64_twin(model, data)
    top = curvop.top_eigenvalues(fd, k=3, seed=0, tol=1e-4)
    exact = curvop.top_eigenvalues(truth, k=3, seed=0, tol=1e-8)
    # tol bounds the residual by 1e-4 ||A||; the products add their stated 1e-5
    np.testing.assert_allclose(top, exact, atol=2e-4 * exact[0])


def test_native_float32_differences_refuse_a_relu_cnn_instead_of_returning_garbage():
    model, data = CASES["cnn-32x32-64"]()
    fd = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data, precision="native")
    assert fd.accuracy == ACCURACY["native"]
    with pytest.raises(KinkError, match="HessianOperator") as info:
        fd.apply(torch.randn(fd.shape[0], generator=torch.Generator().manual_seed(0)))
    assert "kinks" in str(info.value) and "precision='float64'" in str(info.value)


def test_native_differences_stay_accurate_on_a_smooth_float32_network():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    generator = torch.Generator().manual_seed(0)
    data = (
        torch.randn(64, 8, generator=generator),
        torch.randint(0, 3, (64,), generator=generator),
    )
    fd = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data, precision="native")
    V = torch.randn(fd.shape[0], 3, generator=generator)
    truth = float64_twin(model, [data]).apply(V.double())
    errors = (fd.apply(V).double() - truth).norm(dim=0) / truth.norm(dim=0)
    assert errors.max() < ACCURACY["native"]


def test_a_kink_crossed_at_every_step_raises_naming_the_batch():
    """|w| has its kink at w = 0, closer to w than the smallest retried step."""
    w = torch.full((3,), 1e-14, dtype=torch.float64, requires_grad=True)
    fd = FiniteDifferenceHessianOperator.from_function(lambda: w.abs().sum(), [w])
    with pytest.raises(KinkError, match="batch 0, column 0"):
        fd.apply(torch.ones(3, dtype=torch.float64))


def test_an_unknown_precision_is_refused():
    model, data = CASES["mlp-150"]()
    with pytest.raises(ValueError, match=r"precision must be one of \('float64', 'native'\)"):
        FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data, precision="half")


# ------------------------------------------------------------------------------ symmetry
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


@pytest.mark.parametrize(
    "cls", [HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_symmetric_passes_on_every_operator(cls, dtype):
    model, data = CASES["mlp-150"]()
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


@pytest.mark.parametrize(
    "run",
    [
        lambda op: curvop.top_eigenvalues(op, k=2, seed=0),
        lambda op: curvop.top_eigenvalues(op, k=1, which="SA", seed=0),
        lambda op: curvop.lanczos(op, 20, seed=0),
        lambda op: curvop.spectral_density(op, num_probes=2, num_steps=20, seed=0),
        lambda op: curvop.solve_damped(op, np.ones(op.shape[0]), 1.0),
        lambda op: curvop.solve_damped(op, np.ones(op.shape[0]), 1.0, method="minres"),
    ],
    ids=["top-LA", "top-SA", "lanczos", "slq", "cg", "minres"],
)
@pytest.mark.parametrize("kind", ["curvop", "matrix"])
def test_krylov_methods_stop_with_a_clear_error_on_an_asymmetric_operator(run, kind):
    op = skewed(1e-3)
    if kind == "matrix":
        op = aslinearoperator(op.to_dense())
    with (
        curvop.count_products(op) as count,
        pytest.raises(ValueError, match="op must be symmetric"),
    ):
        run(op)
    assert count.columns <= 40  # stopped within a few products, not after maxiter


def test_krylov_methods_accept_asymmetry_within_the_allowance():
    op = skewed(1e-13)  # rounding-sized: below sqrt(eps) of float64
    assert curvop.top_eigenvalues(op, k=2, seed=0).shape == (2,)
    assert curvop.solve_damped(op, np.ones(op.shape[0]), 1.0).converged
