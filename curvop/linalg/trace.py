r"""Randomized trace estimators: Hutchinson, Hutch++ and XTrace.

All three estimate :math:`\operatorname{tr}(A)` from products with random probes :math:`\omega`
with :math:`E[\omega\omega^\top] = I`, for which :math:`E[\omega^\top A \omega] =
\operatorname{tr}(A)`. Hutch++ and XTrace first capture the dominant part of :math:`A` exactly
with a low-rank sketch, so that the Monte-Carlo part only sees the remainder: on a matrix with a
decaying spectrum their error falls like :math:`1/m` instead of :math:`1/\sqrt{m}` in the number
of products :math:`m`.

Every estimator accepts any budget: with ``num_matvecs >= n`` products it returns the exact trace
from the ``n`` columns of the identity (:func:`~curvop.linalg.diagonal.exact_diagonal`), with
zero ``std_error`` and ``num_matvecs = n``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .estimation import Estimation, estimation, exact_diagonal
from .sketch import ExchangeableSketch, exchangeable_sketch

__all__ = ["Estimate", "hutchinson_trace", "hutchpp_trace", "xtrace"]


class Estimate(NamedTuple):
    """A randomized estimate with its standard error; ``float(estimate)`` is its value.

    A named tuple, so ``value, std_error, num_matvecs = estimate`` works too; it prints short,
    as ``Estimate(value=12.7186 ± 0.45, num_matvecs=60)`` (the attributes keep full precision).

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

    def __repr__(self) -> str:
        """``Estimate(value=12.7186 ± 0.45, num_matvecs=60)``: 6 and 2 significant digits."""
        std_error = float(f"{self.std_error:.2g}")  # 130, not 1.3e+02
        return f"Estimate(value={self.value:.6g} ± {std_error:g}, num_matvecs={self.num_matvecs})"


def _mean_estimate(samples: torch.Tensor, num_matvecs: int, offset: float = 0.0) -> Estimate:
    """``offset`` plus the mean of ``samples``, with the standard error of that mean."""
    count = samples.numel()
    std_error = float(samples.std() / math.sqrt(count)) if count > 1 else math.nan
    return Estimate(offset + float(samples.mean()), std_error, num_matvecs)


def _exact_trace(run: Estimation) -> Estimate:
    """The exact trace from the ``n`` columns of the identity: zero standard error."""
    return Estimate(float(exact_diagonal(run.work).sum()), 0.0, run.work.n)


def hutchinson_trace(
    op: Any,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    seed: int | None = None,
    memory_gb: float | None = None,
    progress: bool = False,
) -> Estimate:
    r"""Hutchinson's estimate :math:`\frac{1}{m}\sum_{i=1}^m \omega_i^\top A \omega_i`.

    Parameters
    ----------
    op
        A square SciPy ``LinearOperator`` (a curvop operator runs in torch on its device).
    num_matvecs
        Number of probes :math:`m` (products), multiplied as few blocks as the operator's
        measured costs and ``memory_gb`` make fastest (the same probes, the same estimate,
        whatever the blocks); from ``n`` on, the exact trace from ``n`` products.
    distribution
        ``"rademacher"``, ``"gaussian"`` or ``"sparse_rademacher"`` (see ``draw_probes``).
    seed
        Seed of the private generator.
    memory_gb
        Budget in GiB for what the call holds at once: the probes, their products and the
        products' autograd graphs. Default (``None``): a quarter of the device's free memory, of
        which a product takes at most four single products' worth (see
        :mod:`curvop.linalg.workspace`).
    progress
        Show a progress bar of the products (tqdm; see :mod:`curvop.progress`).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> float(hutchinson_trace(aslinearoperator(np.eye(4)), 8, seed=0))
    4.0
    """
    with estimation(
        op, num_matvecs, "hutchinson_trace", "trace (Hutchinson)",
        seed=seed, memory_gb=memory_gb, progress=progress,
    ) as run:  # fmt: skip
        if run.exact:
            return _exact_trace(run)
        work = run.work
        width = work.width(num_matvecs, 2 * work.vector_bytes())  # probes and products
        samples = torch.cat(
            [
                (probes * work.multiply(probes, 2 * probes.numel() * probes.itemsize)).sum(0)
                for probes in work.probe_chunks(run.generator, num_matvecs, width, distribution)
            ]
        )
    return _mean_estimate(samples.double(), num_matvecs)


def hutchpp_trace(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | None = None,
    memory_gb: float | None = None,
    progress: bool = False,
) -> Estimate:
    r"""Hutch++ (Meyer, Musco, Musco & Woodruff, 2021).

    With :math:`r = \lfloor m/3 \rfloor` sketch probes :math:`S` and :math:`Q` an orthonormal basis
    of :math:`AS`, and :math:`g = m - 2r` Rademacher probes :math:`G`,

    .. math::
        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
        + \frac{1}{g} \operatorname{tr}\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big).

    ``std_error`` is that of the second (Monte-Carlo) term. Two block products: :math:`AS`, then
    :math:`A[Q, (I - QQ^\top)G]`. Needs ``num_matvecs >= 3`` (``>= n`` when ``n < 3``); from
    ``n`` on, the exact trace from ``n`` products. The ``(n, m)`` arrays are in the operator's
    dtype (sums in float64); ``memory_gb`` and ``progress`` as for :func:`hutchinson_trace`.
    """
    with estimation(
        op, num_matvecs, "hutchpp_trace", "trace (Hutch++)",
        seed=seed, memory_gb=memory_gb, progress=progress, minimum=3,
    ) as run:  # fmt: skip
        if run.exact:
            return _exact_trace(run)
        work, rank = run.work, num_matvecs // 3
        vectors = work.vector_bytes() * num_matvecs
        sketch = work.multiply(work.probes(rank, run.generator), kept=vectors)
        basis = torch.linalg.qr(sketch).Q
        del sketch
        probes = work.probes(num_matvecs - 2 * rank, run.generator)
        probes = probes - basis @ (basis.T @ probes)
        images = work.multiply(torch.cat([basis, probes], dim=1), kept=2 * vectors)
    low_rank = float((basis * images[:, :rank]).double().sum())
    samples = (probes * images[:, rank:]).double().sum(0)
    return _mean_estimate(samples, num_matvecs, low_rank)


def _leave_one_out_samples(
    H: torch.Tensor,
    W: torch.Tensor,
    T: torch.Tensor,
    d: torch.Tensor,
    projector: torch.Tensor,
    removed: torch.Tensor,
) -> torch.Tensor:
    r"""XTrace's samples :math:`t_i` for the projectors :math:`Q M_i Q^\top`, :math:`M_i = M - u_i
    u_i^\top`, given in :math:`Q`'s coordinates.

    With :math:`a_i = M_i w_i`,

    .. math::
        t_i = \operatorname{tr}(H M_i) + d_i - 2\tau_i^\top a_i + a_i^\top H a_i
        = \operatorname{tr}(H M) - u_i^\top H u_i + d_i - 2\tau_i^\top a_i + a_i^\top H a_i.

    Parameters
    ----------
    H, W, T, d
        :math:`H` ``(r, r)``, :math:`W` ``(r, s)``, :math:`T` ``(r, s)``, :math:`d` ``(s,)``
        (see :func:`xtrace`).
    projector
        :math:`M`, ``(..., r, r)``, an orthogonal projector.
    removed
        ``(..., r, s)``; column :math:`u_i` is a unit vector in the range of :math:`M`, or zero.

    Returns
    -------
    torch.Tensor
        ``(..., s)``.
    """
    along = (removed * W).sum(-2, keepdim=True)  # u_i^T w_i
    projected = projector @ W - removed * along  # a_i
    low_rank = (H * projector).sum((-2, -1))[..., None] - (removed * (H @ removed)).sum(-2)
    return low_rank + d - 2 * (T * projected).sum(-2) + (projected * (H @ projected)).sum(-2)


BATCH_ELEMENTS = 2**22  # the (b, s, s) arrays of one batch of left-out probes stay this small


def _xtrace_std_error(
    sketch: ExchangeableSketch,
    H: torch.Tensor,
    W: torch.Tensor,
    T: torch.Tensor,
    d: torch.Tensor,
    samples: torch.Tensor,
) -> float:
    r"""XTrace's standard error from its samples and their leave-two-out versions (NaN for ``s = 1``).

    With :math:`\xi_i = t_i - \operatorname{tr}(A)`, :math:`V = E\,\xi_i^2` and :math:`C =
    E\,\xi_i\xi_k` (:math:`i \ne k`), :math:`\operatorname{Var}(\bar t) = (V + (s - 1)C)/s` and the
    sample variance :math:`S^2` of the :math:`t_i` has :math:`E\,S^2 = V - C`. Let
    :math:`t_i^{(k)}` be sample :math:`i` of the sketch without probe :math:`k`
    (:meth:`~curvop.linalg.sketch.ExchangeableSketch.leave_two_out`) and :math:`\delta_{ik} = t_i -
    t_i^{(k)}`. Given the other probes, :math:`t_i^{(k)}` depends on :math:`\omega_i` alone,
    :math:`t_k^{(i)}` on :math:`\omega_k` alone, and every sample is unbiased given the probes it
    does not own; hence :math:`C = E\,\delta_{ik}\delta_{ki}` and

    .. math::
        \hat C = \frac{1}{s(s - 1)} \sum_{i \ne k} \delta_{ik}\delta_{ki}, \qquad
        \widehat{\mathrm{se}}^2 = \frac{S^2}{s} + |\hat C|.

    With :math:`\hat C` in place of :math:`|\hat C|` the estimate is unbiased; the absolute
    value makes it conservative where :math:`\hat C` is noisy (a sketch that captures the large
    eigenvalues with ``s - 1`` probes but not with ``s - 2``). The left-out probes go in batches
    of at most ``BATCH_ELEMENTS / s^2`` (the SVDs' right singular vectors are ``s x s``).
    """
    num_probes = len(samples)
    if num_probes < 2:
        return math.nan
    indices = torch.arange(num_probes, device=W.device)
    batch = max(1, BATCH_ELEMENTS // num_probes**2)
    leave_two_out = torch.cat(
        [
            _leave_one_out_samples(H, W, T, d, *sketch.leave_two_out(left_out))
            for left_out in indices.split(batch)
        ]
    )
    changes = samples - leave_two_out  # changes[k, i] = delta_ik
    products = (changes * changes.T).masked_fill(indices == indices[:, None], 0.0)
    covariance = products.sum() / (num_probes * (num_probes - 1))
    return math.sqrt(float(samples.var()) / num_probes + abs(float(covariance)))


def xtrace(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | None = None,
    memory_gb: float | None = None,
    progress: bool = False,
) -> Estimate:
    r"""XTrace (Epperly, Tropp & Webber, 2024): Hutch++ made exchangeable.

    :math:`s = \lfloor m/2 \rfloor` Gaussian probes serve both as sketch and as Monte-Carlo
    probes: the ``i``-th leave-one-out estimate

    .. math::
        t_i = \operatorname{tr}(P_{-i} A P_{-i})
        + \omega_i^\top (I - P_{-i}) A (I - P_{-i}) \omega_i

    uses the projector :math:`P_{-i}` onto the sketch without probe ``i`` (see
    :mod:`curvop.linalg.sketch`), and the estimate is their mean.

    The :math:`t_i` share the sketch, so they are positively correlated and the naive
    :math:`S/\sqrt{s}` (:math:`S` their sample standard deviation) is too small, while a
    jackknife over the probes is far too large (on decaying spectra, 2 to 4 times the true
    error: it also counts how much one probe less worsens the sketch). ``std_error`` adds the
    covariance of two samples, estimated from the same products by leaving out a second probe
    (:math:`t_i^{(k)}`, sample ``i`` without probe ``k``):

    .. math::
        \widehat{\mathrm{se}}^2 = \frac{S^2}{s} + \Big|\frac{1}{s(s - 1)} \sum_{i \ne k}
        (t_i - t_i^{(k)})(t_k - t_k^{(i)})\Big|,

    unbiased without the absolute value, conservative with it (details in
    ``_xtrace_std_error``); NaN for ``s = 1``. Like any standard error from ``s`` samples it is
    itself noisy for small ``s``: as for a t-statistic, ±2 ``std_error`` covered 92% of 1000
    runs at ``s = 10`` and 93-95% at ``s = 20`` or more (decaying, indefinite, flat and
    regression-like spectra).

    Exact when :math:`s` exceeds the rank of :math:`A` (``num_matvecs >= 2 * (rank + 1)``;
    almost surely, thanks to Gaussian probes, even when the range of :math:`A` is aligned with
    the coordinate axes), with zero ``std_error`` once :math:`s - 2` probes span the range too
    (``num_matvecs >= 2 * (rank + 2)``); it then spends only :math:`s + \mathrm{rank}`
    products, reported in ``num_matvecs``. Needs ``num_matvecs >= 2`` (``>= n`` when ``n < 2``);
    from ``n`` on, the exact trace from ``n`` products.

    Notes
    -----
    Everything happens in the coordinates of the sketch basis :math:`Q` (``r <= s`` columns):
    with :math:`Z = AQ`, :math:`H = Q^\top Z`, :math:`W = Q^\top\Omega`, :math:`T = Z^\top\Omega`
    (columns :math:`w_i`, :math:`\tau_i`) and :math:`d_i = \omega_i^\top A\omega_i`, a projector
    :math:`P = QMQ^\top` gives

    .. math::
        t_i = \operatorname{tr}(HM) + d_i - 2\tau_i^\top M w_i + w_i^\top M H M w_i,

    with :math:`M = I - c_i c_i^\top` for :math:`t_i` and :math:`M = M_{-k} - u_{ik} u_{ik}^\top`
    for :math:`t_i^{(k)}` (:mod:`curvop.linalg.sketch`). The standard error costs no product,
    :math:`O(s^4)` floating-point operations on ``s x s`` matrices (batched SVDs) and no
    ``n``-sized memory beyond the sketch. The sketch's four ``(n, s)`` arrays are in the
    operator's dtype; ``memory_gb`` and ``progress`` as for :func:`hutchinson_trace`. Raises
    ``ValueError`` when the sketch shows that the operator is not symmetric (the estimate would
    be wrong).
    """
    with estimation(
        op, num_matvecs, "xtrace", "trace (XTrace)",
        seed=seed, memory_gb=memory_gb, progress=progress, minimum=2,
    ) as run:  # fmt: skip
        if run.exact:
            return _exact_trace(run)
        sketch = exchangeable_sketch(run.work, num_matvecs // 2, run.generator, "gaussian")
    Q, Z, Omega, H = sketch.basis, sketch.basis_images, sketch.probes, sketch.projection
    W, T = (Q.T @ Omega).double(), (Z.T @ Omega).double()
    d = (Omega * sketch.images).double().sum(0)
    identity = torch.eye(len(H), dtype=H.dtype, device=H.device)
    samples = _leave_one_out_samples(H, W, T, d, identity, sketch.removed)
    std_error = _xtrace_std_error(sketch, H, W, T, d, samples)
    return Estimate(float(samples.mean()), std_error, sketch.num_matvecs)
