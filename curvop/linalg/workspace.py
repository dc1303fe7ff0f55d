r"""What every algorithm works with: the operator, its memory budget and a private generator.

An algorithm holds two kinds of memory at once: the ``n``-vectors it keeps (a Lanczos basis, a
sketch, probes and their products) and the peak of the block products it runs (their autograd
graphs). :class:`Workspace` makes both count against one budget: ``memory_gb`` when the caller
gives it, else the device's default (:func:`curvop.memory.default_budget_bytes`), of which a
product may then take at most :data:`~curvop.operators.base.DEFAULT_GRAPH_PRODUCTS` single
products' worth. Given what the algorithm keeps, the workspace tells each product how much it
may add (:meth:`Workspace.product_limit`), and chooses how many columns run side by side from
the operator's measured costs (:meth:`Workspace.width`): the fewest passes of the fastest kind
that fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import broadcast_seed, min_over_ranks
from ..memory import default_budget_bytes
from ..operators.base import graph_allowance
from ..operators.block import BlockOperator, as_block_operator
from ..progress import counting
from ..symmetry import symmetry_gap, symmetry_tolerance
from ..validation import check_memory_gb
from .probes import draw_probes, make_generator

__all__ = ["Workspace", "open_workspace", "raise_not_symmetric"]

PROBE_CHUNK = 8  # float64 probe columns drawn at a time for a narrower block


def raise_not_symmetric(gap: float, tolerance: float) -> None:
    """The error of every algorithm that finds its operator is not symmetric."""
    raise ValueError(
        f"op must be symmetric, but it is not: its relative asymmetry is {gap:.3g} > "
        f"{tolerance:.3g}. Krylov methods (Lanczos, CG, MINRES) and the exchangeable "
        "estimators (XTrace, XDiag) would return garbage or never converge on it. A "
        "finite-difference Hessian across ReLU-like kinks is the usual cause (use "
        "HessianOperator); op.check_symmetric() measures it on a curvop operator."
    )


@dataclass
class Workspace:
    """An operator seen by an algorithm, with the memory budget of the call.

    Attributes
    ----------
    op : BlockOperator
        The operator (a SciPy operator wrapped as :class:`~curvop.operators.ScipyOperator`).
    budget : int
        Bytes the call may hold at once: its vectors and the peak of its products.
    explicit : bool
        Whether the budget was given (``memory_gb``); a default budget also caps each product at
        ``DEFAULT_GRAPH_PRODUCTS`` single products.
    """

    op: BlockOperator
    budget: int
    explicit: bool

    @property
    def n(self) -> int:
        return self.op.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the products (float64 for an operator that takes any)."""
        return self.op.torch_dtype or torch.float64

    @property
    def device(self) -> torch.device:
        return self.op.device or torch.device("cpu")

    @property
    def eps(self) -> float:
        return torch.finfo(self.dtype).eps

    @property
    def symmetry_tolerance(self) -> float:
        """The relative asymmetry the operator may show (rounding, or its stated accuracy)."""
        return symmetry_tolerance(self.dtype, self.op.accuracy)

    def vector_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one ``n``-vector in ``dtype`` (default: the products')."""
        return self.n * (dtype or self.dtype).itemsize

    # ------------------------------------------------------------------ products
    def product_limit(self, kept: int = 0) -> int | None:
        """The peak bytes a product may add while the algorithm keeps ``kept`` bytes of vectors
        (never below zero: one column always runs)."""
        left = max(0, self.budget - kept)
        if self.explicit:
            return left
        single = self.op.product_cost(1, left)
        if single is None:
            return left
        return min(left, graph_allowance(single.bytes))

    def multiply(
        self, V: torch.Tensor, kept: int = 0, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``A V`` in ``dtype`` (default: the products'), the product within what ``kept`` bytes
        of vectors leave of the budget."""
        product = self.op.block_product(V.to(self.dtype), memory_bytes=self.product_limit(kept))
        return product if dtype in (None, product.dtype) else product.to(dtype)

    def width(self, columns: int, per_column: int, kept: int = 0) -> int:
        """How many of ``columns`` independent columns run side by side, each keeping
        ``per_column`` bytes of vectors while it runs (e.g. a probe's Lanczos basis): the width
        with the least predicted time for all of them (passes times the time of a pass; the
        wider on a tie, for fewer passes over the data) among those that fit the budget with
        their product; at least one. Without measured costs (a SciPy operator): as many as the
        vectors allow."""
        best, best_seconds = 1, math.inf
        for width in range(1, columns + 1):
            held = kept + width * per_column
            if width > 1 and held > self.budget:
                break
            cost = self.op.product_cost(width, self.product_limit(held))
            if cost is None:
                best = width
                continue
            if width > 1 and held + cost.bytes > self.budget:
                break
            seconds = math.ceil(columns / width) * cost.seconds
            if seconds <= best_seconds:  # ties go to fewer passes over the data
                best, best_seconds = width, seconds
        return best

    # ------------------------------------------------------------------ randomness, checks
    def generator(self, seed: int | None, device: torch.device | str | None = None):
        """A private generator on ``device`` (default: the operator's) seeded with ``seed``; with
        ``seed=None``, a fresh seed, the same on every rank of a process group (drawn on the
        first rank and broadcast)."""
        if seed is None and self.op.process_group is not None:
            seed = broadcast_seed(self.op.process_group, self.device)
        return make_generator(seed, self.device if device is None else device)

    def probes(
        self,
        k: int,
        generator: torch.Generator,
        distribution: str = "rademacher",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        r"""``k`` probe columns of ``dtype`` (default: the products') with :math:`E[zz^\top] = I`.

        Always drawn in float64 (a few columns at a time when ``dtype`` is narrower), so that the
        same seed gives the same probes, rounded, whatever the operator's precision.
        """
        dtype = dtype or self.dtype

        def draw(count: int) -> torch.Tensor:
            return draw_probes(
                self.n, count, distribution=distribution, generator=generator,
                dtype=torch.float64, device=self.device,
            )  # fmt: skip

        if dtype == torch.float64:
            return draw(k)
        probes = torch.empty(self.n, k, dtype=dtype, device=self.device)
        for first in range(0, k, PROBE_CHUNK):
            probes[:, first : first + PROBE_CHUNK] = draw(min(PROBE_CHUNK, k - first))
        return probes

    def probe_chunks(
        self, generator: torch.Generator, num_probes: int, chunk: int, distribution: str
    ) -> Iterator[torch.Tensor]:
        """The probes, ``chunk`` columns at a time, drawn in order: the same probes whatever
        ``chunk`` (see :func:`~curvop.linalg.probes.draw_probes`), so that a memory budget never
        changes a result."""
        for first in range(0, num_probes, chunk):
            yield self.probes(min(chunk, num_probes - first), generator, distribution)

    def check_symmetric(self, generator: torch.Generator) -> None:
        """Raise ``ValueError`` if two random vectors show more asymmetry than allowed (one
        block product of two columns; see :func:`curvop.symmetry.symmetry_gap`)."""
        gap = symmetry_gap(self.multiply, self.n, generator, dtype=self.dtype, device=self.device)
        if gap > self.symmetry_tolerance:
            raise_not_symmetric(gap, self.symmetry_tolerance)

    def counting(self, progress: bool, total: int | None, description: str):
        """A context in which a progress bar counts the column products (``progress``; ``total``
        where known, ``description`` as its label); see :mod:`curvop.progress`."""
        return counting(self.op, progress, total, description)


def open_workspace(op: Any, memory_gb: Any) -> Workspace:
    """The workspace of one call: ``op`` as a block operator and the budget: ``memory_gb``
    (checked) or the device's default (the least over the ranks of a process group)."""
    block = as_block_operator(op)
    budget = check_memory_gb(memory_gb)
    if budget is not None:
        return Workspace(block, budget, explicit=True)
    device = block.device or torch.device("cpu")
    budget = default_budget_bytes(device)
    if block.process_group is not None:  # every rank must choose the same widths
        budget = int(min_over_ranks(budget, block.process_group, device))
    return Workspace(block, budget, explicit=False)
