r"""Randomized estimators of the diagonal: Hutchinson's (Bekas et al., 2007) and XDiag.

For Rademacher probes, :math:`E[\omega \odot A\omega] = \operatorname{diag}(A)`. A budget of
``n`` products or more buys the exact diagonal instead
(:func:`~curvop.linalg.estimation.exact_diagonal`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .estimation import estimation, exact_diagonal
from .sketch import exchangeable_sketch

__all__ = ["hutchinson_diagonal", "xdiag"]


def hutchinson_diagonal(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | None = None,
    memory_gb: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    r"""Estimate :math:`\operatorname{diag}(A) \approx \frac{1}{m}\sum_i \omega_i \odot A\omega_i`.

    ``num_matvecs`` Rademacher probes, multiplied in as few blocks as the operator's costs and
    ``memory_gb`` make fastest (the same probes, the same estimate, whatever the blocks; the
    budget as for :func:`~curvop.hutchinson_trace`); returns
    numpy ``(n,)`` float64. Entry :math:`j` has variance :math:`\frac{1}{m}\sum_{k \ne j}
    A_{jk}^2`. With ``num_matvecs >= n`` it returns the exact diagonal from ``n`` products
    instead. ``progress`` shows a bar of the products (see :mod:`curvop.progress`).
    """
    with estimation(
        op, num_matvecs, "hutchinson_diagonal", "diagonal (Hutchinson)",
        seed=seed, memory_gb=memory_gb, progress=progress,
    ) as run:  # fmt: skip
        work = run.work
        if run.exact:
            return exact_diagonal(work).cpu().numpy()
        width = work.width(num_matvecs, 2 * work.vector_bytes(), kept=8 * work.n)
        total = torch.zeros(work.n, dtype=torch.float64, device=work.device)
        for probes in work.probe_chunks(run.generator, num_matvecs, width, "rademacher"):
            product = work.multiply(probes, 2 * probes.numel() * probes.itemsize + 8 * work.n)
            total += (probes * product).sum(1)
    return (total / num_matvecs).cpu().numpy()


def xdiag(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | None = None,
    memory_gb: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    r"""XDiag (Epperly, Tropp & Webber, 2024), the exchangeable diagonal estimator.

    With :math:`s = \lfloor m/2 \rfloor` Rademacher probes and the leave-one-out projectors
    :math:`P_{-i}` of :mod:`curvop.linalg.sketch`,

    .. math::
        \operatorname{diag}(A) \approx \frac{1}{s} \sum_{i=1}^s \Big[
        \operatorname{diag}(P_{-i} A) + \omega_i \odot (I - P_{-i}) A \omega_i \Big].

    With :math:`P_{-i} = QQ^\top - u_i u_i^\top`, :math:`u_i = Qc_i`, :math:`Z = AQ` and
    :math:`G = Q^\top Y`: :math:`\operatorname{diag}(P_{-i} A) = \sum_k Q_{:k} \odot Z_{:k} - u_i
    \odot Zc_i` and :math:`(I - P_{-i})y_i = y_i - Q(g_i - c_i\, c_i^\top g_i)`, so that

    .. math::
        \operatorname{diag}(A) \approx \sum_k \big[Q(I - \tfrac{1}{s}CC^\top)\big]_{:k}
        \odot Z_{:k} + \frac{1}{s} \sum_i \omega_i \odot \big(Y - Q(G - C
        \operatorname{diag}(c_i^\top g_i))\big)_{:i},

    from the two block products of the sketch, with one ``(n, s)`` temporary. Exact when
    :math:`s` exceeds the rank of :math:`A` (``num_matvecs >= 2 * (rank + 1)``) and the range of
    :math:`A` is not aligned with the coordinate axes (see :mod:`curvop.linalg.sketch`).
    Rademacher rather than Gaussian probes, because the Monte-Carlo part then has no error from
    the diagonal of the remainder. Returns numpy ``(n,)`` float64; needs ``num_matvecs >= 2``
    (``>= n`` when ``n < 2``). With ``num_matvecs >= n`` it returns the exact diagonal from ``n``
    products instead. The sketch's four ``(n, s)`` arrays are in the operator's dtype;
    ``memory_gb`` as for :func:`~curvop.hutchinson_trace`, ``progress`` shows a bar of the
    products. Raises ``ValueError`` when the sketch shows that the operator is not symmetric.
    """
    with estimation(
        op, num_matvecs, "xdiag", "diagonal (XDiag)",
        seed=seed, memory_gb=memory_gb, progress=progress, minimum=2,
    ) as run:  # fmt: skip
        if run.exact:
            return exact_diagonal(run.work).cpu().numpy()
        sketch = exchangeable_sketch(run.work, num_matvecs // 2, run.generator, "rademacher")
    Q, Z, probes = sketch.basis, sketch.basis_images, sketch.probes
    G, C = sketch.coordinates.to(Q.dtype), sketch.removed.to(Q.dtype)
    num_probes = G.shape[1]
    low_rank = ((Q - Q @ (C @ C.T) / num_probes) * Z).sum(1, dtype=torch.float64)
    residual = torch.addmm(sketch.images, Q, G - C * (C * G).sum(0), alpha=-1)
    diagonal = low_rank + residual.mul_(probes).sum(1, dtype=torch.float64) / num_probes
    return diagonal.cpu().numpy()
