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
the operator's dtype on its device (its products carry no more precision); every new block is
orthogonalized against all of it (twice where the first sweep removed most of its norm).
With :math:`A Q_j = V H_j + Q_{j+1} R` for the last block :math:`Q_j`, the Ritz pairs
:math:`(\theta, Vy)` of :math:`T = V^\top A V` have residuals

.. math::
    \|A V y - \theta\, V y\| = \|R\, y_{\mathrm{last}}\|

(:math:`y_{\mathrm{last}}`: the rows of :math:`y` on :math:`Q_j`); the run stops once the ``k``
wanted ones are below :math:`\mathrm{tol}\cdot\|A\|`, each then within that distance of an
eigenvalue (:math:`\|A\|` is estimated by the largest Ritz value and product column seen), and
not before the basis holds ``k`` vectors. When the basis is full it is thick-restarted:
:math:`V \leftarrow V Y` for the Ritz vectors of the wanted end that fill half of it. A basis that
stops making progress (restarts that do not shrink the residuals) grows, up to ``n`` vectors
(then the method is exact after about ``n`` column products) or what the memory budget holds;
where it cannot grow, the run stops with a :class:`~curvop.ConvergenceWarning` that says how
accurate the values are. A block without new directions (an invariant subspace, e.g. the range
of a low-rank operator plus :math:`X`) is refilled with random vectors; such a subspace already
holds every eigenspace whole or with :math:`p > k` of its directions, so its ``k`` wanted Ritz
values are the wanted eigenvalues, none of them standing in for a copy it misses.

The same code with a block of one column is the single-vector thick-restart Lanczos method of
ARPACK: fewer column products on separated eigenvalues and a smaller basis, so it is chosen
where the operator measures that a column in a block costs more than ``BLOCK_PAYS`` of one alone
(a transformer, where the second backward pass is paid per column). A single vector's invariant
subspace holds one direction per distinct eigenvalue, so when it finds one it continues with a
block of ``k + 1`` random columns orthogonal to it: every ``k``-fold eigenvalue then comes back
with its multiplicity on either path. ``"SA"`` always uses blocks.

Every step checks that the new block couples to the older basis vectors as a symmetric operator
must (:func:`_check_coupling`): a non-symmetric operator (finite differences across kinks) stops
with a ``ValueError`` instead of a run that never converges. No factorization but QR ever sees a
matrix of ``n`` rows (cuSOLVER's SVD of tall matrices fails from about 11M rows).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh

from ..validation import check_choice, check_optional_positive_int, check_positive_int, check_real
from .convergence import ConvergenceWarning
from .lanczos import TWICE_IS_ENOUGH
from .sketch import tall_svd
from .workspace import Workspace, open_workspace, raise_not_symmetric

__all__ = ["ThickRestartLanczos", "top_eigenvalues"]

WHICH = ("LA", "LM", "SA")
GUARD = 1  # block columns beyond k
BASIS = 120  # default block basis size (ncv) at most, when the memory budget allows
SINGLE_BASIS = 20  # the least basis of single-vector Lanczos (ARPACK's default ncv)
MAX_BASIS = 1024  # a stalled basis grows to at most this many vectors (or n)
BLOCK_PAYS = 0.4  # blocks are used when a column in a block costs at most this of one alone
CHEAP_COLUMN = 0.005  # seconds on the first batch: below it, always blocks (see _choose_width)
DEFAULT_TOL_EPS = 100  # the default tol, in epsilons of the products' dtype
STALL_RESTARTS = 3  # restarts that must halve the largest wanted residual, or the basis grows
HOPELESS_RESTARTS = 10  # restarts of a basis that cannot grow that must shrink it by 10%
RITZ_ROWS = 200  # a larger basis computes its Ritz values every (rows / RITZ_ROWS) steps
WORKING_BLOCKS = 3  # (n, width) arrays besides the basis: the block, its image, the residual


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
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    r"""The next orthonormal block ``Q`` (``width`` columns), ``R`` with ``W ~ Q R``, and whether
    random columns had to fill it.

    ``W`` is orthogonal to the basis rows ``B``. Its SVD :math:`W = U S Z^\top` comes from
    :func:`~curvop.linalg.sketch.tall_svd` (QR of the tall :math:`W`, then the SVD of the small
    factor). Directions with
    :math:`s_i \le` ``floor`` (none new), and the columns beyond ``W``'s when ``width`` is
    larger, become random vectors orthogonalized against ``B`` (as is a normalized direction of
    rounding size, which is not orthogonal to ``B``: any :math:`s_i` below
    :math:`\sqrt{\varepsilon}` of the largest); all are factored, :math:`U = Q R_U`, so that
    :math:`W = Q R_U S Z^\top` up to the dropped :math:`s_i` (below ``floor``, or past
    ``width``, the dimension left outside the basis).
    """
    n, columns = W.shape
    if width == 0:  # the basis spans the whole space
        return W.new_zeros(n, 0), W.new_zeros(0, columns), False
    if columns == 1 and width == 1:  # a single vector: normalize, no factorization
        norm = torch.linalg.vector_norm(W)
        if norm > floor:
            return W / norm, norm.reshape(1, 1), False
    U, S, Zt = tall_svd(W)
    kept = min(columns, width)
    U, S, Zt = U[:, :kept], S[:kept].to(W.dtype), Zt[:kept].to(W.dtype)
    if width > kept:  # more columns than W has: pad with empty directions
        U = torch.cat([U, U.new_zeros(n, width - kept)], dim=1)
        S = torch.cat([S, S.new_zeros(width - kept)])
        Zt = torch.cat([Zt, Zt.new_zeros(width - kept, columns)])
    empty = floor >= S
    if empty.any():
        fresh = torch.randn(n, int(empty.sum()), generator=generator, dtype=torch.float64)
        U[:, empty] = fresh.to(U)
    eps = torch.finfo(W.dtype).eps
    if empty.any() or bool(S[-1] < eps**0.5 * S[0]):
        U = _orthogonalize(B, U)
    Q, R_U = torch.linalg.qr(U)
    return Q, R_U @ (S[:, None] * Zt), bool(empty.any())


class ThickRestartLanczos:
    r"""One thick-restart (block) Lanczos run: the basis, the projected matrix, and the checks.

    The basis vectors are the rows ``B[:m]`` (each contiguous), in the operator's dtype.
    :meth:`extend` appends a block with its image, :meth:`next_block` factors what is left of
    that image into the next block, :meth:`ritz` gives the Ritz values and residuals,
    :meth:`restart` keeps the wanted Ritz vectors, :meth:`grow` enlarges the basis.

    Parameters
    ----------
    work
        The operator and its budget.
    k, which
        How many eigenvalues, and which end.
    capacity
        Basis vectors to allocate.
    generator
        Draws the random columns of refilled blocks.
    """

    def __init__(
        self, work: Workspace, k: int, which: str, capacity: int, generator: torch.Generator
    ):
        self.work, self.k, self.which, self.generator = work, k, which, generator
        self.B = torch.empty(capacity, work.n, dtype=work.dtype, device=work.device)
        self.T = np.zeros((0, 0))
        self.expected: np.ndarray | None = None  # V^T A Q of the next block, if A is symmetric
        self.m = self.last = 0  # basis vectors; columns of the last block
        self.norm = 0.0  # largest |Ritz value| and product column norm so far: ~ ||A||
        self.residual: torch.Tensor | None = None  # A Q - V H for the last block Q
        self.R = np.zeros((0, 0))  # the residual's factor: A Q - V H = Q_next R

    @property
    def capacity(self) -> int:
        return self.B.shape[0]

    def kept_bytes(self, width: int) -> int:
        """Bytes the run holds while a block of ``width`` columns is multiplied."""
        return (self.capacity + WORKING_BLOCKS * width) * self.work.vector_bytes()

    def extend(self, Q: torch.Tensor, W: torch.Tensor) -> None:
        """Append the orthonormal block ``Q`` (``(n, j)``) with ``W = A Q``: ``T`` gains its row
        and column, and what is left of ``W`` orthogonal to the basis becomes the residual."""
        self.norm = max(self.norm, float(torch.linalg.vector_norm(W, dim=0).max()))
        m, j = self.m, Q.shape[1]
        self.B[m : m + j] = Q.T
        self.m, self.last = m + j, j
        B = self.B[: self.m]
        H = B @ W
        self.residual = _reorthogonalized(B, W, W - B.T @ H)
        column = H.double().cpu().numpy()
        if self.expected is not None:
            _check_coupling(column[:m], self.expected, self.work.symmetry_tolerance, self.norm)
        self.T = np.block([[self.T, column[:m]], [column.T]])

    def next_block(self, width: int) -> tuple[torch.Tensor, bool]:
        """The next orthonormal block of at most ``width`` columns (fewer where the basis would
        exceed ``n``), and whether random columns filled it (an invariant subspace was found)."""
        floor = 10 * self.work.eps * self.norm
        width = min(width, self.work.n - self.m)
        Q, R, refilled = _next_block(self.residual, self.B[: self.m], width, floor, self.generator)
        self.R = R.double().cpu().numpy()
        self.expected = np.zeros((self.m, Q.shape[1]))
        self.expected[self.m - self.last :] = self.R.T
        return Q, refilled

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ascending Ritz values, their vectors in the basis' coordinates, the indices of the
        wanted end first, and the residual norms of the ``k`` wanted ones."""
        theta, Y = eigh((self.T + self.T.T) / 2)
        self.norm = max(self.norm, float(np.abs(theta).max()))
        order = _wanted_first(theta, self.which)
        residuals = np.linalg.norm(self.R @ Y[self.m - self.last :, order[: self.k]], axis=0)
        return theta, Y, order, residuals

    def restart(self, theta: np.ndarray, Y: np.ndarray, order: np.ndarray, keep: int) -> None:
        """Keep the ``keep`` Ritz vectors of the wanted end as the new basis."""
        kept = order[:keep]
        rotation = torch.from_numpy(Y[:, kept].T.copy()).to(self.B)
        self.B[:keep] = rotation @ self.B[: self.m]
        self.expected = (self.R @ Y[self.m - self.last :, kept]).T
        self.T, self.m = np.diag(theta[kept]), keep

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` basis vectors (a copy of the basis)."""
        grown = self.B.new_empty(capacity, self.work.n)
        grown[: self.m] = self.B[: self.m]
        self.B = grown

    def vectors(self, Y: np.ndarray, order: np.ndarray) -> torch.Tensor:
        """The ``k`` wanted Ritz vectors, ``(n, k)``."""
        return self.B[: self.m].T @ torch.from_numpy(Y[:, order[: self.k]]).to(self.B)


def _largest_basis(work: Workspace, ncv: int | None, width: int) -> int:
    """What a basis may grow to: ``ncv`` if given; else the least of ``n``,
    :data:`MAX_BASIS` and what the budget holds besides a single-column product."""
    if ncv is not None:
        return ncv
    single = work.op.product_cost(1, work.product_limit(0))
    room = work.budget - (0 if single is None else single.bytes)
    return min(work.n, MAX_BASIS, room // work.vector_bytes() - WORKING_BLOCKS * width)


def _basis_size(work: Workspace, k: int, width: int, ncv: int | None) -> tuple[int, int]:
    """The basis to start with and the most it may grow to. Blocks: ``ncv`` if given, else as
    many vectors as the budget holds, at most :data:`BASIS`; a single vector: ARPACK's
    ``max(2k + 2, 20)``, since every step reads the whole basis, which on a large model costs as
    much as a cheap product. Never fewer than a restart needs (four blocks, or ``2k + 2`` and 20
    vectors for a single vector), never more than ``n``."""
    floor = min(work.n, 4 * width if width > 1 else max(2 * k + 2, SINGLE_BASIS))
    largest = max(floor, _largest_basis(work, ncv, width))
    if ncv is None:
        ncv = min(BASIS, largest) if width > 1 else floor
    return min(work.n, max(ncv, floor)), largest


def _choose_width(work: Workspace, which: str, p: int) -> int:
    """``p`` (blocks) or 1 (a single vector), from the operator's measured costs: blocks where
    a column in a block of ``p`` costs at most ``BLOCK_PAYS`` of a column alone (block Lanczos
    spends about twice as many column products as a single vector on separated eigenvalues, and
    reads a larger basis every step). Blocks are kept for ``"SA"``, whose end is where a
    Hessian's or GGN's degenerate cluster lies, for operators that do not measure their costs,
    and for operators whose column costs less than ``CHEAP_COLUMN`` seconds on the first batch
    (there the choice saves little time). The costs are measured once per operator, so every
    call on it takes the same path."""
    if which == "SA" or p == 1:
        return p
    limit = work.product_limit(0)
    single, block = work.op.product_cost(1, limit), work.op.product_cost(p, limit)
    if single is None or block is None or single.seconds < CHEAP_COLUMN:
        return p
    return p if block.seconds / p <= BLOCK_PAYS * single.seconds else 1


def _default_tol(work: Workspace) -> float:
    """``DEFAULT_TOL_EPS`` epsilons of the products' dtype, or the operator's stated accuracy
    where that is larger: residuals cannot go below what the products carry."""
    return max(DEFAULT_TOL_EPS * work.eps, work.op.accuracy)


def _run(
    work: Workspace,
    k: int,
    which: str,
    tol: float,
    ncv: int | None,
    width: int,
    max_products: int,
    generator: torch.Generator,
    start: torch.Tensor,
) -> tuple[np.ndarray, torch.Tensor]:
    """The ``k`` wanted Ritz pairs, wanted end first, from the orthonormal block ``start``."""
    capacity, largest = _basis_size(work, k, width, ncv)
    run = ThickRestartLanczos(work, k, which, capacity, generator)
    Q, history = start[:, :width], []
    for step in range(max_products):
        run.extend(Q, work.multiply(Q, run.kept_bytes(Q.shape[1])))
        Q, refilled = run.next_block(width)
        verdict = True
        if refilled and width == 1 and k > 1:  # one direction per eigenvalue: go on with blocks
            width = min(k + GUARD, work.n)
            capacity, largest = _basis_size(work, k, width, ncv)
            if capacity > run.capacity:
                run.grow(capacity)
            Q, _ = run.next_block(width)
            verdict = False  # this invariant subspace may miss copies of the wanted ones
        full = run.m + Q.shape[1] > run.capacity
        due = full or Q.shape[1] == 0 or step % max(1, run.m // RITZ_ROWS) == 0
        if run.m < k or not due:
            continue
        theta, Y, order, residuals = run.ritz()
        if verdict and residuals.max() <= tol * run.norm:
            return theta[order[:k]], run.vectors(Y, order)
        if full:
            history.append(residuals.max() / max(run.norm, np.finfo(float).tiny))
            if run.capacity < largest and _stalled(history, STALL_RESTARTS, 0.5):
                run.grow(min(largest, 2 * run.capacity))
                history.clear()
                continue
            if _stalled(history, HOPELESS_RESTARTS, 0.9):
                break
            run.restart(theta, Y, order, max(k, (run.capacity - Q.shape[1]) // 2))
    if run.m < k:
        raise RuntimeError(
            f"top_eigenvalues: maxiter={max_products} block products left the basis with "
            f"{run.m} < k={k} vectors; pass a larger maxiter"
        )
    theta, Y, order, residuals = run.ritz()
    _warn_not_converged(residuals, tol, run.norm, k)
    return theta[order[:k]], run.vectors(Y, order)


def _stalled(history: list[float], restarts: int, factor: float) -> bool:
    """Whether the last ``restarts`` restarts failed to shrink the largest wanted residual
    below ``factor`` times what it was before them."""
    return len(history) > restarts and min(history[-restarts:]) > factor * history[-1 - restarts]


def _warn_not_converged(residuals: np.ndarray, tol: float, norm: float, k: int) -> None:
    converged = int((residuals <= tol * norm).sum())
    worst = float(residuals.max()) / norm if norm > 0 else 0.0
    warnings.warn(
        f"top_eigenvalues: {converged} of {k} wanted eigenvalues converged to tol={tol:.3g}; "
        f"returning the best estimates, each within {worst:.3g} * ||A|| of an eigenvalue "
        "(their largest residual). Pass a larger tol, ncv or maxiter, or memory_gb to let the "
        "basis grow.",
        ConvergenceWarning,
        stacklevel=4,  # the caller of top_eigenvalues
    )


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
    memory_gb: float | None = None,
    progress: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` extreme eigenvalues of a symmetric operator, by thick-restart Lanczos.

    Parameters
    ----------
    op
        A symmetric SciPy ``LinearOperator`` (a curvop operator, a sum or scaling of them,
        ``aslinearoperator(matrix)``, a composition). Its products run in its own precision, and
        so does the Lanczos basis; the projected matrix is float64.
    k
        Number of eigenvalues, ``1 <= k <= n`` (``k = n`` gives the whole spectrum). Always
        ``k`` values come back, multiple and zero eigenvalues included.
    which
        ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
    tol
        Residual tolerance relative to the norm: the run stops when every wanted Ritz pair has
        :math:`\|Az - \theta z\| \le \mathrm{tol}\cdot\|A\|`, so eigenvalues come back accurate to
        about ``tol`` times :math:`\|A\|` (absolute). ``0`` (default) picks ``100 * eps`` of the
        operator's dtype (``2e-14`` for float64, ``1.2e-5`` for float32), or the operator's
        stated ``accuracy`` where that is larger (``1e-5`` for the float64 finite-difference
        Hessian: its products carry no more). A ``tol`` below the stated accuracy raises
        ``ValueError``. Resolving a graded cluster at the wanted end (eigenvalues far closer
        together than :math:`\|A\|`, e.g. the tiny eigenvalues at the bottom of a Hessian or GGN)
        costs any Krylov method many products once ``n`` exceeds the basis: loosen ``tol`` there.
    return_eigenvectors
        Also return the ``(n, k)`` eigenvectors (float64 numpy, orthonormal columns).
    seed
        Seed of the start block (a private generator; the result is deterministic per seed).
    maxiter
        Most block products (default ``10 n``).
    ncv
        Size of the Lanczos basis, ``k < ncv <= n``. Default: for blocks, as many vectors as the
        budget holds, at most 120; for a single vector, ARPACK's ``max(2k + 2, 20)``. It is
        raised to what a restart needs: four blocks (``4 (k + 1)``) for the block method, so
        that a restart keeps the ``k`` wanted Ritz vectors with half a block to spare, or
        ``max(2k + 2, 20)`` for a single vector. Without ``ncv``, a basis whose restarts stop
        making progress grows (to ``n``, 1024 vectors, or what ``memory_gb`` holds).
    block_size
        Columns per product: ``k + 1`` (the block method) or ``1`` (single-vector thick-restart
        Lanczos, as ARPACK: fewer column products on separated eigenvalues; it continues with
        blocks where it finds an invariant subspace, so multiplicities come back on both paths).
        Default (``None``): blocks for ``"SA"`` and for operators that do not measure their
        costs (SciPy operators); otherwise blocks where the operator's measured costs say a
        column in a block of ``k + 1`` costs at most ``0.4`` of a column alone, or a column
        less than 5 ms on the first batch (see :func:`_choose_width`). The costs are measured
        once per operator, so the same operator always takes the same path.
    memory_gb
        Budget in GiB for the basis and the products' autograd graphs. Default (``None``): a
        quarter of the device's free memory, of which a product takes at most four single
        products' worth.
    progress
        Show a progress bar of the column products (tqdm; see :mod:`curvop.progress`).

    Returns
    -------
    eigenvalues : numpy.ndarray
        ``(k,)`` float64: descending for ``"LA"``, descending in magnitude for ``"LM"``,
        ascending for ``"SA"``.
    eigenvectors : numpy.ndarray
        ``(n, k)``, only with ``return_eigenvectors=True``; column ``j`` belongs to value ``j``.

    Warns
    -----
    ConvergenceWarning
        When the run ends (``maxiter`` products, or a basis that can no longer grow makes no
        progress) before every wanted pair meets ``tol``: the best ``k`` estimates come back,
        and the warning says how accurate they are.

    Raises
    ------
    ValueError
        If the operator turns out not to be symmetric (see :func:`_check_coupling`), or ``tol``
        is below its stated accuracy.

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
    work = open_workspace(op, memory_gb)
    n = work.n
    k = check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k must be at most n={n}, got {k}")
    which = check_choice(which, "which", WHICH)
    tol = check_real(tol, "tol")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if 0 < tol < work.op.accuracy:
        raise ValueError(
            f"tol={tol:g} is below the operator's stated accuracy {work.op.accuracy:g}: its "
            "products carry no more, so residuals cannot get there; pass tol >= "
            f"{work.op.accuracy:g}, or 0 for the default"
        )
    maxiter = check_optional_positive_int(maxiter, "maxiter")
    ncv = check_optional_positive_int(ncv, "ncv")
    if ncv is not None and not k < ncv <= n and k < n:
        raise ValueError(f"ncv must satisfy k < ncv <= n, i.e. {k} < ncv <= {n}, got {ncv}")
    p = min(k + GUARD, n)
    block_size = check_optional_positive_int(block_size, "block_size")
    if block_size is not None and block_size not in (1, p):
        raise ValueError(f"block_size must be 1 or k + 1 = {k + GUARD} (or None), got {block_size}")
    generator = work.generator(seed, device="cpu")
    start = torch.linalg.qr(torch.randn(n, p, generator=generator, dtype=torch.float64))[0]
    start = start.to(work.device, work.dtype)
    with work.counting(progress, None, f"top-{k} eigenvalues"):
        width = block_size or _choose_width(work, which, p)
        values, vectors = _run(
            work, k, which, tol or _default_tol(work), ncv, width, maxiter or 10 * n,
            generator, start,
        )  # fmt: skip
    return (values, vectors.double().cpu().numpy()) if return_eigenvectors else values
