"""The identity as a block operator: damping :math:`A + \\lambda I` without an ``n x n`` matrix."""

from __future__ import annotations

import numpy as np
import torch

from ..validation import check_positive_int
from .block import BlockOperator, ProductCost

__all__ = ["IdentityOperator"]


class IdentityOperator(BlockOperator):
    r"""The ``n x n`` identity, for damped operators :math:`A + \lambda I`.

    ``aslinearoperator(np.eye(n))`` would hold :math:`n^2` numbers (80 GB at a million
    parameters); this holds none. It has no device or dtype of its own: in
    ``H + 0.1 * IdentityOperator(n)`` it takes those of ``H``, and the sum stays a torch
    operator on ``H``'s device for curvop's algorithms, while SciPy's solvers see a
    ``LinearOperator`` as usual.

    Parameters
    ----------
    n
        The size.
    dtype
        The numpy dtype its SciPy face reports when used alone (default float64).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.sparse.linalg import aslinearoperator, cg
    >>> A = aslinearoperator(np.diag([1.0, 2.0]))
    >>> x, info = cg(A + 0.5 * IdentityOperator(2), np.ones(2))
    >>> x.round(6)
    array([0.666667, 0.4     ])
    """

    def __init__(self, n: int, dtype: np.dtype | type = np.float64):
        super().__init__(check_positive_int(n, "n"), None, None)
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"IdentityOperator({self.shape[0]})"

    def _block_product(self, V: torch.Tensor, memory_bytes: int | None) -> torch.Tensor:
        self._observed(V.shape[1])
        return V.clone()

    def product_cost(self, k: int, memory_bytes: int | None = None) -> ProductCost:
        return ProductCost(0.0, 0)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self._observed(X.shape[1] if X.ndim == 2 else 1)
        return np.array(X, copy=True)

    _matvec = _rmatvec = _rmatmat = _matmat
