r"""Conjugate gradients and MINRES in torch, so that a solve stays on the operator's device.

SciPy's ``cg`` and ``minres`` take numpy vectors: on a GPU every iteration would copy the
iterate to the host and back. These are the same methods (Hestenes-Stiefel CG and Paige &
Saunders' MINRES, both preconditioned, as SciPy implements them) on float64 torch vectors on the
device; each iteration is one product and reads back a few scalars. Both stop on their recursive
residual norm (MINRES: the estimate :math:`\bar\phi_k = \|r_k\|` for an identity
preconditioner); :func:`~curvop.solve_damped` then checks the true residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["KrylovResult", "conjugate_gradient", "minres"]

Product = Callable[[torch.Tensor], torch.Tensor]


class KrylovResult(NamedTuple):
    """An iterate, the iterations spent and whether the method broke down.

    Attributes
    ----------
    x : torch.Tensor
    iterations : int
    breakdown : str or None
        Why the method could not continue (e.g. CG met a direction of non-positive curvature),
        or ``None``.
    """

    x: torch.Tensor
    iterations: int
    breakdown: str | None


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


def _residual(multiply: Product, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:math:`b - Ax` (no product for :math:`x = 0`)."""
    return b - multiply(x) if bool(x.any()) else b.clone()


def conjugate_gradient(
    multiply: Product,
    b: torch.Tensor,
    x: torch.Tensor,
    target: float,
    maxiter: int,
    precondition: Product,
    callback: Callable[[torch.Tensor], None],
) -> KrylovResult:
    r"""Preconditioned conjugate gradients for symmetric positive definite :math:`A`.

    Iterates until :math:`\|b - Ax\| \le` ``target`` (recursively updated) or ``maxiter``
    iterations. Like SciPy's ``cg`` it goes on through directions of negative curvature (an
    indefinite :math:`A` sometimes still converges); it stops with ``breakdown`` only where
    :math:`p^\top A p = 0`.
    """
    r = _residual(multiply, b, x)
    z = precondition(r)
    p, rz = z.clone(), _dot(r, z)
    for iteration in range(maxiter):
        if float(torch.linalg.vector_norm(r)) <= target:
            return KrylovResult(x, iteration, None)
        Ap = multiply(p)
        curvature = _dot(p, Ap)
        if curvature == 0:
            return KrylovResult(x, iteration, "a direction of zero curvature")
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        callback(x)
        z = precondition(r)
        rz, previous = _dot(r, z), rz
        p = z + (rz / previous) * p
    return KrylovResult(x, maxiter, None)


def minres(
    multiply: Product,
    b: torch.Tensor,
    x: torch.Tensor,
    target: float,
    maxiter: int,
    precondition: Product,
    callback: Callable[[torch.Tensor], None],
) -> KrylovResult:
    r"""Preconditioned MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite
    :math:`A` with a symmetric positive definite preconditioner.

    The Lanczos process on :math:`M^{-1}A` with a QR factorization of its tridiagonal matrix by
    Givens rotations; :math:`\bar\phi_k` is the residual norm (in the :math:`M^{-1}` norm), and
    the iteration stops when it falls to ``target`` or after ``maxiter`` iterations.
    """
    r1 = _residual(multiply, b, x)
    y = precondition(r1)
    beta1 = _dot(r1, y)
    if beta1 < 0:
        return KrylovResult(x, 0, "the preconditioner M is not positive definite")
    beta1 = math.sqrt(beta1)
    if beta1 == 0:
        return KrylovResult(x, 0, None)
    old_beta, beta, dbar, epsilon, phibar = 0.0, beta1, 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    r2 = r1
    for iteration in range(maxiter):
        if phibar <= target:
            return KrylovResult(x, iteration, None)
        v = y / beta
        y = multiply(v)
        if iteration > 0:
            y = y - (beta / old_beta) * r1
        alpha = _dot(v, y)
        y = y - (alpha / beta) * r2
        r1, r2 = r2, y
        y = precondition(r2)
        old_beta, beta = beta, _dot(r2, y)
        if beta < 0:
            return KrylovResult(x, iteration, "the preconditioner M is not positive definite")
        beta = math.sqrt(beta)
        # apply the previous rotation, then make the one that annihilates beta
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        gamma = max(math.hypot(gbar, beta), torch.finfo(torch.float64).eps)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - old_epsilon * w1 - delta * w2) / gamma
        x = x + phi * w
        callback(x)
        if beta == 0:  # an invariant subspace: x is exact
            return KrylovResult(x, iteration + 1, None)
    return KrylovResult(x, maxiter, None)
