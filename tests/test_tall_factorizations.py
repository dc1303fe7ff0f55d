"""No factorization but QR ever sees a matrix with n rows (cuSOLVER's SVD of a tall matrix fails
from about 11M rows): every SVD, eigendecomposition, inverse and solve is made to refuse inputs
of more than ROWS rows while every algorithm runs on an operator with n = 3000."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.sparse.linalg import aslinearoperator

import curvop

ROWS = 2000
N = 3000
GUARDED = {
    torch.linalg: ["svd", "svdvals", "eigh", "eigvalsh", "eig", "eigvals", "pinv", "lstsq",
                   "matrix_rank", "cholesky", "inv", "solve"],
    torch: ["svd", "pinverse", "cholesky", "inverse", "svd_lowrank", "pca_lowrank", "lobpcg"],
    np.linalg: ["svd", "eigh", "eigvalsh", "eig", "pinv", "lstsq", "cholesky", "inv", "solve"],
    scipy.linalg: ["svd", "svdvals", "eigh", "eigvalsh", "eig", "pinv", "lstsq", "cholesky",
                   "inv", "solve", "eigh_tridiagonal"],
}  # fmt: skip


def _guard(function):
    def guarded(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            shape = getattr(value, "shape", ())
            if len(shape) >= 2 and shape[-2] > ROWS:
                raise AssertionError(f"{function.__name__} of a matrix of shape {tuple(shape)}")
            if function.__name__ == "eigh_tridiagonal" and len(shape) == 1 and shape[0] > ROWS:
                raise AssertionError(f"eigh_tridiagonal of size {shape[0]}")
        return function(*args, **kwargs)

    return guarded


@pytest.fixture
def no_tall_factorizations(monkeypatch):
    originals = {
        getattr(owner, name): (owner, name) for owner, names in GUARDED.items() for name in names
    }
    for function, (owner, name) in originals.items():
        monkeypatch.setattr(owner, name, _guard(function))
    for module in [m for key, m in sys.modules.items() if key.startswith("curvop")]:
        for attribute, value in list(vars(module).items()):
            if callable(value) and value in originals:  # imported by name
                monkeypatch.setattr(module, attribute, _guard(value))


def test_the_guard_catches_a_tall_svd(no_tall_factorizations):
    with pytest.raises(AssertionError, match="svd of a matrix of shape"):
        torch.linalg.svd(torch.zeros(ROWS + 1, 3))
    torch.linalg.svd(torch.zeros(ROWS, 3))  # small enough


CALLS = {
    "top-LA-blocks": lambda op: curvop.top_eigenvalues(op, 5, seed=0, block_size=6),
    "top-LA-single": lambda op: curvop.top_eigenvalues(op, 5, seed=0, block_size=1),
    "top-SA": lambda op: curvop.top_eigenvalues(op, 3, which="SA", seed=0, tol=1e-6),
    "top-LM-vectors": lambda op: curvop.top_eigenvalues(op, 4, which="LM", seed=0, return_eigenvectors=True),
    "lanczos": lambda op: curvop.lanczos(op, 30, seed=0),
    "slq": lambda op: curvop.spectral_density(op, num_probes=3, num_steps=30, seed=0),
    "kpm": lambda op: curvop.spectral_density(op, method="kpm", num_probes=3, num_steps=30, seed=0),
    "hutchinson": lambda op: curvop.hutchinson_trace(op, 30, seed=0),
    "hutchpp": lambda op: curvop.hutchpp_trace(op, 30, seed=0),
    "xtrace": lambda op: curvop.xtrace(op, 30, seed=0),
    "hutchinson-diagonal": lambda op: curvop.hutchinson_diagonal(op, 30, seed=0),
    "xdiag": lambda op: curvop.xdiag(op, 30, seed=0),
    "cg": lambda op: curvop.solve_damped(op, np.ones(N), 1.0),
    "minres": lambda op: curvop.solve_damped(op, np.ones(N), -0.5, method="minres"),
}  # fmt: skip


@pytest.mark.parametrize("call", CALLS)
def test_every_algorithm_factors_only_small_matrices(call, no_tall_factorizations):
    rng = np.random.default_rng(0)
    diagonal = np.concatenate(
        [rng.uniform(1.0, 10.0, 20), np.zeros(20), rng.uniform(0, 0.1, N - 40)]
    )
    op = aslinearoperator(np.diag(diagonal))  # a low-rank part, a zero cluster and a bulk
    CALLS[call](op)
