"""Counting products: the one counter behind the progress bars, the CLI's report and the benchmarks.

Every product of a curvop operator, whatever asks for it (``apply``, ``@``, SciPy's ``matvec`` and
``matmat``, the spectral toolkit), is one call of its ``block_product``, which tells the
operator's observers how many columns it multiplied. :func:`count_products` registers such an
observer for the duration of a ``with`` block. Any other SciPy ``LinearOperator`` is counted at
its ``matvec`` / ``matmat`` (shadowed on the instance for the block, then restored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["ProductCount", "count_products"]

Observer = Callable[[int], None]


@dataclass
class ProductCount:
    """What an operator multiplied while it was counted.

    Attributes
    ----------
    columns : int
        Column products: a block of ``k`` columns counts ``k`` (what ``num_matvecs`` counts).
    calls : int
        Product calls: a block counts one (for a curvop operator, one pass over the data).
    """

    columns: int = 0
    calls: int = 0

    def __call__(self, columns: int) -> None:
        self.columns += columns
        self.calls += 1


@contextmanager
def count_products(op: Any, on_product: Observer | None = None) -> Iterator[ProductCount]:
    """Count the products of ``op`` made inside the ``with`` block.

    Parameters
    ----------
    op
        A curvop operator (its sums and scalings included), or any SciPy ``LinearOperator``.
    on_product
        Also called with the number of columns of every product (e.g. to advance a progress
        bar).

    Yields
    ------
    ProductCount
        Updated as the products run.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> A = aslinearoperator(np.eye(3))
    >>> with count_products(A) as count:
    ...     _ = A.matmat(np.ones((3, 2)))
    >>> count.columns, count.calls
    (2, 1)
    """
    count = ProductCount()

    def observe(columns: int) -> None:
        count(columns)
        if on_product is not None:
            on_product(columns)

    observers = getattr(op, "product_observers", None)
    if observers is not None:
        observers.append(observe)
        try:
            yield count
        finally:
            observers.remove(observe)
        return
    with _shadowed_products(op, observe):
        yield count


@contextmanager
def _shadowed_products(op: Any, observe: Observer) -> Iterator[None]:
    """``op.matvec`` and ``op.matmat`` (those it has) report to ``observe`` inside the block
    (instance attributes that shadow the class' methods, deleted afterwards). A product made
    inside another (SciPy's default ``matmat`` loops over ``matvec``) is not counted again."""
    depth = 0

    def counted(multiply: Callable[[Any], Any], columns: Callable[[Any], int]) -> Callable:
        def product(x: Any) -> Any:
            nonlocal depth
            if depth == 0:
                observe(columns(x))
            depth += 1
            try:
                return multiply(x)
            finally:
                depth -= 1

        return product

    widths = {"matvec": lambda x: 1, "matmat": lambda X: X.shape[1]}
    shadowed = [name for name in widths if callable(getattr(op, name, None))]
    if not shadowed:
        raise TypeError(
            f"op must be a curvop operator or have matvec/matmat to count, got {type(op).__name__}"
        )
    for name in shadowed:
        setattr(op, name, counted(getattr(op, name), widths[name]))
    try:
        yield
    finally:
        for name in shadowed:
            delattr(op, name)
