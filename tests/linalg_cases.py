"""Operators of known spectrum for the linalg tests: dense rotations and a tiny MLP."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator
from torch import nn

import curvop

N = 120
OUTLIERS = np.array([10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0])
SPECTRA = {
    "decaying": np.exp(-np.arange(N) / 6.0),  # trace about 6.5, fast decay
    "zero_cluster": np.concatenate([OUTLIERS, np.zeros(N - len(OUTLIERS))]),  # rank 8
    "indefinite": np.linspace(-2.0, 3.0, N),
}


def rotated(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (symmetric to rounding)."""
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * eigenvalues) @ Q.T
    return (A + A.T) / 2


def dense_case(name: str, dtype=np.float64) -> tuple[LinearOperator, np.ndarray, np.ndarray]:
    """The operator, its float64 matrix and its eigenvalues (ascending) for a named spectrum."""
    eigenvalues = np.sort(SPECTRA[name])
    A = rotated(eigenvalues)
    return aslinearoperator(A.astype(dtype)), A, eigenvalues


def hutchinson_std(A: np.ndarray, num_probes: int) -> float:
    r"""Standard deviation of Hutchinson's mean over Rademacher probes:
    :math:`\sqrt{2 (\|A\|_F^2 - \sum_i A_{ii}^2) / m}`."""
    return float(np.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / num_probes))


def mlp_problem(dtype: torch.dtype = torch.float64, samples: int = 6):
    """A 58-parameter tanh MLP with MSE on ``samples`` points: model, loss, data (no global RNG)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
        x = torch.randn(samples, 4, dtype=dtype)
        y = torch.randn(samples, 2, dtype=dtype)
    return model, nn.MSELoss(), (x, y)


def hessian(dtype: torch.dtype = torch.float64) -> curvop.HessianOperator:
    return curvop.HessianOperator(*mlp_problem(dtype))


def gauss_newton(dtype: torch.dtype = torch.float64) -> curvop.GaussNewtonOperator:
    """The GGN has rank at most ``2 * samples = 12`` out of ``n = 58``: a large zero cluster."""
    return curvop.GaussNewtonOperator(*mlp_problem(dtype))
