"""One block-product interface for every operator: ``V -> A V`` on torch ``(n, k)`` blocks.

curvop's algorithms are written once against :class:`BlockOperator`. For a
:class:`~curvop.CurvatureOperator` the product is its ``apply`` (torch, on the parameters' device,
all columns in one pass over the data); for any other SciPy ``LinearOperator`` it is a numpy
round trip through ``matmat`` on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from ..distributed import broadcast_seed, mean_over_ranks
from ..operators.base import CurvatureOperator
from ..symmetry import symmetry_gap, symmetry_tolerance
from .probes import draw_probes, make_generator

NARROW_CHUNK = 8  # float64 columns drawn at a time for a narrower probe block

__all__ = ["BlockOperator", "as_block_operator", "as_scipy_float64", "raise_not_symmetric"]


@dataclass(frozen=True)
class BlockOperator:
    """A symmetric ``n x n`` operator seen as a product of torch blocks.

    Attributes
    ----------
    n : int
        The operator's size.
    dtype : torch.dtype
        The precision the products run in (the operator's own).
    device : torch.device
        Where the vectors live.
    product : callable
        ``(n, k)`` tensor of ``dtype`` on ``device`` -> ``(n, k)`` product.
    symmetry_tolerance : float
        The relative asymmetry the operator may show (see :func:`curvop.symmetry.symmetry_tolerance`);
        algorithms that see more stop with a ``ValueError``.
    """

    n: int
    dtype: torch.dtype
    device: torch.device
    product: Callable[[torch.Tensor], torch.Tensor]
    symmetry_tolerance: float
    column_seconds: Callable[[int], float | None] | None = None
    process_group: Any = None
    product_observers: list = field(default_factory=list)  # see curvop.counting

    def __post_init__(self) -> None:
        product = self.product

        def observed(V: torch.Tensor) -> torch.Tensor:
            for observe in self.product_observers:
                observe(V.shape[1])
            return product(V)

        object.__setattr__(self, "product", observed)

    @property
    def measures_cost(self) -> bool:
        """Whether the operator times its products (curvop operators do; SciPy's do not)."""
        return self.column_seconds is not None

    def block_costs(self, k: int) -> tuple[float, float] | None:
        """Measured seconds of a column alone, and the cost of a column in a ``k``-column block
        relative to it (``None`` until both widths were multiplied); means over the ranks of a
        process group, so that every rank takes the same decision from them."""
        block, single = self.column_seconds(k), self.column_seconds(1)
        if block is None or single is None:
            return None
        costs = [single, block / single]
        if self.process_group is not None:
            costs = mean_over_ranks(costs, self.process_group, self.device)
        return costs[0], costs[1]

    def generator(self, seed: int | None, device: torch.device | str | None = None):
        """A private generator on ``device`` (default: the operator's) seeded with ``seed``; with
        ``seed=None``, a fresh seed, the same on every rank of a process group (drawn on the
        first rank and broadcast)."""
        if seed is None and self.process_group is not None:
            seed = broadcast_seed(self.process_group, self.device)
        return make_generator(seed, self.device if device is None else device)

    @property
    def eps(self) -> float:
        """Machine epsilon of the products' precision."""
        return torch.finfo(self.dtype).eps

    def matmat(self, V: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``A V`` for an ``(n, k)`` block: computed in the operator's ``dtype``, returned in
        ``dtype`` (float64 by default)."""
        return self.product(V.to(self.dtype)).to(dtype)

    def check_symmetric(self, generator: torch.Generator) -> None:
        """Raise ``ValueError`` if two random vectors show more asymmetry than allowed (one
        block product of two columns; see :func:`curvop.symmetry.symmetry_gap`)."""
        gap = symmetry_gap(self.product, self.n, generator, dtype=self.dtype, device=self.device)
        if gap > self.symmetry_tolerance:
            raise_not_symmetric(gap, self.symmetry_tolerance)

    def probes(
        self,
        k: int,
        generator: torch.Generator,
        distribution: str = "rademacher",
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        r"""``k`` probe columns of ``dtype`` on ``device`` with :math:`E[zz^\top] = I`.

        Always drawn in float64 (a few columns at a time when ``dtype`` is narrower), so that a
        float32 sketch chosen to save memory holds the same probes, rounded.
        """

        def draw(count: int) -> torch.Tensor:
            return draw_probes(
                self.n, count, distribution=distribution, generator=generator,
                dtype=torch.float64, device=self.device,
            )  # fmt: skip

        if dtype == torch.float64:
            return draw(k)
        probes = torch.empty(self.n, k, dtype=dtype, device=self.device)
        for first in range(0, k, NARROW_CHUNK):
            probes[:, first : first + NARROW_CHUNK] = draw(min(NARROW_CHUNK, k - first))
        return probes

    def working_dtype(self, vectors: int, memory_gb: float) -> torch.dtype:
        """float64 if ``vectors`` of length ``n`` fit in ``memory_gb``, else the operator's own
        dtype (half the memory for float32; its products carry no more precision anyway)."""
        return torch.float64 if vectors * self.n * 8 <= memory_gb * 2**30 else self.dtype


def raise_not_symmetric(gap: float, tolerance: float) -> None:
    """The error of every algorithm that finds its operator is not symmetric."""
    raise ValueError(
        f"op must be symmetric, but it is not: its relative asymmetry is {gap:.3g} > "
        f"{tolerance:.3g}. Krylov methods (Lanczos, CG, MINRES) would return garbage or never "
        "converge on it. A finite-difference Hessian across ReLU-like kinks is the usual cause "
        "(use HessianOperator); op.check_symmetric() measures it on a curvop operator."
    )


def as_block_operator(op: Any) -> BlockOperator:
    """Wrap ``op`` (a SciPy ``LinearOperator`` or anything ``aslinearoperator`` accepts).

    Raises
    ------
    TypeError
        If ``op`` is no linear operator, or is complex.
    ValueError
        If ``op`` is not square or is empty.
    """
    if isinstance(op, CurvatureOperator):
        layout = op.layout
        tolerance = symmetry_tolerance(layout.dtype, op.accuracy)
        return BlockOperator(
            layout.size, layout.dtype, layout.device, op.block_product, tolerance, op.column_seconds,
            op.process_group,
        )  # fmt: skip
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
    numpy_dtype = np.dtype(op.dtype) if op.dtype is not None else np.dtype(np.float64)
    if np.issubdtype(numpy_dtype, np.complexfloating):
        raise TypeError(f"op must be real, got dtype {numpy_dtype}")
    dtype = torch.float32 if numpy_dtype == np.float32 else torch.float64
    work = np.float32 if dtype == torch.float32 else np.float64

    def product(V: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(op.matmat(V.cpu().numpy()), dtype=work))

    return BlockOperator(
        op.shape[0], dtype, torch.device("cpu"), product, symmetry_tolerance(dtype)
    )


def as_scipy_float64(block: BlockOperator) -> LinearOperator:
    """``block`` as a float64 SciPy ``LinearOperator`` (for ARPACK and the Krylov solvers).

    Vectors arrive as float64 numpy, are multiplied in the operator's own precision on its device
    and come back as float64 numpy.
    """

    def matmat(X: np.ndarray) -> np.ndarray:
        block_in = torch.from_numpy(np.asarray(X, dtype=np.float64).reshape(block.n, -1))
        result = block.matmat(block_in.to(block.device)).cpu().numpy()
        return result.reshape(X.shape)

    return LinearOperator((block.n, block.n), matvec=matmat, matmat=matmat, dtype=np.float64)
