r"""How far an operator is from symmetric, and how far it may be.

Curvature matrices are symmetric, and every Krylov method curvop and SciPy run on them (Lanczos,
CG, MINRES, ARPACK) relies on it: on a non-symmetric operator they return garbage or never
converge. An approximate operator (finite differences) is symmetric only up to its accuracy, and
every operator only up to rounding, so the check compares against an allowance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["symmetry_gap", "symmetry_tolerance"]


def symmetry_tolerance(dtype: torch.dtype, accuracy: float = 0.0) -> float:
    r"""The relative asymmetry an operator may show: :math:`\max(\sqrt{\varepsilon}, 10 a)`.

    :math:`\varepsilon` is the machine epsilon of the products' ``dtype`` (``3.5e-4`` in float32,
    ``1.5e-8`` in float64, far above rounding) and :math:`a` the stated relative ``accuracy`` of
    an approximate operator (0 for exact ones).
    """
    return max(torch.finfo(dtype).eps ** 0.5, 10 * accuracy)


def symmetry_gap(
    product: Callable[[torch.Tensor], torch.Tensor], n: int, generator: torch.Generator, **like
) -> float:
    r"""The relative asymmetry :math:`|w^\top A v - v^\top A w| / \max(\|Av\|\|w\|, \|Aw\|\|v\|)`
    for two random Gaussian vectors, from one block product of two columns.

    ``like`` (``dtype``, ``device``) says what ``product`` takes; the inner products are taken in
    float64. Zero for the zero operator.
    """
    V = torch.randn(n, 2, generator=generator, dtype=torch.float64).to(**like)
    AV = product(V).to(torch.float64)
    V = V.to(torch.float64)
    v, w, Av, Aw = V[:, 0], V[:, 1], AV[:, 0], AV[:, 1]
    scale = max(float(Av.norm() * w.norm()), float(Aw.norm() * v.norm()))
    return float(abs(w @ Av - v @ Aw)) / scale if scale > 0 else 0.0
