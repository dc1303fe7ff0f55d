"""Operators of known spectrum for the linalg tests, and what several linalg test files share.

Dense rotations of named spectra and a tiny MLP (its Hessian and GGN); a small operator for the
argument checks; ``ProductLog`` (the widths of an operator's block products) and
``CountingOperator`` (a dense matrix that counts its column products); hypothesis matrices of any
size and rank for the budget tests.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from scipy.sparse.linalg import LinearOperator, aslinearoperator
from torch import nn

import curvop
from curvop import ProductCost

# ---------------------------------------------------- dense matrices of named spectra, the tiny MLP
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


# --------------------------------------------------- the argument checks: a small diagonal operator
SMALL_N = 6
SMALL_OP = aslinearoperator(np.diag(np.arange(1.0, SMALL_N + 1)))
MAX_LENGTH = 200  # one line in a terminal or a notebook


# ----------------------------------- curvop operators: the GGN's rank, the widths of block products
GGN_RANK = 12  # 6 samples x 2 outputs, out of n = 58


class ProductLog:
    """Records the column count of every pass over the data (the operator's product observers)
    and checks that every block arrives in torch, in the operator's dtype and on its device;
    numpy products fail."""

    def __init__(self, op, monkeypatch):
        self.columns = []
        original = op._block_product

        def block_product(V, memory_bytes):
            assert isinstance(V, torch.Tensor) and V.dim() == 2
            assert V.dtype == op.torch_dtype and V.device == op.device
            return original(V, memory_bytes)

        def no_numpy(*args):
            raise AssertionError("the numpy round trip was used")

        monkeypatch.setattr(op, "_block_product", block_product)
        monkeypatch.setattr(op, "_matvec", no_numpy)
        monkeypatch.setattr(op, "_matmat", no_numpy)
        monkeypatch.setattr(op, "product_observers", [self.columns.append])
        # costs where a wider block is always faster and fits: the widths are the algorithms'
        monkeypatch.setattr(
            op, "product_cost", lambda k, memory_bytes=None: ProductCost(1 + 0.1 * k, 2**10 * k)
        )


# --------------------------------------------------------------------- any budget on any size
budget_settings = settings(max_examples=25, deadline=None)


class CountingOperator(LinearOperator):
    """A dense matrix that counts the columns it multiplies."""

    def __init__(self, A: np.ndarray):
        super().__init__(A.dtype, A.shape)
        self.A, self.products = A, 0

    def _matmat(self, X):
        self.products += X.shape[1]
        return self.A @ X

    def _matvec(self, x):
        self.products += 1
        return self.A @ x


@st.composite
def matrices(draw, max_size: int = 100) -> np.ndarray:
    """Symmetric ``n x n``, ``1 <= n <= max_size``, of any rank: diagonal (axis-aligned range, the
    hard case for Rademacher sketches) or randomly rotated."""
    n = draw(st.integers(1, max_size))
    rank = draw(st.integers(0, n))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    eigenvalues = np.concatenate([rng.standard_normal(rank), np.zeros(n - rank)])
    return np.diag(eigenvalues) if draw(st.booleans()) else rotated(eigenvalues, seed=rank)


def scale(A: np.ndarray) -> float:
    return float(np.abs(A).sum()) + 1e-300
