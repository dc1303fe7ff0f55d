r"""The interface the algorithms see: a symmetric ``n x n`` operator that multiplies torch blocks.

:class:`BlockOperator` is a SciPy ``LinearOperator`` with a torch face:

- :meth:`~BlockOperator.block_product` multiplies an ``(n, k)`` block in torch, on the operator's
  ``device`` and ``torch_dtype``, within an optional memory limit;
- ``accuracy`` (the stated relative accuracy of a product: 0 for exact operators),
  :meth:`~BlockOperator.product_cost` (seconds and peak bytes of a block of ``k`` columns, where
  the operator measures them) and ``process_group`` (the ``torch.distributed`` group its data is
  sharded over) are what the algorithms choose block widths, tolerances and seeds from;
- every product tells the operator's ``product_observers`` how many columns it multiplied
  (:func:`curvop.count_products`).

Sums, differences, scalings and shifts of block operators (``H + 0.1 * IdentityOperator(n)``,
``G - H``, ``2 * H``) are :class:`LinearCombination` s, block operators themselves, so the
algorithms keep running in torch on the device; SciPy's face (``@``, ``matvec``, ``matmat``,
``eigsh``, ``cg``) is the same as any ``LinearOperator``'s. Any other SciPy operator reaches the
algorithms through :class:`ScipyOperator`, a numpy round trip on the CPU.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator

__all__ = [
    "BlockOperator",
    "LinearCombination",
    "ProductCost",
    "ScipyOperator",
    "as_block_operator",
    "numpy_dtype",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)


class ProductCost(NamedTuple):
    """What one block product of ``k`` columns costs, as measured on the first batch.

    Attributes
    ----------
    seconds : float
        Wall time of the product on the first batch of the data (for a curvature operator:
        relative figures, for choosing between widths).
    bytes : int
        Peak memory the product adds while it runs: its autograd graph, the transient buffers of
        a batched backward pass and the result.
    """

    seconds: float
    bytes: int


def numpy_dtype(dtype: torch.dtype | None) -> np.dtype:
    """The dtype of SciPy's face: float64 for float64 (and for no dtype), float32 otherwise
    (half-precision operators take and return float32: NumPy has no bfloat16 and SciPy's
    solvers no float16)."""
    return np.dtype(np.float64 if dtype in (None, torch.float64) else np.float32)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class BlockOperator(LinearOperator):
    r"""A symmetric ``n x n`` operator with a torch block product and SciPy's face.

    Subclasses call ``super().__init__(n, dtype, device)`` and implement
    :meth:`_block_product` (calling ``self._observed(k)`` for each pass of ``k`` columns it
    runs, which :func:`curvop.count_products` counts); everything else (``apply``, ``@`` with
    torch or numpy, SciPy's ``matvec`` / ``matmat`` with checked shapes, sums and scalings) is
    shared.

    Attributes
    ----------
    torch_dtype : torch.dtype or None
        The precision of the blocks it takes and returns (float32 for half-precision models);
        ``None`` for an operator that takes any (the identity).
    device : torch.device or None
        Where the blocks live; ``None`` for an operator that works anywhere (the identity).
    accuracy : float
        Stated relative accuracy of a product: 0 for exact operators (rounding only).
    process_group
        The ``torch.distributed`` group the operator's data is sharded over, or ``None``.
    product_observers : list
        Callables told the column count of every product (see :func:`curvop.count_products`).
    """

    accuracy: float = 0.0
    process_group: Any = None

    def __init__(self, n: int, dtype: torch.dtype | None, device: torch.device | None):
        self.torch_dtype, self.device = dtype, device
        self.product_observers: list[Callable[[int], None]] = []
        super().__init__(dtype=numpy_dtype(dtype), shape=(n, n))

    # ------------------------------------------------------------------ torch face
    def block_product(self, V: torch.Tensor, *, memory_bytes: int | None = None) -> torch.Tensor:
        """``A V`` for an ``(n, k)`` block of ``torch_dtype`` on ``device``.

        Parameters
        ----------
        V
            The block, unchecked (the algorithms' hot path; :meth:`apply` checks).
        memory_bytes
            Peak memory the product may add (see :meth:`product_cost`); ``None``: the operator's
            default. Operators that measure their cost split a block that would exceed it.

        Returns
        -------
        torch.Tensor
            ``(n, k)``, possibly the transpose of a contiguous ``(k, n)`` tensor.
        """
        if V.shape[1] == 0:
            return torch.zeros_like(V)
        return self._block_product(V, memory_bytes)

    def _block_product(self, V: torch.Tensor, memory_bytes: int | None) -> torch.Tensor:
        raise NotImplementedError

    def _observed(self, columns: int) -> None:
        """Tell the observers that a product of ``columns`` columns runs (once per pass)."""
        for observe in self.product_observers:
            observe(columns)

    def product_cost(self, k: int, memory_bytes: int | None = None) -> ProductCost | None:
        """Seconds and peak bytes of a block product of ``k`` columns within ``memory_bytes``,
        or ``None`` where the operator does not measure them."""
        return None

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply a torch ``(n,)`` vector or ``(n, k)`` block, of ``torch_dtype`` on ``device``.

        All ``k`` columns of a curvature operator are multiplied in one pass over the data (a
        block wider than its memory allows in a few). For numpy arrays use ``A @ x``.
        """
        V = self._check_block(V, "V")
        block = V if V.dim() == 2 else V.unsqueeze(1)
        result = self.block_product(block).contiguous()
        return result if V.dim() == 2 else result.squeeze(1)

    def _check_block(self, V: Any, name: str) -> torch.Tensor:
        n = self.shape[0]
        if isinstance(V, np.ndarray):
            raise TypeError(
                f"{name} must be a torch tensor, got a numpy array: for numpy use A @ x (or "
                "A.matvec(x), A.matmat(X)), which returns numpy"
            )
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(V).__name__}")
        if V.is_complex():
            raise TypeError(f"{name} must be real, got complex dtype {V.dtype}")
        if V.dim() not in (1, 2) or V.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) or ({n}, k), got {tuple(V.shape)}")
        if not V.is_floating_point():
            raise TypeError(f"{name} must be real floating point, got dtype {V.dtype}")
        wrong_dtype = self.torch_dtype is not None and V.dtype != self.torch_dtype
        wrong_device = self.device is not None and V.device != self.device
        if wrong_dtype or wrong_device:
            raise ValueError(
                f"{name} must have dtype {self.torch_dtype} on device {self.device}, got dtype "
                f"{V.dtype} on device {V.device} (convert it explicitly with .to())"
            )
        return V

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return LinearCombination([(1.0, self), (1.0, as_block_operator(other))])
        return super().__add__(other)

    def __radd__(self, other: Any) -> Any:
        if _is_scalar(other) and other == 0:  # sum([A, B]) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return self + (-1.0) * as_block_operator(other)
        return NotImplemented

    def __neg__(self) -> LinearCombination:
        return LinearCombination([(-1.0, self)])

    def __mul__(self, other: Any) -> Any:
        if _is_scalar(other):
            return LinearCombination([(float(other), self)])
        return self.dot(other)

    def __rmul__(self, other: Any) -> Any:
        if _is_scalar(other):
            return LinearCombination([(float(other), self)])
        return super().__rmul__(other)

    def __truediv__(self, other: Any) -> Any:
        if _is_scalar(other):
            return LinearCombination([(1.0 / float(other), self)])
        return super().__truediv__(other)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            return self.apply(other)
        return super().__matmul__(other)

    def dot(self, x: Any) -> Any:
        """``A @ x``: a torch tensor goes through :meth:`apply`, a numpy array through
        :meth:`matvec` / :meth:`matmat` (shape checks included); anything else is SciPy's."""
        if isinstance(x, torch.Tensor):
            return self.apply(x)
        if isinstance(x, np.ndarray):
            return self.matvec(x) if x.ndim == 1 else self.matmat(x)
        return super().dot(x)

    # ------------------------------------------------------------------ SciPy face
    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``A @ x`` for numpy ``x`` of shape ``(n,)`` (an ``(n, 1)`` column goes through
        :meth:`matmat`, as SciPy will require)."""
        x = self._check_array(x, "x", vector=True)
        return self.matmat(x) if x.ndim == 2 else super().matvec(x)

    def matmat(self, X: np.ndarray) -> np.ndarray:
        """``A @ X`` for numpy ``X`` of shape ``(n, k)``, in one block product."""
        return super().matmat(self._check_array(X, "X", vector=False))

    rmatvec = matvec  # symmetric
    rmatmat = matmat

    def _check_array(self, x: Any, name: str, *, vector: bool) -> np.ndarray:
        """SciPy's own check says only "dimension mismatch": state expected and received."""
        x = np.asanyarray(x)
        n = self.shape[1]
        valid = x.shape in ((n,), (n, 1)) if vector else (x.ndim == 2 and x.shape[0] == n)
        if not valid:
            expected = f"({n},) or ({n}, 1)" if vector else f"({n}, k)"
            raise ValueError(f"{name} must have shape {expected}, got {x.shape}")
        if np.iscomplexobj(x):
            raise TypeError(f"{name} must be real, got complex dtype {x.dtype}")
        return x

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        block = torch.as_tensor(np.asarray(X), dtype=self.torch_dtype, device=self.device)
        block = block if block.dim() == 2 else block.unsqueeze(1)
        result = self.block_product(block).cpu().numpy().astype(self.dtype, copy=False)
        return result.reshape(X.shape)

    _matvec = _matmat  # (n,) and (n, k) alike
    _rmatvec = _matmat  # symmetric
    _rmatmat = _matmat

    def _adjoint(self) -> BlockOperator:
        return self

    _transpose = _adjoint


class LinearCombination(BlockOperator):
    r""":math:`\sum_i c_i A_i` of block operators, itself a block operator (what ``+``, ``-``,
    ``*`` and ``/`` by a scalar make of them).

    The terms must share their size, device (operators without one, such as the identity, go
    anywhere) and process group; products run in the widest dtype of the terms, each term in its
    own. The stated accuracy is the worst of the terms', the cost the sum of theirs (seconds)
    and the largest (bytes: the terms run one after the other).

    Parameters
    ----------
    terms
        ``(coefficient, operator)`` pairs; nested combinations are flattened.
    """

    def __init__(self, terms: Sequence[tuple[float, BlockOperator]]):
        flat: list[tuple[float, BlockOperator]] = []
        for coefficient, op in terms:
            if isinstance(op, LinearCombination):
                flat += [(coefficient * c, term) for c, term in op.terms]
            else:
                flat.append((float(coefficient), op))
        sizes = {op.shape[0] for _, op in flat}
        if len(sizes) > 1:
            raise ValueError(f"operators of different sizes cannot be added: {sorted(sizes)}")
        devices = {op.device for _, op in flat if op.device is not None}
        if len(devices) > 1:
            raise ValueError(
                f"operators on different devices cannot be added: {sorted(map(str, devices))}"
            )
        groups = {id(op.process_group): op.process_group for _, op in flat if op.process_group}
        if len(groups) > 1:
            raise ValueError("operators over different process groups cannot be added")
        dtypes = [op.torch_dtype for _, op in flat if op.torch_dtype is not None]
        dtype = None
        for each in dtypes:
            dtype = each if dtype is None else torch.promote_types(dtype, each)
        self.terms = flat
        self.accuracy = max(op.accuracy for _, op in flat)
        self.process_group = next(iter(groups.values()), None)
        super().__init__(sizes.pop(), dtype, devices.pop() if devices else None)

    def __repr__(self) -> str:
        parts = [f"{c:g} * {op!r}" for c, op in self.terms]
        return " + ".join(parts)

    def _block_product(self, V: torch.Tensor, memory_bytes: int | None) -> torch.Tensor:
        self._observed(V.shape[1])
        total = None
        for coefficient, op in self.terms:
            if op.torch_dtype is None and total is not None:  # the identity: no product
                total.add_(V, alpha=coefficient)
                continue
            block = V if op.torch_dtype in (None, V.dtype) else V.to(op.torch_dtype)
            product = op.block_product(block, memory_bytes=memory_bytes).to(V.dtype)
            total = (
                product * coefficient if total is None else total.add_(product, alpha=coefficient)
            )
        return total

    def product_cost(self, k: int, memory_bytes: int | None = None) -> ProductCost | None:
        costs = [op.product_cost(k, memory_bytes) for _, op in self.terms]
        if any(cost is None for cost in costs):
            return None
        return ProductCost(sum(c.seconds for c in costs), max(c.bytes for c in costs))


class ScipyOperator(BlockOperator):
    """Any other square, real SciPy ``LinearOperator`` (or a matrix ``aslinearoperator``
    accepts) as a block operator: each block product is a numpy round trip through its
    ``matmat`` on the CPU, in float32 if its dtype is float32, else float64."""

    def __init__(self, op: Any):
        if not isinstance(op, LinearOperator):
            try:
                op = aslinearoperator(op)
            except TypeError:
                raise TypeError(
                    "op must be a scipy.sparse.linalg.LinearOperator (or a matrix that "
                    f"aslinearoperator accepts), got {type(op).__name__}"
                ) from None
        if len(op.shape) != 2 or op.shape[0] != op.shape[1] or op.shape[0] < 1:
            raise ValueError(f"op must be a square, non-empty operator, got shape {op.shape}")
        dtype = np.dtype(op.dtype) if op.dtype is not None else np.dtype(np.float64)
        if np.issubdtype(dtype, np.complexfloating):
            raise TypeError(f"op must be real, got dtype {dtype}")
        self.wrapped = op
        torch_dtype = torch.float32 if dtype == np.float32 else torch.float64
        super().__init__(op.shape[0], torch_dtype, torch.device("cpu"))

    def __repr__(self) -> str:
        return f"ScipyOperator({self.wrapped!r})"

    def _block_product(self, V: torch.Tensor, memory_bytes: int | None) -> torch.Tensor:
        self._observed(V.shape[1])
        result = self.wrapped.matmat(V.cpu().numpy())
        return torch.from_numpy(np.asarray(result, dtype=self.dtype)).to(V.device)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self._observed(X.shape[1] if X.ndim == 2 else 1)
        return self.wrapped.matmat(X) if X.ndim == 2 else self.wrapped.matvec(X)

    _matvec = _rmatvec = _rmatmat = _matmat


def as_block_operator(op: Any) -> BlockOperator:
    """``op`` itself if it is a :class:`BlockOperator`, else wrapped as a :class:`ScipyOperator`.

    Raises
    ------
    TypeError
        If ``op`` is no linear operator, or is complex.
    ValueError
        If ``op`` is not square or is empty.
    """
    return op if isinstance(op, BlockOperator) else ScipyOperator(op)
