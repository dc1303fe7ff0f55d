r"""Damped linear systems :math:`(A + \lambda I)\,x = b` with SciPy's Krylov solvers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.sparse.linalg import aslinearoperator, cg, minres

from ..operators.identity import IdentityOperator
from ..progress import counting
from ..validation import check_real
from .adapter import as_block_operator, as_scipy_float64
from .checks import as_float64_vector, check_choice, check_optional_positive_int

__all__ = ["ConvergenceWarning", "SolveResult", "solve_damped"]

SOLVERS = {"cg": cg, "minres": minres}
SOLVES = 3  # solver calls at most: restarts tighten the tolerance until the true residual meets it


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching the requested tolerance."""


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


def _like(b: np.ndarray | torch.Tensor, x: np.ndarray) -> np.ndarray | torch.Tensor:
    """``x`` as the kind of ``b``: its dtype when floating (else float64), its device."""
    if isinstance(b, torch.Tensor):
        dtype = b.dtype if b.is_floating_point() else torch.float64
        return torch.tensor(x, dtype=dtype, device=b.device)
    return x.astype(b.dtype if np.issubdtype(b.dtype, np.floating) else np.float64)


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
    r"""Solve :math:`(A + \lambda I)\,x = b` with SciPy's ``cg`` or ``minres`` in float64.

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
        Target :math:`\|b - (A + \lambda I)x\| \le \mathrm{rtol}\,\|b\|`. SciPy's ``minres``
        measures its own test relative to :math:`\|A\|\|x\|`; when the true residual misses the
        target the solver restarts from its result with a tighter tolerance (twice at most).
        Only a true residual that meets the target counts as converged.
    maxiter
        Iteration limit over all restarts (default SciPy's, per call).
    x0
        Initial guess, numpy or torch ``(n,)``.
    M
        Preconditioner approximating :math:`(A + \lambda I)^{-1}`, passed to SciPy.
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
    block = as_block_operator(op)
    method = check_choice(method, "method", tuple(SOLVERS))
    damping = check_real(damping, "damping")
    if method == "cg" and damping < 0:
        raise ValueError(
            f"damping must be >= 0 for method='cg', got {damping}; use method='minres' for a "
            "negative shift"
        )
    rtol = check_real(rtol, "rtol", positive=True)
    maxiter = check_optional_positive_int(maxiter, "maxiter")
    rhs = as_float64_vector(b, "b", block.n)
    x = None if x0 is None else as_float64_vector(x0, "x0", block.n)
    if M is not None:
        try:
            shape = aslinearoperator(M).shape
        except TypeError:
            raise TypeError(
                f"M must be a LinearOperator or a matrix, got {type(M).__name__}"
            ) from None
        if shape != (block.n, block.n):
            raise ValueError(f"M must have shape ({block.n}, {block.n}), got {shape}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")

    block.check_symmetric(block.generator(0, device="cpu"))  # CG and MINRES assume it
    iterations = 0

    def count(xk: np.ndarray) -> None:
        nonlocal iterations
        iterations += 1
        if callback is not None:
            callback(_like(b, xk))

    target, tolerance = rtol * float(np.linalg.norm(rhs)), rtol
    with counting(block, progress, maxiter, f"solve_damped ({method})") as block:
        system = as_scipy_float64(block) + damping * IdentityOperator(block.n)
        for _ in range(SOLVES):
            remaining = None if maxiter is None else maxiter - iterations
            x, info = SOLVERS[method](
                system, rhs, x0=x, rtol=tolerance, maxiter=remaining, M=M, callback=count
            )
            residual = float(np.linalg.norm(rhs - system.matvec(x)))
            if residual <= target or info != 0 or iterations == maxiter:
                break
            tolerance *= 0.5 * target / residual
    converged = residual <= target
    if not converged:
        hint = " or use method='minres' if A + damping*I is indefinite" if method == "cg" else ""
        warnings.warn(
            f"solve_damped: {method} did not converge in {iterations} iterations (residual "
            f"{residual:.3g} > rtol*||b|| = {target:.3g}); increase damping or maxiter{hint}",
            ConvergenceWarning,
            stacklevel=2,
        )
    return SolveResult(_like(b, x), converged, iterations, residual)
