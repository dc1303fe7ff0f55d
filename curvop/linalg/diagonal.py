r"""Randomized estimators of the diagonal: Hutchinson's (Bekas et al., 2007) and XDiag.

For Rademacher probes, :math:`E[\omega \odot A\omega] = \operatorname{diag}(A)`. A budget of
``n`` products or more buys the exact diagonal instead (:func:`exact_diagonal`), which the trace
estimators share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..progress import counting
from ..validation import check_num_matvecs, check_positive_int, check_real
from .adapter import BlockOperator, as_block_operator
from .probes import probe_chunks
from .sketch import SKETCH_VECTORS, exchangeable_sketch

__all__ = ["exact_diagonal", "hutchinson_diagonal", "xdiag"]

IDENTITY_BLOCK_ELEMENTS = 2**22  # entries of one block of identity columns (32 MiB in float64)


def exact_diagonal(block: BlockOperator) -> torch.Tensor:
    r"""The exact :math:`\operatorname{diag}(A)` from products with the ``n`` columns of the identity.

    The columns are multiplied in blocks of at most ``IDENTITY_BLOCK_ELEMENTS / n`` (at least
    one), so memory stays bounded whatever ``n``; ``n`` products in all. Returns float64 ``(n,)``
    on the block's device.
    """
    n, device = block.n, block.device
    width = max(1, IDENTITY_BLOCK_ELEMENTS // n)
    diagonal = torch.empty(n, dtype=torch.float64, device=device)
    for start in range(0, n, width):
        stop = min(n, start + width)
        columns = torch.zeros(n, stop - start, dtype=torch.float64, device=device)
        columns[start:stop].fill_diagonal_(1.0)
        diagonal[start:stop] = block.matmat(columns)[start:stop].diagonal()
    return diagonal


def hutchinson_diagonal(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | None = None,
    memory_gb: float = 1.0,
    progress: bool = False,
) -> np.ndarray:
    r"""Estimate :math:`\operatorname{diag}(A) \approx \frac{1}{m}\sum_i \omega_i \odot A\omega_i`.

    ``num_matvecs`` Rademacher probes, multiplied as one block where ``memory_gb`` (1 GiB) holds
    them and their products, in chunks otherwise (the same probes, the same estimate); returns
    numpy ``(n,)`` float64. Entry :math:`j` has variance :math:`\frac{1}{m}\sum_{k \ne j}
    A_{jk}^2`. With ``num_matvecs >= n`` it returns the exact diagonal from ``n`` products
    instead. ``progress`` shows a bar of the products (see :mod:`curvop.progress`).
    """
    block = as_block_operator(op)
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
    memory_gb = check_real(memory_gb, "memory_gb", positive=True)
    with counting(block, progress, min(num_matvecs, block.n), "diagonal (Hutchinson)") as block:
        if num_matvecs >= block.n:
            return exact_diagonal(block).cpu().numpy()
        generator = block.generator(seed)
        chunk = max(1, int(memory_gb * 2**30 // (2 * 8 * block.n)))
        total = torch.zeros(block.n, dtype=torch.float64, device=block.device)
        for probes in probe_chunks(block, generator, num_matvecs, chunk):
            total += (probes * block.matmat(probes)).sum(1)
    return (total / num_matvecs).cpu().numpy()


def xdiag(
    op: Any,
    num_matvecs: int,
    *,
    seed: int | None = None,
    memory_gb: float = 1.0,
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
    products instead. The sketch's four ``(n, s)`` arrays are float64 while ``memory_gb`` (1 GiB)
    holds them, else in the operator's dtype; ``progress`` shows a bar of the products.
    """
    block = as_block_operator(op)
    num_matvecs = check_num_matvecs(num_matvecs, min(2, block.n), "xdiag")
    memory_gb = check_real(memory_gb, "memory_gb", positive=True)
    with counting(block, progress, min(num_matvecs, block.n), "diagonal (XDiag)") as block:
        if num_matvecs >= block.n:
            return exact_diagonal(block).cpu().numpy()
        generator = block.generator(seed)
        dtype = block.working_dtype(SKETCH_VECTORS * (num_matvecs // 2), memory_gb)
        sketch = exchangeable_sketch(block, num_matvecs // 2, generator, "rademacher", dtype)
    Q, Z, probes = sketch.basis, sketch.basis_images, sketch.probes
    G, C = sketch.coordinates.to(dtype), sketch.removed.to(dtype)
    num_probes = G.shape[1]
    low_rank = ((Q - Q @ (C @ C.T) / num_probes) * Z).sum(1)
    residual = torch.addmm(sketch.images, Q, G - C * (C * G).sum(0), alpha=-1)
    diagonal = low_rank + residual.mul_(probes).sum(1) / num_probes
    return diagonal.double().cpu().numpy()
