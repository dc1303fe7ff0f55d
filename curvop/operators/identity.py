"""The identity as a SciPy ``LinearOperator``: damping without a dense ``n x n`` matrix."""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ..validation import check_positive_int

__all__ = ["IdentityOperator"]


class IdentityOperator(LinearOperator):
    r"""The ``n x n`` identity, for damped operators :math:`A + \lambda I` in SciPy's solvers.

    ``aslinearoperator(np.eye(n))`` would hold :math:`n^2` numbers (80 GB at a million
    parameters); this holds none.

    Parameters
    ----------
    n
        The size.
    dtype
        The numpy dtype it reports (default float64).

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
        n = check_positive_int(n, "n")
        super().__init__(dtype=np.dtype(dtype), shape=(n, n))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, copy=True)

    _matmat = _rmatvec = _rmatmat = _matvec

    def _adjoint(self) -> IdentityOperator:
        return self

    _transpose = _adjoint
