r"""The Lanczos process with full reorthogonalization, for one or many start vectors at once.

From a unit start vector :math:`q_1`, Lanczos builds an orthonormal basis :math:`Q_m` of the
Krylov space :math:`\mathcal{K}_m(A, q_1)` in which :math:`A` is tridiagonal:

.. math::
    Q_m^\top A Q_m = T_m =
    \begin{pmatrix} \alpha_1 & \beta_1 & & \\ \beta_1 & \alpha_2 & \ddots & \\
    & \ddots & \ddots & \beta_{m-1} \\ & & \beta_{m-1} & \alpha_m \end{pmatrix}.

The eigenvalues of :math:`T_m` (Ritz values) approximate the extremes of the spectrum; its
eigenvectors' first components give the Gauss quadrature of :math:`q_1^\top f(A) q_1`. Every new
vector is orthogonalized against the whole basis (a second time where the first sweep removed
most of it), kept in float64 or, for SLQ, in the operator's dtype: without it, rounding errors
make Ritz values repeat ("ghost" eigenvalues), above all in float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ..validation import as_float64_vector, check_positive_int, check_seed
from .workspace import Workspace, open_workspace, raise_not_symmetric

__all__ = ["LanczosRun", "breakdown_tolerance", "lanczos", "lanczos_block"]

TWICE_IS_ENOUGH = 2**-0.5  # a second Gram-Schmidt sweep where one removed more of the norm
BREAKDOWN_EXPONENT = 0.75  # a residual below eps**0.75 of ||A|| is rounding: a breakdown
WORKING_VECTORS = 4  # n-vectors per process besides its basis: q, the previous q, w, a copy


def breakdown_tolerance(work: Workspace) -> float:
    r"""Relative size :math:`\beta / \|A\|` below which a residual is rounding noise: an invariant
    subspace was found.

    :math:`\varepsilon^{3/4}` of the products' dtype (``1.8e-12`` in float64, ``6.4e-6`` in
    float32), or the operator's stated accuracy where that is larger (a finite-difference
    operator's products carry no more). The residual of an exactly invariant subspace is the
    rounding of the products and of the orthogonalization, hundreds of :math:`\varepsilon` of
    :math:`\|A\|`; :math:`\sqrt{\varepsilon}` (``3.5e-4`` in float32) stopped processes whose
    residuals were real, in a narrow bulk of a wide spectrum.
    """
    return max(work.eps**BREAKDOWN_EXPONENT, work.op.accuracy)


class LanczosRun(NamedTuple):
    """Tridiagonal coefficients of ``p`` Lanczos processes run side by side.

    Attributes
    ----------
    alphas : numpy.ndarray
        ``(p, m)`` diagonals; row ``j`` is valid up to ``lengths[j]``, zero after.
    betas : numpy.ndarray
        ``(p, m)`` off-diagonals; ``betas[j, lengths[j] - 1]`` is the norm of the final residual
        (the Ritz residual scale), zero after.
    lengths : numpy.ndarray
        ``(p,)`` number of steps each process took (fewer than ``m`` after an invariant subspace).
    """

    alphas: np.ndarray
    betas: np.ndarray
    lengths: np.ndarray


def _check_symmetric(
    coefficients: torch.Tensor, scale: torch.Tensor, active: torch.Tensor, work: Workspace
) -> None:
    r"""Raise unless :math:`Aq_j` couples to the basis as symmetry demands.

    For symmetric :math:`A`, :math:`q_i^\top A q_j = 0` for :math:`i < j - 1` and
    :math:`q_{j-1}^\top A q_j = \beta_{j-1}`, so once the three-term recurrence has subtracted
    :math:`\alpha_j q_j + \beta_{j-1} q_{j-1}`, the Gram-Schmidt ``coefficients`` ``(p, j + 1)``
    of the residual against the basis are zero up to rounding. One beyond the operator's symmetry
    tolerance times ``scale`` (the largest :math:`\|A q_i\|` so far, a lower bound of
    :math:`\|A\|` on the scale of the products' rounding errors; :math:`|\alpha_1|` alone can be
    tiny, a probe's Rayleigh quotient in a bulk near zero, and made rounding look like asymmetry)
    raises ``ValueError``.
    """
    relative = coefficients.abs().amax(1) / scale.clamp_min(torch.finfo(scale.dtype).tiny)
    worst = float(torch.where(active.to(relative.device), relative, 0.0).max())
    if worst > work.symmetry_tolerance:
        raise_not_symmetric(worst, work.symmetry_tolerance)


def _reorthogonalize(
    previous: torch.Tensor,
    w: torch.Tensor,
    norm: torch.Tensor,
    active: torch.Tensor,
    work: Workspace,
) -> torch.Tensor:
    r"""The rows of ``w`` (``(p, n)``) made orthogonal to the basis ``previous`` (``(p, j, n)``).

    Classical Gram-Schmidt against the whole basis, once; again only when the first sweep
    removed more than :data:`TWICE_IS_ENOUGH` of a row's norm (Kahan's and Parlett's rule:
    then what is left may not be orthogonal to working precision). After the three-term
    recurrence the residual is orthogonal up to rounding, so the second sweep, which would double
    the cost of reading the basis, is rarely needed. The first sweep's coefficients feed the
    symmetry check. Both projections are batched matrix products with ``previous`` in its
    memory order (a batched matrix-vector product would read it several times slower).
    """
    for sweep in range(2):
        coefficients = torch.bmm(w.to(previous.dtype)[:, None], previous.transpose(1, 2))
        if sweep == 0:
            _check_symmetric(coefficients[:, 0].double(), norm, active, work)
        before = torch.linalg.vector_norm(w, dim=1)
        if previous.dtype == w.dtype:  # fused: w - c B in one pass over the basis
            w = torch.baddbmm(w[:, None], coefficients, previous, alpha=-1)[:, 0]
        else:
            w = w - torch.bmm(coefficients, previous)[:, 0].to(w.dtype)
        if not bool((torch.linalg.vector_norm(w, dim=1) < TWICE_IS_ENOUGH * before).any()):
            break
    return w


def _products(work: Workspace, q: torch.Tensor, active: torch.Tensor, kept: int) -> torch.Tensor:
    """The rows :math:`A q_i` (``(p, n)``) of the active processes, in ``q``'s dtype; zero rows
    for the others. ``kept``: the bytes of vectors the processes hold."""
    if bool(active.all()):
        return work.multiply(q.T, kept, q.dtype).T
    rows = active.nonzero().squeeze(1).to(q.device)
    w = torch.zeros_like(q)
    w[rows] = work.multiply(q[rows].T, kept, q.dtype).T
    return w


def lanczos_block(
    work: Workspace,
    start: torch.Tensor,
    num_steps: int,
    basis_dtype: torch.dtype = torch.float64,
) -> LanczosRun:
    r"""Run one Lanczos process per column of ``start`` (``(n, p)``), all products as one block.

    A process stops early when its residual norm :math:`\beta_j` falls to rounding, below
    :func:`breakdown_tolerance` times the largest product norm so far (a lower bound of
    :math:`\|A\|`): an invariant subspace; its later columns are no longer multiplied. At most
    ``n`` steps are taken. The basis of ``p * num_steps`` vectors and the working vectors are
    kept in ``basis_dtype`` (float64, or the operator's own dtype to halve the memory, with
    orthogonality to that precision); the coefficients are float64. The Lanczos vectors are
    rows here, so that each process' basis is one contiguous ``(num_steps, n)`` matrix.
    """
    n, p = start.shape
    m = min(num_steps, n)
    start = start.to(basis_dtype)
    q = (start / torch.linalg.vector_norm(start, dim=0)).T.contiguous()
    basis = torch.empty(p, m, n, dtype=basis_dtype, device=start.device)
    kept = (basis.numel() + WORKING_VECTORS * p * n) * basis.itemsize
    alphas = torch.zeros(p, m, dtype=torch.float64, device=start.device)
    betas = torch.zeros(p, m, dtype=torch.float64, device=start.device)
    lengths = torch.full((p,), m, dtype=torch.long)
    norm = torch.zeros(p, dtype=torch.float64, device=start.device)  # largest ||A q_j|| so far
    active = torch.ones(p, dtype=torch.bool)
    tolerance = breakdown_tolerance(work)
    previous_q = torch.zeros_like(q)
    for step in range(m):
        basis[:, step] = q
        w = _products(work, q, active, kept)
        alphas[:, step] = (q * w).sum(1, dtype=torch.float64)
        norm = torch.maximum(norm, torch.linalg.vector_norm(w, dim=1, dtype=torch.float64))
        w -= alphas[:, step, None] * q
        if step:
            w -= betas[:, step - 1, None] * previous_q
        w = _reorthogonalize(basis[:, : step + 1], w, norm, active, work)
        beta = torch.linalg.vector_norm(w, dim=1, dtype=torch.float64)
        betas[:, step] = beta
        stopped = (beta <= tolerance * norm).cpu() & active
        lengths[stopped] = step + 1
        active &= ~stopped
        if not active.any():
            break
        keep = active.to(w.device)[:, None]
        previous_q = q
        q = torch.where(keep, w / torch.where(keep, beta[:, None], 1.0).to(w.dtype), 0.0)
    mask = torch.arange(m) < lengths[:, None]
    return LanczosRun((alphas.cpu() * mask).numpy(), (betas.cpu() * mask).numpy(), lengths.numpy())


def lanczos(
    op: Any, num_steps: int, *, v0: Any = None, seed: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    r"""The Lanczos tridiagonal matrix of ``op`` from ``v0`` (or a random start).

    Parameters
    ----------
    op
        A symmetric SciPy ``LinearOperator`` (a curvop operator runs in torch on its device).
    num_steps
        Number of steps ``m`` (at most ``n`` are taken).
    v0
        Start vector, numpy or torch ``(n,)``, nonzero; default a Rademacher vector.
    seed
        Seed of the random start (only without ``v0``).
    progress
        Show a progress bar of the products (tqdm; see :mod:`curvop.progress`).

    Returns
    -------
    alphas, betas : numpy.ndarray
        The diagonal (length ``m``) and off-diagonal (length ``m - 1``) of :math:`T_m`; shorter
        when an invariant subspace is found early. ``scipy.linalg.eigh_tridiagonal(alphas,
        betas)`` gives the Ritz values.

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> alphas, betas = lanczos(aslinearoperator(np.diag([1.0, 2.0, 3.0])), 5, seed=0)
    >>> len(alphas)
    3
    """
    work = open_workspace(op, None)
    num_steps = check_positive_int(num_steps, "num_steps")
    seed = check_seed(seed)
    if v0 is None:
        start = work.probes(1, work.generator(seed), dtype=torch.float64)
    elif seed is not None:
        raise ValueError("give either v0 or seed, not both: seed only draws a random start")
    else:
        start = torch.from_numpy(as_float64_vector(v0, "v0", work.n)).to(work.device)[:, None]
        if not start.any():
            raise ValueError("v0 must be nonzero")
    with work.counting(progress, min(num_steps, work.n), "Lanczos"):
        run = lanczos_block(work, start, num_steps)
    m = int(run.lengths[0])
    return run.alphas[0, :m], run.betas[0, : m - 1]
