r"""Extreme eigenvalues by thick-restart Lanczos: with blocks, robust on degenerate clusters;
with a single vector where blocks cost as much per column as single products.

A single-vector Krylov space :math:`\mathcal{K}_m(A, v)` holds one vector per *distinct*
eigenvalue: a multiple eigenvalue at the wanted end (the large cluster of zeros at the bottom of a
generalized Gauss-Newton matrix, or the top of its negation) is seen once, and its other copies
only through rounding noise, so ARPACK (``eigsh``) needs many restarts and deflated searches
there, and misses copies. curvop runs a block Lanczos process from :math:`p = k + 1` random
columns :math:`X` instead (the guard column keeps the start block's projection on a ``k``-fold
eigenspace well conditioned),

.. math::
    \mathcal{K}_m(A, X) = \operatorname{span}\{X, AX, \dots, A^{m-1}X\},

whose start block alone has :math:`\min(p, \text{multiplicity})` independent components in each
eigenspace: a ``k``-fold eigenvalue comes back with its multiplicity from one run, and all ``p``
columns of a step are multiplied in one block product. The orthonormal basis :math:`V` is kept in
float64 on the operator's device; every new block is orthogonalized against all of it (twice
where the first sweep removed most of its norm).
With :math:`A Q_j = V H_j + Q_{j+1} R` for the last block :math:`Q_j`, the Ritz pairs
:math:`(\theta, Vy)` of :math:`T = V^\top A V` have residuals

.. math::
    \|A V y - \theta\, V y\| = \|R\, y_{\mathrm{last}}\|

(:math:`y_{\mathrm{last}}`: the rows of :math:`y` on :math:`Q_j`); the run stops once the ``k``
wanted ones are below :math:`\mathrm{tol}\cdot\|A\|`, each then within that distance of an
eigenvalue (:math:`\|A\|` is estimated by the largest Ritz value and product column seen). When
the basis reaches ``ncv`` columns it is thick-restarted: :math:`V \leftarrow V Y` for the Ritz
vectors of the wanted end that fill half of it. A basis of ``n`` columns spans the whole space,
so with ``ncv = n`` (the block method's default up to ``n = 120`` within ``memory_gb``) the
method is exact after at most about ``n`` products. A block without new directions (an
invariant subspace, e.g. the range of a low-rank operator plus :math:`X`) is refilled with
random vectors; such a subspace already holds every eigenspace whole or with :math:`p > k` of
its directions, so its ``k`` wanted Ritz values are the wanted eigenvalues, none of them
standing in for a copy it misses.

The same code with a block of one column is the single-vector thick-restart Lanczos method of
ARPACK. It needs fewer column products on separated eigenvalues (0.5 to 0.6 of the block
method's: 109 against 192 for the top 5 of a 269k-parameter MLP, 46 against 96 on a CNN) and a
smaller basis, so it is chosen unless the operator measures that a column in a block costs at
most ``BLOCK_PAYS`` of one alone (no benchmark model does: 0.5 to 0.75 on an MLP, a CNN and
ResNet-20, about 1 on a transformer, where the second backward pass is paid per column); it
shares ARPACK's blind spot for exact multiplicities, so ``"SA"`` always keeps blocks.

Every step checks that the new block couples to the older basis vectors as a symmetric operator
must (:func:`_check_coupling`): a non-symmetric operator (finite differences across kinks) stops
with a ``ValueError`` instead of a run that never converges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh

from ..progress import counting
from ..validation import check_positive_int, check_real
from .adapter import BlockOperator, as_block_operator, raise_not_symmetric
from .checks import check_choice, check_optional_positive_int
from .lanczos import TWICE_IS_ENOUGH

__all__ = ["top_eigenvalues"]

WHICH = ("LA", "LM", "SA")
GUARD = 1  # block columns beyond k
BASIS = 120  # default basis size (ncv) at most, when the memory budget allows
SINGLE_BASIS = 20  # the least basis of single-vector Lanczos (ARPACK's default ncv)
BLOCK_PAYS = 0.4  # blocks are used when a column in a block costs at most this of one alone
CHEAP_COLUMN = 0.005  # seconds on the first batch: below it, always blocks (see _choose_width)


def _wanted_first(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of the ascending Ritz values ``theta``, the wanted end first."""
    if which == "SA":
        return np.arange(len(theta))
    if which == "LA":
        return np.arange(len(theta))[::-1]
    return np.argsort(-np.abs(theta), kind="stable")


def _orthogonalize(B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W`` minus its projection on the orthonormal rows of ``B`` (Gram-Schmidt, once)."""
    return W - B.T @ (B @ W)


def _reorthogonalized(B: torch.Tensor, W: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """``projected`` (``W`` after one Gram-Schmidt sweep against ``B``) swept again where the first
    sweep removed more than :data:`TWICE_IS_ENOUGH` of a column's norm (the test ARPACK's
    ``dsaitr`` makes: otherwise one sweep leaves it orthogonal to working precision, and a second
    would read the whole basis again for nothing)."""
    kept = torch.linalg.vector_norm(projected, dim=0) / torch.linalg.vector_norm(W, dim=0)
    if bool((kept < TWICE_IS_ENOUGH).any()):
        return _orthogonalize(B, projected)
    return projected


def _check_coupling(
    coupling: np.ndarray, expected: np.ndarray, tolerance: float, norm: float
) -> None:
    r"""Raise unless the new block couples to the older basis vectors as symmetry demands.

    For symmetric :math:`A`, :math:`V_{\mathrm{old}}^\top A Q = (Q^\top A V_{\mathrm{old}})^\top`
    is known before the product: zero but for the previous block (:math:`R^\top`) or, after a
    restart, the kept Ritz vectors. A deviation beyond ``tolerance`` (the operator's symmetry
    tolerance) times ``norm`` (:math:`\|A\|`) means :math:`A` is not symmetric: a
    ``ValueError`` now, rather than a run that never converges.
    """
    if coupling.size and norm > 0:
        relative = float(np.abs(coupling - expected).max()) / norm
        if relative > tolerance:
            raise_not_symmetric(relative, tolerance)


def _next_block(
    W: torch.Tensor, B: torch.Tensor, width: int, floor: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The next orthonormal block ``Q`` (``width`` columns at most) and ``R`` with ``W ~ Q R``.

    ``W`` is orthogonal to the basis rows ``B``. With its SVD :math:`W = U S Z^\top`,
    directions with :math:`s_i \le` ``floor`` (none new) become random vectors, orthogonalized
    against ``B`` (as is a normalized direction of rounding size, which is not orthogonal to
    ``B``: any :math:`s_i` below :math:`\sqrt{\varepsilon}` of the largest); all are factored,
    :math:`U = Q R_U`, so that :math:`W = Q R_U S Z^\top` up to the dropped :math:`s_i` (below
    ``floor``, or past ``width``, the dimension left outside the basis).
    """
    if W.shape[1] == 1 and width == 1:  # a single vector: normalize, no factorization
        norm = torch.linalg.vector_norm(W)
        if norm > floor:
            return W / norm, norm.reshape(1, 1)
    U, S, Zt = torch.linalg.svd(W, full_matrices=False)
    U, S, Zt = U[:, :width].clone(), S[:width], Zt[:width]
    empty = floor >= S
    if empty.any():
        fresh = torch.randn(len(U), int(empty.sum()), generator=generator, dtype=torch.float64)
        U[:, empty] = fresh.to(U.device)
    if S.numel() and (empty.any() or bool(S[-1] < np.finfo(np.float64).eps ** 0.5 * S[0])):
        U = _orthogonalize(B, U)
    Q, R_U = torch.linalg.qr(U)
    return Q, R_U @ (S[:, None] * Zt)


def _block_lanczos(
    block: BlockOperator,
    k: int,
    which: str,
    tol: float,
    basis: int,
    max_products: int,
    generator: torch.Generator,
    Q: torch.Tensor,
    W: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """The ``k`` wanted Ritz pairs, wanted end first, from the orthonormal start block ``Q``
    (``width`` columns; ``W = A Q`` if already known) and a basis of at most
    ``basis >= min(n, 2 (k + width))`` vectors (see the module notes), kept as the rows of ``B``
    so that every vector is contiguous."""
    n, device, width = block.n, block.device, Q.shape[1]
    keep = max(k, (basis - width) // 2)
    B = torch.empty(basis, n, dtype=torch.float64, device=device)
    T = np.zeros((0, 0))
    expected = np.zeros((0, width))  # V^T A Q on the older vectors, if A is symmetric
    m, norm = 0, 0.0
    for _ in range(max_products):
        W = block.matmat(Q) if W is None else W
        norm = max(norm, float(torch.linalg.vector_norm(W, dim=0).max()))
        j = Q.shape[1]
        B[m : m + j] = Q.T
        m += j
        H = B[:m] @ W
        W = _reorthogonalized(B[:m], W, W - B[:m].T @ H)
        column = H.cpu().numpy()
        _check_coupling(column[: m - j], expected, block.symmetry_tolerance, norm)
        T = np.block([[T, column[: m - j]], [column.T]])
        theta, Y = eigh((T + T.T) / 2)
        norm = max(norm, float(np.abs(theta).max()))
        floor = np.finfo(np.float64).eps * norm
        Q, R = _next_block(W, B[:m], min(width, n - m), floor, generator)
        R = R.cpu().numpy()
        order = _wanted_first(theta, which)
        residuals = np.linalg.norm(R @ Y[m - j :, order[:k]], axis=0)
        if residuals.max() <= tol * norm:
            return theta[order[:k]], B[:m].T @ torch.from_numpy(Y[:, order[:k]]).to(device)
        # if A is symmetric, V^T A Q = (Q^T A V)^T, and A V = V T + W
        expected = np.zeros((m, Q.shape[1]))
        expected[m - j :] = R.T
        if m + Q.shape[1] > basis:
            kept = order[:keep]
            B[:keep] = torch.from_numpy(Y[:, kept].T.copy()).to(device) @ B[:m]
            expected = (R @ Y[m - j :, kept]).T
            T, m = np.diag(theta[kept]), keep
        W = None
    raise RuntimeError(
        f"top_eigenvalues did not converge in {max_products} block products; pass a larger "
        "tol, maxiter or ncv"
    )


def _basis_size(n: int, k: int, width: int, ncv: int | None, memory_gb: float) -> int:
    """Basis columns: ``ncv`` if given; else for blocks as many as ``memory_gb`` of float64
    vectors allows, at most ``BASIS``, and for a single vector ARPACK's ``max(2k + 2, 20)``;
    never fewer than a restart needs (four blocks, or ``2k + 2`` and 20 vectors for a single
    vector), and never more than ``n``.

    The single-vector mode is chosen where a column costs as much alone as in a block, often a
    cheap column on a large model (an MLP, a transformer): there every step's orthogonalization,
    which reads the whole basis, cost as much as the product with a basis of 120 (36 at GPT
    size within 1 GiB), and a larger basis saved no products (103 against ARPACK's 100 for the
    top 5 on a 269k-parameter MLP).
    """
    floor = 4 * width if width > 1 else max(2 * k + 2, SINGLE_BASIS)
    if ncv is None:
        affordable = int(memory_gb * 2**30 / (8 * n))
        ncv = min(BASIS, affordable) if width > 1 else floor
    return min(n, max(ncv, floor))


def _choose_width(
    block: BlockOperator, which: str, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The start block to use (its full width, or its first column) and its image if it had to
    be computed to decide.

    Blocks pay when a column in a block of ``p`` costs at most ``BLOCK_PAYS`` of a column alone:
    block Lanczos spends about twice as many column products as a single vector on well
    separated eigenvalues, and reads a larger basis at every step. The costs come from the
    operator's own timings; if the widths were never multiplied, the first column and then the
    whole block are (one column's work is wasted if blocks pay, the block's if not: once per
    operator). Blocks are kept for
    ``"SA"``, whose end is where a Hessian's or GGN's degenerate cluster lies (one vector sees
    it only once), and for operators whose column costs less than ``CHEAP_COLUMN`` seconds:
    there the choice saves little time, and timings that noisy would make reruns take
    different paths.
    """
    p = start.shape[1]
    if which == "SA" or p == 1 or not block.measures_cost:
        return start, None
    costs = block.block_costs(p)
    single = image = None
    if costs is None:
        single, image = block.matmat(start[:, :1]), block.matmat(start)
        costs = block.block_costs(p)
    if costs is not None and costs[0] >= CHEAP_COLUMN and costs[1] > BLOCK_PAYS:
        return start[:, :1], single
    return start, image


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
    block_size: int | None = None,
    memory_gb: float = 1.0,
    progress: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` extreme eigenvalues of a symmetric operator, by thick-restart Lanczos in float64.

    Parameters
    ----------
    op
        A symmetric SciPy ``LinearOperator`` (a curvop operator, ``aslinearoperator(matrix)``, a
        composition). Its products run in its own precision; the Lanczos basis is float64.
    k
        Number of eigenvalues, ``1 <= k <= n`` (``k = n`` gives the whole spectrum).
    which
        ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
    tol
        Residual tolerance relative to the norm: the run stops when every wanted Ritz pair has
        :math:`\|Az - \theta z\| \le \mathrm{tol}\cdot\|A\|`, so eigenvalues come back accurate to
        about ``tol`` times :math:`\|A\|` (absolute). ``0`` (default) picks ``100 * eps`` of the
        operator's dtype (``2e-14`` for float64, ``1.2e-5`` for float32, whose products carry
        relative noise near ``1e-7``). Resolving a graded cluster at the wanted end (eigenvalues
        far closer together than :math:`\|A\|`, e.g. the tiny eigenvalues at the bottom of a
        Hessian or GGN) costs any Krylov method many products once ``n`` exceeds ``ncv``: loosen
        ``tol`` there.
    return_eigenvectors
        Also return the ``(n, k)`` eigenvectors (float64 numpy, orthonormal columns).
    seed
        Seed of the start block (a private generator; the result is deterministic per seed).
    maxiter
        Most block products (default ``10 n``).
    ncv
        Size of the Lanczos basis, ``k < ncv <= n``. Default: for blocks, as many float64
        vectors as ``memory_gb`` holds, at most 120, so that it is sized from ``k`` on large
        models; for a single vector, ARPACK's ``max(2k + 2, 20)`` (every step reads the whole
        basis, which costs as much as a cheap product when the basis is large). It is
        raised to what a restart needs: four blocks (``4 (k + 1)``) for the block method, so
        that a restart keeps the ``k`` wanted Ritz vectors with half a block to spare (without
        it, ``"LM"`` can settle on the wrong end), or ``max(2k + 2, 20)`` for a single vector.
        A larger basis restarts less often, which pays off on small relative gaps.
    block_size
        Columns per product: ``k + 1`` (the block method, which finds multiple eigenvalues with
        their multiplicity from one run) or ``1`` (single-vector thick-restart Lanczos, as
        ARPACK: fewer column products on separated eigenvalues, but a degenerate eigenvalue may
        come back with fewer copies). Default (``None``): blocks for ``"SA"`` and for operators
        whose cost is not measured (SciPy operators); otherwise measured: blocks where a column
        in a block of ``k + 1`` costs at most ``0.4`` of a column alone, or a column less than
        5 ms on the first batch (see :func:`_choose_width`).
    memory_gb
        Budget for the float64 basis when ``ncv`` is not given (default 1 GiB).
    progress
        Show a progress bar of the column products (tqdm; see :mod:`curvop.progress`).

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
        If the wanted pairs do not converge in ``maxiter`` block products.
    ValueError
        If the operator turns out not to be symmetric (see :func:`_check_coupling`).

    Notes
    -----
    Each step multiplies one block (one pass over the data for a curvop operator).
    Well-separated extreme eigenvalues take a few dozen products; with blocks, a degenerate
    cluster at the wanted end costs no more than a simple eigenvalue (see the module notes).

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> A = aslinearoperator(np.diag([3.0, 0.0, 0.0, 0.0, -1.0]))
    >>> top_eigenvalues(A, 2, which="SA", seed=0).round(12) + 0.0
    array([-1.,  0.])
    """
    block = as_block_operator(op)
    k = check_positive_int(k, "k")
    if k > block.n:
        raise ValueError(f"k must be at most n={block.n}, got {k}")
    which = check_choice(which, "which", WHICH)
    tol = check_real(tol, "tol")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    maxiter = check_optional_positive_int(maxiter, "maxiter")
    ncv = check_optional_positive_int(ncv, "ncv")
    if ncv is not None and not k < ncv <= block.n and k < block.n:
        raise ValueError(f"ncv must satisfy k < ncv <= n, i.e. {k} < ncv <= {block.n}, got {ncv}")
    block_size = check_optional_positive_int(block_size, "block_size")
    if block_size is not None and block_size not in (1, min(k + GUARD, block.n)):
        raise ValueError(f"block_size must be 1 or k + 1 = {k + GUARD} (or None), got {block_size}")
    memory_gb = check_real(memory_gb, "memory_gb", positive=True)
    with counting(block, progress, None, f"top-{k} eigenvalues") as block:
        return _top_eigenvalues(
            block, k, which, tol, return_eigenvectors, seed, maxiter, ncv, block_size, memory_gb
        )


def _top_eigenvalues(
    block: BlockOperator,
    k: int,
    which: str,
    tol: float,
    return_eigenvectors: bool,
    seed: int | None,
    maxiter: int | None,
    ncv: int | None,
    block_size: int | None,
    memory_gb: float,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    generator = block.generator(seed, device="cpu")
    start = torch.linalg.qr(
        torch.randn(block.n, min(k + GUARD, block.n), generator=generator, dtype=torch.float64)
    )[0].to(block.device)
    if block_size is None:
        start, image = _choose_width(block, which, start)
    else:
        start, image = start[:, :block_size], None
    basis = _basis_size(block.n, k, start.shape[1], ncv, memory_gb)
    values, vectors = _block_lanczos(
        block, k, which, tol or 100 * block.eps, basis, maxiter or 10 * block.n, generator,
        start, image,
    )  # fmt: skip
    return (values, vectors.cpu().numpy()) if return_eigenvectors else values
