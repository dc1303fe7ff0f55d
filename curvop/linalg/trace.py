r"""Randomized trace estimators: Hutchinson, Hutch++ and XTrace.

All three estimate :math:`\operatorname{tr}(A)` from products with random probes :math:`\omega`
with :math:`E[\omega\omega^\top] = I`, for which :math:`E[\omega^\top A \omega] =
\operatorname{tr}(A)`. Hutch++ and XTrace first capture the dominant part of :math:`A` exactly
with a low-rank sketch, so that the Monte-Carlo part only sees the remainder: on a matrix with a
decaying spectrum their error falls like :math:`1/m` instead of :math:`1/\sqrt{m}` in the number
of products :math:`m`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..validation import check_num_matvecs, check_positive_int
from .adapter import as_block_operator
from .probes import make_generator
from .sketch import exchangeable_sketch

__all__ = ["Estimate", "hutchinson_trace", "hutchpp_trace", "xtrace"]


class Estimate(NamedTuple):
    """A randomized estimate with its standard error; ``float(estimate)`` is its value.

    A named tuple, so ``value, std_error, num_matvecs = estimate`` works too.

    Attributes
    ----------
    value : float
    std_error : float
        Sample standard error of the Monte-Carlo part (NaN with a single sample).
    num_matvecs : int
        Products with the operator that were spent.
    """

    value: float
    std_error: float
    num_matvecs: int

    def __float__(self) -> float:
        return self.value


def _mean_estimate(samples: torch.Tensor, num_matvecs: int, offset: float = 0.0) -> Estimate:
    """``offset`` plus the mean of ``samples``, with the standard error of that mean."""
    count = samples.numel()
    std_error = float(samples.std() / math.sqrt(count)) if count > 1 else math.nan
    return Estimate(offset + float(samples.mean()), std_error, num_matvecs)


def hutchinson_trace(
    op: Any, num_matvecs: int, *, distribution: str = "rademacher", seed: int | None = None
) -> Estimate:
    r"""Hutchinson's estimate :math:`\frac{1}{m}\sum_{i=1}^m \omega_i^\top A \omega_i`.

    Parameters
    ----------
    op
        A square SciPy ``LinearOperator`` (a curvop operator runs in torch on its device).
    num_matvecs
        Number of probes :math:`m` (products), all multiplied as one block.
    distribution
        ``"rademacher"``, ``"gaussian"`` or ``"sparse_rademacher"`` (see ``draw_probes``).
    seed
        Seed of the private generator.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> float(hutchinson_trace(aslinearoperator(np.eye(4)), 8, seed=0))
    4.0
    """
    block = as_block_operator(op)
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
    probes = block.probes(num_matvecs, make_generator(seed, block.device), distribution)
    return _mean_estimate((probes * block.matmat(probes)).sum(0), num_matvecs)


def hutchpp_trace(op: Any, num_matvecs: int, *, seed: int | None = None) -> Estimate:
    r"""Hutch++ (Meyer, Musco, Musco & Woodruff, 2021).

    With :math:`r = \lfloor m/3 \rfloor` sketch probes :math:`S` and :math:`Q` an orthonormal basis
    of :math:`AS`, and :math:`g = m - 2r` Rademacher probes :math:`G`,

    .. math::
        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
        + \frac{1}{g} \operatorname{tr}\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big).

    ``std_error`` is that of the second (Monte-Carlo) term. Two block products: :math:`AS`, then
    :math:`A[Q, (I - QQ^\top)G]`. Needs ``num_matvecs >= 3``.
    """
    block = as_block_operator(op)
    num_matvecs = check_num_matvecs(num_matvecs, 3, "hutchpp_trace")
    generator = make_generator(seed, block.device)
    rank = num_matvecs // 3
    basis = torch.linalg.qr(block.matmat(block.probes(rank, generator))).Q
    probes = block.probes(num_matvecs - 2 * rank, generator)
    probes = probes - basis @ (basis.T @ probes)
    images = block.matmat(torch.cat([basis, probes], dim=1))
    low_rank = float((basis * images[:, :rank]).sum())
    return _mean_estimate((probes * images[:, rank:]).sum(0), num_matvecs, low_rank)


def xtrace(op: Any, num_matvecs: int, *, seed: int | None = None) -> Estimate:
    r"""XTrace (Epperly, Tropp & Webber, 2024): Hutch++ made exchangeable.

    :math:`s = \lfloor m/2 \rfloor` Gaussian probes serve both as sketch and as Monte-Carlo
    probes: the ``i``-th leave-one-out estimate

    .. math::
        t_i = \operatorname{tr}(P_{-i} A P_{-i})
        + \omega_i^\top (I - P_{-i}) A (I - P_{-i}) \omega_i

    uses the projector :math:`P_{-i}` onto the sketch without probe ``i`` (see
    :mod:`curvop.linalg.sketch`), and the estimate is their mean; ``std_error`` is the standard
    error of the :math:`t_i`. Exact, with zero ``std_error``, when :math:`s` exceeds the rank of
    :math:`A` (``num_matvecs >= 2 * (rank + 1)``; almost surely, thanks to Gaussian probes, even
    when the range of :math:`A` is aligned with the coordinate axes); it then spends only
    :math:`s + \mathrm{rank}` products, reported in ``num_matvecs``. Needs ``num_matvecs >= 2``.

    Notes
    -----
    With :math:`P_{-i} = Q(I - c_i c_i^\top)Q^\top`, :math:`H = Q^\top A Q`, :math:`w_i =
    Q^\top\omega_i`, :math:`\tau_i = Q^\top A \omega_i` and :math:`\gamma_i = c_i^\top w_i`:
    :math:`\tilde\omega_i = (I - QQ^\top)\omega_i` has
    :math:`\tilde\omega_i^\top A \tilde\omega_i = \omega_i^\top A\omega_i - 2\tau_i^\top w_i
    + w_i^\top H w_i`, and

    .. math::
        t_i = \operatorname{tr} H - c_i^\top H c_i + \tilde\omega_i^\top A \tilde\omega_i
        + 2\gamma_i\, c_i^\top(\tau_i - H w_i) + \gamma_i^2\, c_i^\top H c_i.
    """
    block = as_block_operator(op)
    num_matvecs = check_num_matvecs(num_matvecs, 2, "xtrace")
    generator = make_generator(seed, block.device)
    sketch = exchangeable_sketch(block, num_matvecs // 2, generator, "gaussian")
    Q, C = sketch.basis, sketch.removed
    W = Q.T @ sketch.probes
    T = sketch.basis_images.T @ sketch.probes
    H = Q.T @ sketch.basis_images
    H = (H + H.T) / 2
    gamma = (C * W).sum(0)
    cHc = (C * (H @ C)).sum(0)
    residual = (sketch.probes * sketch.images).sum(0) - 2 * (T * W).sum(0) + (W * (H @ W)).sum(0)
    samples = H.trace() - cHc + residual + 2 * gamma * (C * (T - H @ W)).sum(0) + gamma**2 * cHc
    return _mean_estimate(samples, sketch.num_matvecs)
