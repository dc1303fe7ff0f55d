"""CUDA against the CPU: every operator and every algorithm on a small float64 model on the GPU
gives what it gives on the CPU, and results that should stay on the device do.

Marked ``cuda`` and skipped without a CUDA device (CI runs on CPUs only): run them with
``pytest -m cuda`` on a machine with a GPU. Deterministic results (products, eigenvalues, the
Lanczos coefficients, damped solves, and the estimators once their budget reaches ``n``, where
they return exact values) must agree to ``rtol`` 1e-8 (the finite-difference Hessian to its
stated ``accuracy``). Randomized ones draw their probes from a generator on the operator's
device, whose stream differs from the CPU's, so they are checked against the exact value within
their own sampling error instead (with another seed on the CPU side, so that the check could not
pass by the two devices drawing the same probes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid
from torch import nn

import curvop

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
ON_DEVICE = torch.device(DEVICE).type
RTOL = 1e-8
OPERATORS = {
    "hessian": curvop.HessianOperator,
    "ggn": curvop.GaussNewtonOperator,
    "fd_hessian": curvop.FiniteDifferenceHessianOperator,
}
TRACES = ("hutchinson_trace", "hutchpp_trace", "xtrace")
MONTE_CARLO_SHARE = {"hutchinson_trace": 1, "hutchpp_trace": 3, "xtrace": 2}  # 1 / its share of m
DIAGONALS = ("hutchinson_diagonal", "xdiag")


def problem(device: str) -> tuple[nn.Module, nn.Module, list]:
    """A tanh MLP 4-5-3 in float64 (43 parameters, no kinks for the finite differences),
    cross-entropy, batches of 5 and 3 samples, built on the CPU and moved to ``device``."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    batches = [(x[:5].to(device), y[:5].to(device)), (x[5:].to(device), y[5:].to(device))]
    return model.to(device), nn.CrossEntropyLoss(), batches


def operator(kind: str, device: str) -> curvop.CurvatureOperator:
    return OPERATORS[kind](*problem(device))


@pytest.fixture(params=list(OPERATORS))
def kind(request) -> str:
    return request.param


@pytest.fixture
def pair(kind: str) -> tuple[curvop.CurvatureOperator, curvop.CurvatureOperator]:
    """The operator of ``kind`` on the CPU and on the device."""
    return operator(kind, "cpu"), operator(kind, DEVICE)


def rtol_of(op: curvop.CurvatureOperator) -> float:
    """1e-8, or the operator's stated accuracy where it is coarser (finite differences)."""
    return max(RTOL, op.accuracy)


def assert_agree(actual, expected, rtol: float) -> None:
    """Equal to ``rtol`` relative to the largest entry of ``expected`` (host arrays)."""
    actual = torch.as_tensor(np.asarray(actual.cpu() if torch.is_tensor(actual) else actual))
    expected = torch.as_tensor(np.asarray(expected))
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------- products
def test_products_agree(pair):
    cpu, gpu = pair
    V = torch.randn(
        cpu.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    for block in (V, V[:, 0]):
        result = gpu.apply(block.to(DEVICE))
        assert result.device.type == ON_DEVICE
        assert_agree(result, cpu.apply(block), rtol_of(cpu))


def test_block_product_stays_on_the_device(pair):
    _, gpu = pair
    V = torch.randn(gpu.shape[0], 4, dtype=torch.float64, device=DEVICE)
    assert gpu.block_product(V).device.type == ON_DEVICE


def test_scipy_products_agree(pair):
    cpu, gpu = pair
    X = np.random.default_rng(2).standard_normal((cpu.shape[0], 2))
    assert_agree(gpu.matmat(X), cpu.matmat(X), rtol_of(cpu))


# ----------------------------------------------------------------------------- algorithms
def test_top_eigenvalues_agree(pair):
    cpu, gpu = pair  # the start block is drawn on the CPU whatever the device
    expected = curvop.top_eigenvalues(cpu, k=3, seed=0)
    assert_agree(curvop.top_eigenvalues(gpu, k=3, seed=0), expected, rtol_of(cpu))


def test_lanczos_agrees(pair):
    cpu, gpu = pair
    v0 = np.random.default_rng(3).standard_normal(cpu.shape[0])
    alphas, betas = curvop.lanczos(cpu, 8, v0=v0)
    gpu_alphas, gpu_betas = curvop.lanczos(gpu, 8, v0=torch.from_numpy(v0).to(DEVICE))
    assert_agree(gpu_alphas, alphas, rtol_of(cpu))
    assert_agree(gpu_betas, betas, rtol_of(cpu))


def test_slq_extreme_nodes_agree(pair):
    """With as many steps as parameters, SLQ's extreme nodes are the extreme eigenvalues,
    whatever the probes."""
    cpu, gpu = pair
    n = cpu.shape[0]
    expected = curvop.spectral_density(cpu, num_probes=2, num_steps=n, seed=0)
    result = curvop.spectral_density(gpu, num_probes=2, num_steps=n, seed=1)
    ends = [[d.nodes.min(), d.nodes.max()] for d in (result, expected)]
    assert_agree(np.array(ends[0]), np.array(ends[1]), rtol_of(cpu))
    assert trapezoid(result.density, result.grid) == pytest.approx(1.0, abs=1e-6)


def test_kpm_agrees_within_its_sampling_error():
    """KPM's mean eigenvalue is Hutchinson's estimate of tr(A) / n: the two devices' means
    differ by their sampling errors, at most (Rademacher: variance 2(|A|_F^2 - sum A_ii^2))."""
    cpu, gpu = operator("hessian", "cpu"), operator("hessian", DEVICE)
    A, n, probes = cpu.to_dense(), cpu.shape[0], 100
    error = np.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / probes) / n
    width = np.ptp(np.linalg.eigvalsh(A))
    means = []
    for op, seed in ((cpu, 0), (gpu, 1)):
        options = {"method": "kpm", "num_probes": probes, "num_steps": 40, "seed": seed}
        density = curvop.spectral_density(op, **options)
        assert trapezoid(density.density, density.grid) == pytest.approx(1.0, abs=1e-6)
        means.append(trapezoid(density.grid * density.density, density.grid))
    assert abs(means[0] - means[1]) <= 6 * np.sqrt(2) * error + 0.02 * width


@pytest.mark.parametrize("name", TRACES + DIAGONALS)
def test_estimators_agree_on_their_exact_path(pair, name):
    """From ``n`` products on, every estimator returns the exact trace or diagonal."""
    cpu, gpu = pair
    n = cpu.shape[0]
    expected, result = (getattr(curvop, name)(op, n, seed=0) for op in (cpu, gpu))
    if name in TRACES:
        expected, result = np.array([expected.value]), np.array([result.value])
    assert_agree(result, expected, rtol_of(cpu))


@pytest.mark.parametrize("name", TRACES)
def test_trace_estimators_agree_within_their_error(name):
    """Within six standard deviations of Hutchinson's estimate with as many probes as the
    estimator spends on its Monte-Carlo part (m, m/3 for Hutch++, m/2 for XTrace): the others'
    variance reduction only makes them better (their own standard errors, from a few samples,
    are too rough a yardstick)."""
    cpu, gpu = operator("hessian", "cpu"), operator("hessian", DEVICE)
    A, m = cpu.to_dense(), 24
    probes = m // MONTE_CARLO_SHARE[name]
    deviation = np.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / probes)
    for op, seed in ((cpu, 0), (gpu, 1)):
        estimate = getattr(curvop, name)(op, m, seed=seed)
        assert abs(estimate.value - np.trace(A)) <= 6 * deviation


@pytest.mark.parametrize("name", DIAGONALS)
def test_diagonal_estimators_return_host_arrays(name):
    gpu = operator("hessian", DEVICE)
    result = getattr(curvop, name)(gpu, 12, seed=0)
    assert isinstance(result, np.ndarray) and result.dtype == np.float64
    assert result.shape == (gpu.shape[0],) and np.isfinite(result).all()


def test_solve_damped_agrees_and_stays_on_the_device(pair):
    cpu, gpu = pair
    b = np.random.default_rng(4).standard_normal(cpu.shape[0])
    # minres: any symmetric A + I; the finite differences are symmetric to their accuracy only
    options = {"method": "minres", "rtol": max(1e-12, cpu.accuracy / 100)}
    expected = curvop.solve_damped(cpu, b, 1.0, **options)
    result = curvop.solve_damped(gpu, torch.from_numpy(b).to(DEVICE), 1.0, **options)
    assert result.converged and expected.converged
    assert torch.is_tensor(result.x) and result.x.device.type == ON_DEVICE
    assert_agree(result.x, expected.x, rtol_of(cpu))
