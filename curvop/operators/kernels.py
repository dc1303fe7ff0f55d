r"""Choosing, from one measurement per operator, how a curvature multiplies a block of columns.

Each curvature has several exact kernels that compute the same product at different costs in
time and memory: reverse-over-reverse with the second backward pass batched over the columns
(``vmap``: fast where the backward pass is many small operations, but its transient buffers grow
with the columns) or looped over one retained graph (flat memory), forward-over-reverse with
``torch.func``. Which is best depends on the model, the device and the number of columns.

:class:`KernelPlan` measures every candidate once per operator, on the first batch, with one
column and with :data:`CALIBRATION_WIDTH` columns: its wall time and the peak bytes it adds
(:func:`curvop.memory.peak_tensor_bytes`). Through each pair of points it fits a line,

.. math:: \text{cost}(k) = \text{shared} + k \cdot \text{per column},

and from then on it chooses, for any block of ``k`` columns and memory limit, without timing
again: the kernel and the chunk width (columns per pass over the data) that multiply the block in
the least predicted time within the limit. The reference kernel (the first candidate) is kept
unless another is predicted faster by more than :data:`SWITCH_MARGIN`, so that timing noise does
not flip the choice between equally fast kernels. The choice is a deterministic function of the
measurements: the same for every product of the operator, reported in ``selections``, and
overridden by forcing a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import Batch

__all__ = [
    "AUTO",
    "CALIBRATION_WIDTH",
    "Kernel",
    "KernelPlan",
    "Line",
    "Measurement",
    "Selection",
    "TORCH_FUNC_KERNELS",
]

AUTO = "auto"
Kernel = Callable[[Any, Batch, Sequence[torch.Tensor]], list[torch.Tensor]]
CALIBRATION_WIDTH = 4  # the block width measured besides one column
BLOCK_ONLY = frozenset({"looped"})  # candidates that equal the reference at one column
TORCH_FUNC_KERNELS = frozenset({"forward"})  # candidates that run torch.func transforms
SWITCH_MARGIN = 0.9  # another kernel replaces the reference where it takes at most this share
PASS_TIE = 0.02  # chunk widths within this share of the fastest count as equal: the widest wins
REPEAT_BELOW = 0.25  # seconds: a measurement this cheap is repeated, the faster run kept


@dataclass(frozen=True)
class Line:
    """``shared + per_column * k``: a cost in the number of columns ``k``."""

    shared: float
    per_column: float

    def at(self, k: int) -> float:
        return self.shared + self.per_column * k

    @classmethod
    def through(cls, one: float, width: int, wide: float) -> Line:
        """The line through ``(1, one)`` and ``(width, wide)``; never falling, never below 0."""
        if width == 1:
            return cls(0.0, one)
        per_column = max(0.0, (wide - one) / (width - 1))
        return cls(max(0.0, one - per_column), per_column)


@dataclass(frozen=True)
class Measurement:
    """One candidate's run on the first batch: its seconds and the peak bytes it added."""

    seconds: float
    bytes: int


@dataclass(frozen=True)
class Selection:
    """How a block of ``k`` columns is multiplied.

    Attributes
    ----------
    kernel : str
        The candidate used.
    chunk : int
        Columns per pass over the data (``k`` in one pass, or fewer where memory is short).
    seconds : float
        Predicted seconds of the whole block on the first batch.
    bytes : int
        Predicted peak bytes of one pass on one batch (the autograd graph and the batch's
        products).
    """

    kernel: str
    chunk: int
    seconds: float
    bytes: int


@dataclass
class KernelPlan:
    """The candidate kernels of one operator, what was measured of them, and the choice.

    Parameters
    ----------
    candidates
        Name -> kernel ``(objective, batch, columns) -> products``. The first is the reference:
        its exceptions (the user's model or loss raising) propagate; the others' are recorded in
        ``failures`` and the candidate is dropped.
    kernel
        ``"auto"`` (measure and choose), or the name of the one candidate to use.
    """

    candidates: dict[str, Kernel]
    kernel: str = AUTO
    measurements: dict[str, dict[int, Measurement]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    selections: dict[int, Selection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = (AUTO, *self.candidates)
        if not isinstance(self.kernel, str) or self.kernel not in choices:
            raise ValueError(f"kernel must be one of {choices}, got {self.kernel!r}")

    @property
    def reference(self) -> str:
        return self.kernel if self.kernel != AUTO else next(iter(self.candidates))

    def names(self, k: int) -> list[str]:
        """The candidates that compete for a block of ``k`` columns."""
        if self.kernel != AUTO:
            return [self.kernel]
        return [
            name
            for name in self.candidates
            if name not in self.failures and (k > 1 or name not in BLOCK_ONLY)
        ]

    def missing(self, widths: Sequence[int]) -> list[tuple[str, int]]:
        """``(candidate, width)`` pairs still to be measured for a choice between ``widths``."""
        return [
            (name, width)
            for width in widths
            for name in self.names(width)
            if width not in self.measurements.get(name, {})
        ]

    def record(self, name: str, width: int, measurement: Measurement) -> None:
        """Keep a measurement (a candidate that only differs at several columns also gets the
        reference's one-column figures)."""
        self.measurements.setdefault(name, {})[width] = measurement
        if width == 1 and name == next(iter(self.candidates)):
            for other in BLOCK_ONLY & set(self.candidates):
                self.measurements.setdefault(other, {})[1] = measurement

    def fail(self, name: str, error: BaseException) -> None:
        self.failures[name] = f"{type(error).__name__}: {error}"

    def costs(self, name: str) -> tuple[Line, Line]:
        """Seconds and bytes of ``name`` as lines in the number of columns."""
        measured = {w: m for w, m in self.measurements[name].items() if math.isfinite(m.bytes)}
        one = measured[1]
        wide_width = max(measured)
        wide = measured[wide_width]
        return (
            Line.through(one.seconds, wide_width, wide.seconds),
            Line.through(one.bytes, wide_width, wide.bytes),
        )

    def select(self, k: int, limit: float | None, max_chunk: int | None = None) -> Selection:
        """The fastest predicted way to multiply ``k`` columns with at most ``limit`` bytes per
        pass (``None``: no limit) and ``max_chunk`` columns per pass; one column per pass with
        the leanest kernel where nothing fits. Among chunk widths within :data:`PASS_TIE` of a
        kernel's fastest, the widest (fewest passes over the data: each costs more than the
        first batch's kernel, which is all that is timed). Needs the measurements of
        :meth:`missing` for ``(1, CALIBRATION_WIDTH)`` (``(1,)`` for ``k = 1``). A candidate
        whose block run did not fit in memory (an infinite measurement) runs one column per
        pass."""
        best: dict[str, Selection] = {}
        widest = min(k, max_chunk or k)
        for name in self.names(k):
            seconds, memory = self.costs(name)
            blocks = all(math.isfinite(m.bytes) for m in self.measurements[name].values())
            options = []
            for chunk in range(1, widest + 1 if blocks else 2):
                peak = memory.at(chunk)
                if chunk > 1 and limit is not None and peak > limit:
                    break
                options.append(
                    Selection(name, chunk, math.ceil(k / chunk) * seconds.at(chunk), int(peak))
                )
            fastest = min(option.seconds for option in options)
            best[name] = max(
                (o for o in options if o.seconds <= (1 + PASS_TIE) * fastest), key=lambda o: o.chunk
            )
        fitting = {n: s for n, s in best.items() if limit is None or s.bytes <= limit}
        if not fitting:  # even one column exceeds the limit: run the leanest one at a time
            return min(best.values(), key=lambda s: s.bytes)
        fastest = min(fitting.values(), key=lambda s: s.seconds)
        reference = fitting.get(self.reference)
        if reference is not None and fastest.seconds > SWITCH_MARGIN * reference.seconds:
            return reference
        return fastest
