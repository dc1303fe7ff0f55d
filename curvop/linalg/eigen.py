r"""Extreme eigenvalues with ARPACK (SciPy's ``eigsh``), robust on singular operators.

ARPACK accepts a Ritz value :math:`\theta` once its residual bound is below
:math:`\mathrm{tol}\cdot\max(\varepsilon^{2/3}, |\theta|)`: near a zero eigenvalue that is an
absolute :math:`10^{-27}`, which the rounding noise of a product never reaches, so plain
``eigsh(which="SA")`` on a rank-deficient curvature matrix fails to converge. curvop therefore
runs ARPACK in float64 on a normalized, shifted operator whose spectrum lies in about
:math:`[0, 2]`,

.. math::
    B = I + A/s \quad (\texttt{LA}), \qquad B = I - A/s \quad (\texttt{SA}), \qquad
    B = A/s \quad (\texttt{LM}),

with :math:`s` twice the largest Ritz value magnitude of a short Lanczos run, and asks for the
largest eigenvalues of :math:`B` (largest magnitude for ``LM``). A single Krylov space sees only
one vector per distinct eigenvalue, so the bottom end, typically a large cluster of zeros, is
searched again on :math:`B` deflated by the eigenvectors found so far, until no smaller
eigenvalue appears: multiple eigenvalues come back with their multiplicity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse import identity
from scipy.sparse.linalg import ArpackError, LinearOperator, aslinearoperator, eigsh

from ..validation import check_positive_int, check_real
from .adapter import BlockOperator, as_block_operator, as_scipy_float64
from .checks import check_choice, check_optional_positive_int
from .lanczos import lanczos_block
from .probes import make_generator

__all__ = ["top_eigenvalues"]

WHICH = ("LA", "LM", "SA")
SCALE_STEPS = 10  # Lanczos steps of the spectral scale estimate
ATTEMPTS = 3  # ARPACK starts (each with a fresh v0 and twice the ncv) before giving up


@dataclass(frozen=True)
class _Arpack:
    """ARPACK runs with deterministic starts from one private generator, retried on failure."""

    n: int
    generator: torch.Generator
    tol: float
    maxiter: int | None
    ncv: int | None

    def start(self) -> np.ndarray:
        return torch.randn(self.n, generator=self.generator, dtype=torch.float64).numpy()

    def run(
        self, B: LinearOperator, k: int, which: str, found: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``k`` eigenpairs of ``B``; starts are orthogonal to the columns of ``found``."""
        ncv = self.ncv or min(self.n, max(2 * k + 1, 20))
        for _ in range(ATTEMPTS):
            v0 = self.start()
            if found is not None:
                v0 -= found @ (found.T @ v0)
            try:
                return eigsh(B, k, which=which, v0=v0, tol=self.tol, maxiter=self.maxiter, ncv=ncv)
            except ArpackError as error:
                failure, ncv = error, min(self.n, 2 * ncv)
        raise RuntimeError(
            f"ARPACK failed from {ATTEMPTS} random starts ({failure}); pass a larger tol, "
            "maxiter or ncv"
        ) from failure


def _spectral_scale(block: BlockOperator, generator: torch.Generator) -> float:
    """Twice the largest Ritz value magnitude of a few Lanczos steps (1 for a zero operator)."""
    start = torch.randn(block.n, 1, generator=generator, dtype=torch.float64)
    run = lanczos_block(block, start.to(block.device), SCALE_STEPS)
    m = int(run.lengths[0])
    ritz = eigh_tridiagonal(run.alphas[0, :m], run.betas[0, : m - 1], eigvals_only=True)
    return 2 * float(np.abs(ritz).max()) or 1.0


def _with_multiplicity(arpack: _Arpack, B: LinearOperator, k: int) -> tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` largest eigenpairs of ``B``, repeated eigenvalues included.

    Deflate the pairs found, :math:`B - U \operatorname{diag}(\theta) U^\top`, search again and
    merge, until a search finds nothing larger than the current ``k``-th value (at most ``k``
    deflated searches: each adds at least one copy of a repeated eigenvalue).
    """
    theta, U = arpack.run(B, k, "LA")
    for _ in range(k):
        deflated = B - aslinearoperator(U * theta) @ aslinearoperator(U.T)
        new_theta, new_U = arpack.run(deflated, k, "LA", found=U)
        if new_theta.max() <= theta.min() + 10 * arpack.tol:
            break
        order = np.argsort(-np.concatenate([theta, new_theta]), kind="stable")[:k]
        theta, U = np.concatenate([theta, new_theta])[order], np.hstack([U, new_U])[:, order]
    return theta, U


def top_eigenvalues(
    op: Any,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 0.0,
    return_eigenvectors: bool = False,
    seed: int | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` extreme eigenvalues of a symmetric operator, by ARPACK in float64.

    Parameters
    ----------
    op
        A symmetric SciPy ``LinearOperator`` (a curvop operator, ``aslinearoperator(matrix)``, a
        composition). Its products run in its own precision; ARPACK runs in float64.
    k
        Number of eigenvalues, ``1 <= k < n``.
    which
        ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
    tol
        ARPACK's tolerance, relative to the spectral scale: eigenvalues come back accurate to
        about ``tol`` times :math:`\|A\|` (absolute). ``0`` (default) picks ``100 * eps`` of the
        operator's dtype (``2e-14`` for float64, ``1.2e-5`` for float32, whose products carry
        relative noise near ``1e-7``). Resolving a graded cluster at the wanted end (eigenvalues
        far closer together than :math:`\|A\|`, e.g. the many tiny eigenvalues at the bottom of a
        Hessian) costs Krylov methods many products: loosen ``tol`` there.
    return_eigenvectors
        Also return the ``(n, k)`` eigenvectors (float64 numpy, orthonormal columns).
    seed
        Seed of the start vectors (a private generator; the result is deterministic per seed).
    maxiter, ncv
        Passed to ``eigsh`` (``ncv`` doubles on each retry).

    Returns
    -------
    eigenvalues : numpy.ndarray
        ``(k,)`` float64: descending for ``"LA"``, descending in magnitude for ``"LM"``,
        ascending for ``"SA"``.
    eigenvectors : numpy.ndarray
        ``(n, k)``, only with ``return_eigenvectors=True``; column ``j`` belongs to value ``j``.

    Raises
    ------
    RuntimeError
        If ARPACK fails from three random starts.

    Notes
    -----
    Costs about 10 products for the spectral scale plus ARPACK's; ``"SA"`` adds at least one
    deflated search (see the module notes). Every product is one matrix-vector product.

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> A = aslinearoperator(np.diag([3.0, 0.0, 0.0, 0.0, -1.0]))
    >>> top_eigenvalues(A, 2, which="SA", seed=0).round(12) + 0.0
    array([-1.,  0.])
    """
    block = as_block_operator(op)
    k = check_positive_int(k, "k")
    if k >= block.n:
        raise ValueError(f"k must be smaller than n={block.n} (ARPACK's limit), got {k}")
    which = check_choice(which, "which", WHICH)
    tol = check_real(tol, "tol")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    maxiter = check_optional_positive_int(maxiter, "maxiter")
    ncv = check_optional_positive_int(ncv, "ncv")
    if ncv is not None and not k < ncv <= block.n:
        raise ValueError(f"ncv must satisfy k < ncv <= n, i.e. {k} < ncv <= {block.n}, got {ncv}")
    generator = make_generator(seed)
    arpack = _Arpack(block.n, generator, tol or 100 * block.eps, maxiter, ncv)
    scale = _spectral_scale(block, generator)
    A = as_scipy_float64(block) * (1 / scale)
    if which == "LM":
        theta, vectors = arpack.run(A, k, "LM")
        values = scale * theta
        order = np.argsort(-np.abs(values), kind="stable")
    else:
        sign = 1.0 if which == "LA" else -1.0
        B = aslinearoperator(identity(block.n)) + A * sign
        theta, vectors = (
            arpack.run(B, k, "LA") if which == "LA" else _with_multiplicity(arpack, B, k)
        )
        values = sign * scale * (theta - 1)
        order = np.argsort(-theta, kind="stable")
    values, vectors = values[order], vectors[:, order]
    return (values, vectors) if return_eigenvectors else values
