"""Choosing, by measurement, how a curvature multiplies a block of columns.

Each curvature has several exact kernels that compute the same product at different costs:
reverse-over-reverse with the second backward pass batched over the columns (``vmap``) or looped
over one retained graph, forward-over-reverse with ``torch.func``. Which is fastest depends on the
model (small layers favour batching; operations without a batching rule favour the loop) and on
the number of columns, so :class:`KernelChoice` times every candidate once, on the first batch of
the first product of each block width, and keeps the fastest. Its product is the one used for
that batch: the timing runs are part of the first product, not an extra pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import Batch
from ..devices import clock

__all__ = ["AUTO", "Kernel", "KernelChoice", "Selection"]

AUTO = "auto"
Kernel = Callable[[Any, Batch, Sequence[torch.Tensor]], list[torch.Tensor]]
BLOCK_ONLY = frozenset({"looped"})  # candidates that differ from the others only for k > 1
REPEAT_BELOW = 0.25  # seconds: a selection whose candidates all ran faster times them twice


@dataclass
class Selection:
    """What was measured for one block width.

    Attributes
    ----------
    kernel : str
        The candidate in use (the fastest, or the one forced).
    seconds : dict
        Seconds of each candidate that ran (its fastest run), on the first batch of the first
        product.
    failures : dict
        Candidates that could not run, with the reason (e.g. ``torch.func`` cannot trace the
        model, or an operation has no forward-mode rule).
    runs : dict
        How many times each candidate ran.
    """

    kernel: str
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)


class KernelChoice:
    """The candidate kernels of one operator, and the one in use per block width.

    Parameters
    ----------
    candidates
        Name -> kernel ``(objective, batch, columns) -> products``. The first is the reference:
        it always runs during a selection, and its exceptions (the user's model or loss raising)
        propagate unchanged; the others' are recorded and the candidate is skipped.
    kernel
        ``"auto"`` (measure and choose), or the name of one candidate to use always.
    """

    def __init__(self, candidates: dict[str, Kernel], kernel: str = AUTO):
        choices = (AUTO, *candidates)
        if not isinstance(kernel, str) or kernel not in choices:
            raise ValueError(f"kernel must be one of {choices}, got {kernel!r}")
        self.candidates, self.kernel = candidates, kernel
        self.selections: dict[int, Selection] = {}

    def __call__(self, objective: Any, batch: Batch, columns: Sequence[torch.Tensor]):
        k = columns[0].shape[0]
        selection = self.selections.get(k)
        if selection is not None:
            return self.candidates[selection.kernel](objective, batch, columns)
        return self._select(k, objective, batch, columns)

    def column_seconds(self, k: int) -> float | None:
        """Measured seconds per column of a ``k``-column block on the first batch (``None``
        before the first product of that width)."""
        selection = self.selections.get(k)
        return None if selection is None else selection.seconds[selection.kernel] / k

    def _names(self, k: int) -> list[str]:
        if self.kernel != AUTO:
            return [self.kernel]
        return [name for name in self.candidates if k > 1 or name not in BLOCK_ONLY]

    def _select(self, k: int, objective: Any, batch: Batch, columns: Sequence[torch.Tensor]):
        """Time the candidates on ``batch`` and keep the fastest; return its product.

        The first run of all pays one-time costs (allocations, ``torch.func``'s decompositions),
        and one run of a cheap batch is at the mercy of the machine's noise, so a second round
        times every candidate again when the slowest took under ``REPEAT_BELOW`` seconds (the
        first candidate alone otherwise); each keeps its fastest run.
        """
        device = columns[0].device
        names = self._names(k)
        selection = Selection(names[0])
        best, best_seconds = None, math.inf
        for round_names in (names, None):
            if round_names is None:  # the second round
                if len(names) == 1:
                    break
                cheap = max(selection.seconds.values()) < REPEAT_BELOW
                round_names = [n for n in names if n in selection.seconds] if cheap else names[:1]
            for index, name in enumerate(round_names):
                start = clock(device)
                try:
                    products = self.candidates[name](objective, batch, columns)
                except Exception as error:
                    if index == 0 and name == names[0]:  # the reference: the user's code raised
                        raise
                    selection.failures[name] = f"{type(error).__name__}: {error}"
                    continue
                elapsed = clock(device) - start
                selection.seconds[name] = min(selection.seconds.get(name, math.inf), elapsed)
                selection.runs[name] = selection.runs.get(name, 0) + 1
                if elapsed < best_seconds:  # the fastest run so far: keep its product
                    best, best_seconds, selection.kernel = products, elapsed, name
                del products
        self.selections[k] = selection
        return best
