r"""What every randomized estimator does before its mathematics, written once.

:func:`estimation` opens the call: the operator as a :class:`~curvop.linalg.workspace.Workspace`
with its memory budget, the budget of products checked, a progress bar over them, and either a
private generator for the probes or, when the budget reaches ``n`` products, the verdict that the
exact answer is cheaper: :func:`exact_diagonal` from the ``n`` columns of the identity (zero
error, ``n`` products), which the trace estimators sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import check_num_matvecs
from .workspace import Workspace, open_workspace

__all__ = ["Estimation", "estimation", "exact_diagonal"]

IDENTITY_BLOCK_ELEMENTS = 2**22  # entries of one block of identity columns (16 MiB in float32)


@dataclass(frozen=True)
class Estimation:
    """One estimator call.

    Attributes
    ----------
    work : Workspace
    num_matvecs : int
        The products asked for.
    generator : torch.Generator or None
        The private generator of the probes; ``None`` when the answer is exact.
    """

    work: Workspace
    num_matvecs: int
    generator: torch.Generator | None

    @property
    def exact(self) -> bool:
        """Whether ``num_matvecs >= n``: then ``n`` products give the exact answer."""
        return self.generator is None


@contextmanager
def estimation(
    op: Any,
    num_matvecs: Any,
    name: str,
    description: str,
    *,
    seed: int | None,
    memory_gb: Any,
    progress: bool,
    minimum: int = 1,
) -> Iterator[Estimation]:
    """Open the call of the estimator ``name`` on ``op`` with a budget of ``num_matvecs``
    products (at least ``minimum``, or ``n`` when ``n`` is smaller); ``description`` labels the
    progress bar."""
    work = open_workspace(op, memory_gb)
    num_matvecs = check_num_matvecs(num_matvecs, min(minimum, work.n), name)
    with work.counting(progress, min(num_matvecs, work.n), description):
        generator = None if num_matvecs >= work.n else work.generator(seed)
        yield Estimation(work, num_matvecs, generator)


def exact_diagonal(work: Workspace) -> torch.Tensor:
    r"""The exact :math:`\operatorname{diag}(A)` from products with the ``n`` columns of the
    identity, in blocks of at most ``IDENTITY_BLOCK_ELEMENTS / n`` columns (at least one), so
    that memory stays bounded whatever ``n``; float64 ``(n,)`` on the operator's device."""
    n = work.n
    width = max(1, IDENTITY_BLOCK_ELEMENTS // n)
    diagonal = torch.empty(n, dtype=torch.float64, device=work.device)
    for start in range(0, n, width):
        stop = min(n, start + width)
        columns = torch.zeros(n, stop - start, dtype=work.dtype, device=work.device)
        columns[start:stop].fill_diagonal_(1.0)
        diagonal[start:stop] = work.multiply(columns, dtype=torch.float64)[start:stop].diagonal()
    return diagonal
