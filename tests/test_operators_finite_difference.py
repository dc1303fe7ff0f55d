"""FiniteDifferenceHessianOperator (curvop.operators.finite_difference): products against the
dense Hessian, the scheme, the step and the precision, and float32 ReLU networks.

float32 differences across ReLU kinks once gave products wrong by factors of 10-100 on a small
CNN (and an operator so asymmetric that the eigensolver never converged): these cases would have
caught it. (The symmetry checks that guard every Krylov method against such an operator are in
test_operators_base.py and test_linalg_workspace.py.)
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import (
    F64,
    TINY_N,
    Case,
    check_products_match_dense_truth,
    dense_hessian,
    make_case,
    relative_error,
    relu_mlp,
    relu_mlp_data,
    tiny_batch,
    tiny_closure,
    tiny_linear,
)
from torch import nn

import curvop
from curvop import FiniteDifferenceHessianOperator, HessianOperator, KinkError
from curvop.operators.finite_difference import ACCURACY


# ----------------------------------------------------------------- products against the dense truth
def test_products_match_dense_truth(case: Case):
    check_products_match_dense_truth("fd", case, None)


def test_finite_differences_float32_accuracy_on_relu_network():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    exact = HessianOperator(model, nn.CrossEntropyLoss(), data)
    approx = FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data)
    assert approx.dtype == np.float32
    V = torch.randn(exact.shape[0], 4, generator=torch.Generator().manual_seed(1))
    errors = (approx.apply(V) - exact.apply(V)).norm(dim=0) / exact.apply(V).norm(dim=0)
    assert errors.max() < 1e-2


def test_finite_differences_forward_scheme_and_explicit_step():
    case = make_case("mlp", "mse", "mean", (4, 4, 3))
    truth = dense_hessian(case).numpy()
    forward = FiniteDifferenceHessianOperator(case.model, case.loss_fn, case.data, scheme="forward")
    fixed = FiniteDifferenceHessianOperator(case.model, case.loss_fn, case.data, eps=1e-5)
    assert relative_error(forward.to_dense(), truth) < 1e-5
    assert relative_error(fixed.to_dense(), truth) < 1e-8


# --------------------------------------------------------------------- float32 ReLU networks
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


def images(seed: int, samples: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random CIFAR-like images in two batches (the second one shorter)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    cut = samples * 2 // 3
    return [(x[:cut], y[:cut]), (x[cut:], y[cut:])]


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
    "mlp-200": lambda: (relu_mlp(4), relu_mlp_data(200, 4)),
    "mlp-150": lambda: (relu_mlp(5), relu_mlp_data(150, 5)),
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


# ----------------------------------------------------------- the scheme, the step and the precision
@pytest.mark.parametrize("scheme", ["backward", "", None])
def test_an_unknown_scheme_is_rejected(scheme):
    with pytest.raises(ValueError, match=r"scheme must be one of \('central', 'forward'\)"):
        FiniteDifferenceHessianOperator(tiny_linear(), nn.MSELoss(), tiny_batch(), scheme=scheme)
    func, params = tiny_closure()
    with pytest.raises(ValueError, match="scheme must be one of"):
        FiniteDifferenceHessianOperator.from_function(func, params, scheme=scheme)


@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), float("inf"), "1e-3", True])
def test_a_bad_step_is_rejected(eps):
    with pytest.raises(ValueError, match=r"eps must be a positive finite real number, got"):
        FiniteDifferenceHessianOperator(tiny_linear(), nn.MSELoss(), tiny_batch(), eps=eps)


def test_a_valid_step_is_accepted():
    op = FiniteDifferenceHessianOperator(
        tiny_linear(), nn.MSELoss(), tiny_batch(), eps=np.float32(1e-4)
    )
    assert op.apply(torch.ones(TINY_N, dtype=F64)).isfinite().all()


def test_an_unknown_precision_is_refused():
    model, data = CASES["mlp-150"]()
    with pytest.raises(ValueError, match=r"precision must be one of \('float64', 'native'\)"):
        FiniteDifferenceHessianOperator(model, nn.CrossEntropyLoss(), data, precision="half")
