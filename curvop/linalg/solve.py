r"""Damped linear systems :math:`(A + \lambda I)\,x = b` by CG or MINRES on the operator's device."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch

from ..operators.block import as_block_operator
from ..validation import as_float64_vector, check_choice, check_optional_positive_int, check_real
from .convergence import ConvergenceWarning
from .krylov import conjugate_gradient, minres
from .workspace import Workspace, open_workspace

__all__ = ["ConvergenceWarning", "SolveResult", "solve_damped"]

SOLVERS = {"cg": conjugate_gradient, "minres": minres}
DEFAULT_MAXITER = {"cg": 10, "minres": 5}  # times n, per solver call (SciPy's defaults)
SOLVES = 3  # solver calls at most: restarts tighten the tolerance until the true residual meets it


class SolveResult(NamedTuple):
    r"""The outcome of :func:`solve_damped`.

    Attributes
    ----------
    x
        The solution, numpy or torch like ``b``.
    converged : bool
        Whether :math:`\|b - (A + \lambda I)x\| \le \mathrm{rtol}\,\|b\|`.
    num_iterations : int
        Solver iterations, over all restarts (one product each).
    residual_norm : float
        :math:`\|b - (A + \lambda I)x\|_2`, recomputed with one extra product (unscaled).
    """

    x: np.ndarray | torch.Tensor
    converged: bool
    num_iterations: int
    residual_norm: float

    def __repr__(self) -> str:
        """One line: ``x`` by its kind, shape and dtype (not its values), then the other fields."""
        x = self.x
        if isinstance(x, torch.Tensor):
            dtype = str(x.dtype).removeprefix("torch.")
            device = "" if x.device.type == "cpu" else f" {x.device}"
            summary = f"<torch.Tensor {tuple(x.shape)} {dtype}{device}>"
        elif isinstance(x, np.ndarray):
            summary = f"<numpy.ndarray {x.shape} {x.dtype}>"
        else:
            summary = f"<{type(x).__name__}>"
        residual = self.residual_norm
        residual = f"{residual:.3g}" if isinstance(residual, Real) else repr(residual)
        return (
            f"SolveResult(x={summary}, converged={self.converged}, "
            f"num_iterations={self.num_iterations}, residual_norm={residual})"
        )


def _like(b: np.ndarray | torch.Tensor, x: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A copy of ``x`` as the kind of ``b``: its dtype when floating (else float64), its
    device."""
    if isinstance(b, torch.Tensor):
        dtype = b.dtype if b.is_floating_point() else torch.float64
        return x.to(device=b.device, dtype=dtype, copy=True)
    array = x.cpu().numpy()
    return array.astype(b.dtype if np.issubdtype(b.dtype, np.floating) else np.float64)


def _preconditioner(M: Any, work: Workspace) -> Callable[[torch.Tensor], torch.Tensor]:
    """``r -> M r`` on float64 vectors on the operator's device (identity for ``M=None``)."""
    if M is None:
        return lambda r: r
    try:
        M = as_block_operator(M)
    except TypeError:
        raise TypeError(f"M must be a LinearOperator or a matrix, got {type(M).__name__}") from None
    if M.shape != (work.n, work.n):
        raise ValueError(f"M must have shape ({work.n}, {work.n}), got {M.shape}")
    dtype, device = M.torch_dtype or torch.float64, M.device or work.device

    def apply(r: torch.Tensor) -> torch.Tensor:
        product = M.block_product(r.to(device, dtype)[:, None])[:, 0]
        return product.to(work.device, torch.float64)

    return apply


def solve_damped(
    op: Any,
    b: np.ndarray | torch.Tensor,
    damping: float,
    *,
    method: str = "cg",
    rtol: float = 1e-6,
    maxiter: int | None = None,
    x0: np.ndarray | torch.Tensor | None = None,
    M: Any = None,
    callback: Callable[[np.ndarray | torch.Tensor], None] | None = None,
    progress: bool = False,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I)\,x = b` by conjugate gradients or MINRES, in float64 on the
    operator's device (:mod:`curvop.linalg.krylov`: the iterate never leaves a GPU; SciPy's own
    ``cg`` and ``minres`` work on every curvop operator too, through numpy).

    Parameters
    ----------
    op
        A symmetric SciPy ``LinearOperator`` :math:`A` (products in its own precision).
    b
        Right-hand side, numpy or torch ``(n,)``; ``x`` comes back as the same kind (a torch ``x``
        on ``b``'s device, in ``b``'s floating dtype).
    damping
        :math:`\lambda`, finite; ``>= 0`` for ``"cg"``, any sign for ``"minres"``.
    method
        ``"cg"`` (needs :math:`A + \lambda I` positive definite) or ``"minres"`` (any symmetric
        :math:`A + \lambda I`).
    rtol
        Target :math:`\|b - (A + \lambda I)x\| \le \mathrm{rtol}\,\|b\|`. The solvers stop on
        their recursive residual, which drifts from the true one in finite precision; when the
        true residual misses the target the solver restarts from its result with a tighter
        tolerance (twice at most). Only a true residual that meets the target counts as
        converged.
    maxiter
        Iteration limit over all restarts (default per solver call: ``10 n`` for CG, ``5 n`` for
        MINRES, as SciPy).
    x0
        Initial guess, numpy or torch ``(n,)``.
    M
        Symmetric positive definite preconditioner approximating :math:`(A + \lambda I)^{-1}`:
        a ``LinearOperator`` (a curvop one runs in torch) or a matrix.
    callback
        Called after every iteration with the current iterate (the kind of ``b``), e.g. to
        record a residual history.
    progress
        Show a progress bar of the products (tqdm; see :mod:`curvop.progress`).

    Returns
    -------
    SolveResult
        ``(x, converged, num_iterations, residual_norm)``.

    Warns
    -----
    ConvergenceWarning
        When the target is missed, suggesting a larger damping, more iterations or ``minres``.

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> result = solve_damped(aslinearoperator(np.diag([1.0, 2.0])), np.ones(2), 1.0)
    >>> result.x.round(6), result.converged
    (array([0.5     , 0.333333]), True)
    """
    work = open_workspace(op, None)
    n = work.n
    method = check_choice(method, "method", tuple(SOLVERS))
    damping = check_real(damping, "damping")
    if method == "cg" and damping < 0:
        raise ValueError(
            f"damping must be >= 0 for method='cg', got {damping}; use method='minres' for a "
            "negative shift"
        )
    rtol = check_real(rtol, "rtol", positive=True)
    maxiter = check_optional_positive_int(maxiter, "maxiter")
    rhs = torch.from_numpy(as_float64_vector(b, "b", n)).to(work.device)
    x = torch.zeros_like(rhs) if x0 is None else torch.from_numpy(as_float64_vector(x0, "x0", n))
    x = x.to(work.device)
    precondition = _preconditioner(M, work)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")

    work.check_symmetric(work.generator(0, device="cpu"))  # CG and MINRES assume it
    iterations = 0

    def system(v: torch.Tensor) -> torch.Tensor:
        return work.multiply(v[:, None], dtype=torch.float64)[:, 0] + damping * v

    def count(xk: torch.Tensor) -> None:
        nonlocal iterations
        iterations += 1
        if callback is not None:
            callback(_like(b, xk))

    target, tolerance = rtol * float(torch.linalg.vector_norm(rhs)), rtol
    per_call = DEFAULT_MAXITER[method] * n
    breakdown = None
    with work.counting(progress, maxiter, f"solve_damped ({method})"):
        for _ in range(SOLVES):
            remaining = per_call if maxiter is None else maxiter - iterations
            x, _, breakdown = SOLVERS[method](
                system, rhs, x, tolerance * target / rtol, remaining, precondition, count
            )
            residual = float(torch.linalg.vector_norm(rhs - system(x)))
            if residual <= target or breakdown or iterations == maxiter:
                break
            tolerance *= 0.5 * target / residual
    converged = residual <= target
    if not converged:
        hint = " or use method='minres' if A + damping*I is indefinite" if method == "cg" else ""
        reason = f" ({breakdown})" if breakdown else ""
        warnings.warn(
            f"solve_damped: {method} did not converge in {iterations} iterations{reason} "
            f"(residual {residual:.3g} > rtol*||b|| = {target:.3g}); increase damping or "
            f"maxiter{hint}",
            ConvergenceWarning,
            stacklevel=2,
        )
    return SolveResult(_like(b, x), converged, iterations, residual)
