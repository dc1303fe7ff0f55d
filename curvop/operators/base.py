r"""Curvature operators: one pass over the data per block product, within a memory limit.

A :class:`CurvatureOperator` multiplies an ``(n, k)`` block by looping over the batches of its
objective once, running the chosen kernel on each and summing the products, weighted by the
batches' sample counts. Which kernel, and how many columns per pass, is measured once per
operator and then chosen per block (:mod:`curvop.operators.kernels`): the fastest way that keeps
the peak memory of a pass within the limit the caller gives, or by default within
:data:`DEFAULT_GRAPH_PRODUCTS` single products' worth (and a share of the free device memory).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..devices import clock
from ..distributed import agree_on_measurements, allreduce_product, check_group, min_over_ranks
from ..layout import ParamLayout
from ..memory import default_budget_bytes, peak_tensor_bytes
from ..objective import ClosureObjective, ModelObjective, OutputSelector, resolve_params
from ..progress import counting
from ..symmetry import symmetry_gap, symmetry_tolerance
from ..validation import check_positive_int, check_real, check_seed
from .block import HALF_DTYPES, BlockOperator, ProductCost
from .kernels import (
    AUTO,
    CALIBRATION_WIDTH,
    REPEAT_BELOW,
    TORCH_FUNC_KERNELS,
    Kernel,
    KernelPlan,
    Measurement,
    Selection,
)

__all__ = [
    "CurvatureOperator",
    "ModelCurvatureOperator",
    "graph_allowance",
    "model_objective",
    "resolve_reduction",
]

Objective = ModelObjective | ClosureObjective

REDUCTIONS = ("mean", "sum")
DEFAULT_GRAPH_PRODUCTS = 4  # by default a pass may hold this many single products' peak memory
DEFAULT_GRAPH_FLOOR = 64 * 2**20  # ... or this many bytes where that is more (small models)
UNMEASURED_CHUNK = 64  # columns per pass of an operator that does not measure its kernels
FOLD_BATCHES = 16  # a float32 sum is folded into float64 after this many batches
HALF_ACCURACY = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # stated, relative


def graph_allowance(single: float) -> float:
    """The peak bytes a pass may hold by default, given a single product's:
    :data:`DEFAULT_GRAPH_PRODUCTS` of them, and at least :data:`DEFAULT_GRAPH_FLOOR`."""
    return max(DEFAULT_GRAPH_PRODUCTS * single, DEFAULT_GRAPH_FLOOR)


def resolve_reduction(loss_fn: Any, reduction: str | None) -> str:
    """The reduction of the loss: ``loss_fn.reduction`` if it exists, else ``reduction``, else mean."""
    from_loss = getattr(loss_fn, "reduction", None)
    if from_loss is not None and reduction is not None and from_loss != reduction:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={from_loss!r}; give one of them"
        )
    chosen = from_loss or reduction or "mean"
    if chosen not in REDUCTIONS:
        name = "loss_fn.reduction" if from_loss else "reduction"
        raise ValueError(
            f"{name} must be one of {REDUCTIONS}, got {chosen!r}: the operators need a scalar "
            "loss per batch"
        )
    return chosen


def _has_active_dropout(module: nn.Module) -> bool:
    """Dropout modules, and attention with a dropout rate, in training mode with a positive rate."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        rate = module.p
    elif isinstance(module, nn.MultiheadAttention):
        rate = module.dropout
    else:
        return False
    return module.training and rate > 0


def warn_active_dropout(model: nn.Module) -> None:
    """Warn when ``model`` is in training mode and contains dropout with a positive rate."""
    active = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if _has_active_dropout(module)
    ]
    if active:
        warnings.warn(
            f"the model is in training mode with active dropout in {active}: the operator "
            "represents the curvature under one fixed dropout mask per batch (curvop seeds it so "
            "that products agree). Call model.eval() for the curvature of the deterministic network.",
            UserWarning,
            stacklevel=_first_frame_outside_curvop(),
        )


def _first_frame_outside_curvop() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line, not at curvop's."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("curvop."):
        frame, level = frame.f_back, level + 1
    return level


def model_objective(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    data: Any,
    params: Sequence[torch.Tensor] | None,
    output: OutputSelector,
    reduction: str | None,
) -> tuple[ModelObjective, str]:
    """The objective ``loss_fn(model(inputs), targets)`` over ``data`` and its reduction, checked;
    warns about active dropout."""
    objective = ModelObjective(model, loss_fn, data, resolve_params(model, params), output)
    warn_active_dropout(model)
    return objective, resolve_reduction(loss_fn, reduction)


class _WeightedSum:
    r"""The sum :math:`\sum_b w_b P_b` of per-batch products as ``(k, n)``.

    Each batch is added in place into the per-parameter views of ``out``, so a pass holds no
    copy of the result. ``out`` has the accumulation dtype: float32 for float32 and
    half-precision models (a half product times a batch size would overflow float16), float64
    for float64. A float32 sum is folded into a float64 one after every :data:`FOLD_BATCHES`
    batches, so its rounding is that of 16 terms whatever the number of batches. Products that
    require grad (``create_graph`` in the functional API) are summed out of place instead, so
    that the result keeps its graph.
    """

    def __init__(self, out: torch.Tensor, layout: ParamLayout):
        self.out = out
        self.views = [t.movedim(-1, 0) for t in layout.split(out.T)]
        self.wide: torch.Tensor | None = None
        self.graph: list[torch.Tensor] | None = None  # the out-of-place sums
        self.count = 0

    def add(self, products: list[torch.Tensor], weight: int) -> None:
        if self.graph is not None or any(p.requires_grad for p in products):
            self.graph = [
                weight * p if self.graph is None else s + weight * p
                for s, p in zip(self.graph or products, products, strict=True)
            ]
            return
        for view, product in zip(self.views, products, strict=True):
            view.add_(product.to(view.dtype), alpha=weight)
        self.count += 1
        if self.count % FOLD_BATCHES == 0 and self.out.dtype != torch.float64:
            self.wide = self.out.double() if self.wide is None else self.wide.add_(self.out)
            self.out.zero_()

    def total(self) -> torch.Tensor:
        """The sum: ``out``, its float64 fold, or a new tensor that keeps the products' graph."""
        if self.graph is not None:
            k = self.out.shape[0]
            return torch.cat([g.reshape(k, -1) for g in self.graph], dim=1)
        if self.wide is None:
            return self.out
        return self.wide.add_(self.out)


class CurvatureOperator(BlockOperator):
    r"""A symmetric ``n x n`` curvature matrix of a PyTorch loss, as a SciPy ``LinearOperator``.

    The base of :class:`HessianOperator`, :class:`GaussNewtonOperator` and
    :class:`FiniteDifferenceHessianOperator`, which document their parameters and build it from
    a model; it is also what their ``from_function`` classmethods return for a closure. Each
    product loops over the data once, multiplies every batch with the chosen kernel, weights the
    batches by their sample counts and, with a ``process_group``, sums the ranks' partial
    products with one all-reduce (:mod:`curvop.distributed`).

    Parameters
    ----------
    objective
        The loss per batch (:class:`~curvop.objective.ModelObjective` or
        :class:`~curvop.objective.ClosureObjective`).
    kernels
        Name -> kernel ``(objective, batch, columns) -> products``, the reference first.
    kernel
        ``"auto"`` or the name of one of ``kernels`` to use always.
    reduction
        ``"mean"`` (sample-weighted average over batches) or ``"sum"``.
    process_group
        The ``torch.distributed`` group the data is sharded over, or ``None``.
    accuracy
        The stated relative accuracy of a product (0 for exact operators).
    measured
        Whether to measure the kernels (time and memory) and choose per block; ``False`` runs
        the reference kernel on at most :data:`UNMEASURED_CHUNK` columns per pass (for single
        products, as in the functional API, where measuring would cost more than it saves).
    name
        What the operator is, for its ``repr`` (default: the class name).

    Attributes
    ----------
    layout : ParamLayout
        The flatten/unflatten adapter of the parameters.
    reduction : str
    accuracy : float
    max_block_columns : int or None
        Columns per pass at most, on top of the memory limit (``None``: no cap). Settable.
    process_group
    """

    max_block_columns: int | None = None

    def __init__(
        self,
        objective: Objective,
        kernels: dict[str, Kernel],
        *,
        kernel: str = AUTO,
        reduction: str = "mean",
        process_group: Any = None,
        accuracy: float = 0.0,
        measured: bool = True,
        name: str | None = None,
    ):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self._objective, self.reduction = objective, reduction
        self._plan = KernelPlan(kernels, kernel)
        self._measured, self._name = measured, name or type(self).__name__
        self._default_limit: float | None = None
        self.process_group = check_group(process_group)
        self.layout = ParamLayout(objective.params)
        param_dtype = self.layout.dtype
        half = param_dtype in HALF_DTYPES
        self.accuracy = max(accuracy, HALF_ACCURACY[param_dtype] if half else 0.0)
        work_dtype = torch.float32 if half else param_dtype
        super().__init__(self.layout.size, work_dtype, self.layout.device)

    def __repr__(self) -> str:
        n = self.shape[0]
        dtype = str(self.layout.dtype).removeprefix("torch.")
        return f"<{self._name} {n}x{n}, dtype={dtype}, reduction={self.reduction!r}>"

    @property
    def kernel_selections(self) -> dict[int, Selection]:
        """Per block width multiplied so far: the kernel and columns per pass chosen, with the
        predicted seconds and peak bytes (see :mod:`curvop.operators.kernels`)."""
        return dict(self._plan.selections)

    @property
    def kernel_measurements(self) -> dict[str, dict[int, Any]]:
        """What was measured per candidate kernel and width on the first batch (seconds and peak
        bytes), and ``{"failures": ...}``: the candidates that could not run, with the reason."""
        measured = {name: dict(widths) for name, widths in self._plan.measurements.items()}
        return {**measured, "failures": dict(self._plan.failures)}

    # ------------------------------------------------------------------ choosing
    def product_cost(self, k: int, memory_bytes: int | None = None) -> ProductCost | None:
        """Predicted seconds (first batch) and peak bytes of one pass of a ``k``-column block
        product within ``memory_bytes`` (measuring the kernels first if need be)."""
        if not self._measured:
            return None
        selection = self._select(k, memory_bytes)
        return ProductCost(selection.seconds, selection.bytes)

    def _select(self, k: int, memory_bytes: int | None) -> Selection:
        if not self._measured:
            chunk = min(k, self.max_block_columns or UNMEASURED_CHUNK)
            return Selection(self._plan.reference, chunk, math.nan, 0)
        widths = (1,) if k == 1 else (1, min(CALIBRATION_WIDTH, self.shape[0]))
        self._measure(widths)
        return self._plan.select(k, self._memory_limit(memory_bytes), self.max_block_columns)

    def _memory_limit(self, memory_bytes: int | None) -> float:
        """The peak bytes a pass may add: ``memory_bytes`` if given, else the smaller of
        :data:`DEFAULT_GRAPH_PRODUCTS` single products (the leanest kernel's; at least
        :data:`DEFAULT_GRAPH_FLOOR`) and the device's default budget
        (:func:`curvop.memory.default_budget_bytes`), decided at the first product (the least
        over the ranks of a process group) and kept."""
        if memory_bytes is not None:
            return memory_bytes
        if self._default_limit is None:
            self._measure((1,))
            single = min(self._plan.measurements[name][1].bytes for name in self._plan.names(1))
            limit = min(graph_allowance(single), default_budget_bytes(self.layout.device))
            if self.process_group is not None:
                limit = min_over_ranks(limit, self.process_group, self.layout.device)
            self._default_limit = limit
        return self._default_limit

    def _measure(self, widths: Sequence[int]) -> None:
        """Run every candidate still unmeasured at ``widths`` on the first batch, with random
        columns from a private generator: its seconds and the peak bytes it added (see
        :meth:`_time`). With a process group the ranks agree on the figures (the mean of
        the seconds, the largest bytes, a failure anywhere), so they choose alike."""
        missing = self._plan.missing(widths)
        if not missing:
            return
        batch = next(iter(self._objective.batches()))
        generator = torch.Generator(device=self.layout.device).manual_seed(0)
        reference = self._plan.reference
        results: dict[tuple[str, int], Measurement | BaseException] = {}
        for name, width in missing:
            block = torch.randn(
                self.shape[0], width, generator=generator, dtype=self.layout.dtype,
                device=self.layout.device,
            )  # fmt: skip
            columns = [t.movedim(-1, 0) for t in self.layout.split(block)]
            careful = width == 1 or name in TORCH_FUNC_KERNELS
            try:
                results[name, width] = self._time(
                    self._plan.candidates[name], batch, columns, careful
                )
            except Exception as error:  # the reference's: the user's model or loss raised
                results[name, width] = error
                if name == reference and self.process_group is None:
                    raise
        if self.process_group is not None:
            results = agree_on_measurements(
                results, reference, self.process_group, self.layout.device
            )
        for (name, width), result in results.items():
            if isinstance(result, BaseException):
                self._plan.fail(name, result)
            else:
                self._plan.record(name, width, result)

    def _time(self, kernel: Kernel, batch: Any, columns: list[torch.Tensor], careful: bool):
        """Seconds and peak bytes of ``kernel`` on ``batch``: the faster of a run under
        :func:`curvop.memory.peak_tensor_bytes` (which also gives the peak) and a plain run
        after it (the first run of a kernel at a width pays one-time costs: lazy initialization,
        ``torch.func``'s decompositions, the tracker's own), and of a third where they took
        under :data:`REPEAT_BELOW` seconds (noise-sized). A ``careful`` measurement (a
        candidate's first, and every one of a ``torch.func`` kernel) first runs plainly: an
        exception inside a ``torch.func`` transform under a dispatch mode can crash the
        process, while a plain run raises it, and the candidate is dropped.
        """
        device = self.layout.device

        def run() -> float:
            start = clock(device)
            with torch.inference_mode(False), torch.enable_grad():
                kernel(self._objective, batch, columns)
            return clock(device) - start

        try:
            first = run() if careful else math.inf
            tracked, peak = peak_tensor_bytes(run)
        except torch.OutOfMemoryError:
            if columns[0].shape[0] == 1:
                raise
            return Measurement(math.inf, math.inf)  # this width does not fit: one at a time
        seconds = min(first, tracked, run())
        if seconds < REPEAT_BELOW:
            seconds = min(seconds, run())
        return Measurement(seconds, peak)

    # ------------------------------------------------------------------ products
    def _block_product(self, V: torch.Tensor, memory_bytes: int | None) -> torch.Tensor:
        k = V.shape[1]
        selection = self._plan.selections[k] = self._select(k, memory_bytes)
        accumulate = torch.float64 if self.torch_dtype == torch.float64 else torch.float32
        out = torch.zeros(k, self.shape[0], dtype=accumulate, device=V.device)
        for first in range(0, k, selection.chunk):
            rows = out[first : first + selection.chunk]
            result = self._one_pass(V[:, first : first + selection.chunk], selection.kernel, rows)
            if result is not rows:  # a float64 fold, an all-reduce buffer, or a graph
                rows.copy_(result)
        return out.to(self.torch_dtype).T

    def _one_pass(self, block: torch.Tensor, kernel: str, rows: torch.Tensor) -> torch.Tensor:
        """The product of ``block`` (``(n, k)``) in one pass over the data, as ``(k, n)``: in
        ``rows``, or a new tensor where the sum is float64 or keeps a graph."""
        self._observed(block.shape[1])
        total, samples, failure = self._partial_product(block, kernel, rows)
        if self.process_group is not None:
            total, samples = allreduce_product(
                total, samples, failure, tuple(rows.shape), rows.device, self.process_group
            )
        elif failure is not None:
            raise failure
        if self.reduction == "mean":
            total = total / samples if total.requires_grad else total.div_(samples)
        return total

    def _partial_product(
        self, block: torch.Tensor, kernel: str, rows: torch.Tensor
    ) -> tuple[torch.Tensor | None, int, BaseException | None]:
        """This process's weighted sum of batch products (``rows``, or a float64 sum once
        folded), its sample count, and the exception it hit (caught, so that other ranks learn
        of it; raised by the caller)."""
        columns = [t.movedim(-1, 0) for t in self.layout.split(block.to(self.layout.dtype))]
        total, samples = _WeightedSum(rows, self.layout), 0
        multiply = self._plan.candidates[kernel]
        try:
            for batch in self._objective.batches():
                with torch.inference_mode(False), torch.enable_grad():
                    products = multiply(self._objective, batch, columns)
                total.add(products, batch.num_samples if self.reduction == "mean" else 1)
                samples += batch.num_samples
            result = total.total()
            if not bool(torch.isfinite(result.sum())):  # one reduction; the culprit on failure
                self._raise_not_finite(block, multiply, columns)
        except Exception as error:
            return None, samples, error
        return result, samples, None

    def _raise_not_finite(
        self, block: torch.Tensor, multiply: Kernel, columns: list[torch.Tensor]
    ) -> None:
        """Blame ``V`` itself, or find the first batch whose product holds NaN or Inf (another
        pass over the data, on this error path only)."""
        if not bool(torch.isfinite(block).all()):
            raise ValueError("V must be finite, got a vector that contains NaN or Inf")
        for batch in self._objective.batches():
            with torch.inference_mode(False), torch.enable_grad():
                products = multiply(self._objective, batch, columns)
            if not all(bool(torch.isfinite(p).all()) for p in products):
                raise FloatingPointError(
                    f"the product is not finite: batch {batch.index} gave NaN or Inf (check the "
                    "inputs and targets of that batch, the loss and the parameters for NaN/Inf "
                    "or overflow)"
                )
        raise FloatingPointError(
            "the product is not finite: every batch's product is, but their weighted sum "
            f"overflowed {self.torch_dtype}"
        )

    def to_dense(self, max_size: int = 4096, *, progress: bool = False) -> np.ndarray:
        """The ``(n, n)`` matrix as numpy, from block products with the identity (as many
        columns at a time as the memory limit allows, one pass over the data each;
        ``progress=True`` shows a bar, see :mod:`curvop.progress`).

        Raises ``ValueError`` when ``n > max_size`` (the matrix takes ``n**2`` entries of memory);
        pass a larger ``max_size`` to allow it.
        """
        n = self.shape[0]
        if check_positive_int(max_size, "max_size") < n:
            raise ValueError(
                f"to_dense: the operator has n={n} > max_size={max_size}, the dense matrix would "
                f"hold {n * n:,} entries; pass max_size={n} or more to build it anyway"
            )
        eye = torch.eye(n, dtype=self.torch_dtype, device=self.device)
        with counting(self, progress, n, "to_dense"):
            return self.block_product(eye).cpu().numpy()

    def check_deterministic(self, *, rtol: float | None = None, seed: int = 0) -> float:
        """Check that two products with the same random vector agree; return their relative gap.

        Parameters
        ----------
        rtol
            Allowed relative difference; default ``1000 * eps`` of the dtype (about ``1e-4`` in
            float32, ``2e-13`` in float64), room for non-deterministic GPU reductions.
        seed
            Seed of the random vector (drawn from a private generator).

        Raises
        ------
        RuntimeError
            If the two products differ by more than ``rtol``.
        """
        eps = torch.finfo(self.layout.dtype).eps
        rtol = 1000 * eps if rtol is None else check_real(rtol, "rtol", positive=True)
        generator = torch.Generator(device=self.device).manual_seed(check_seed(seed) or 0)
        v = torch.randn(
            self.shape[0], generator=generator, dtype=self.torch_dtype, device=self.device
        )
        first, second = self.apply(v), self.apply(v)
        gap = float((first - second).norm() / first.norm().clamp_min(torch.finfo(first.dtype).tiny))
        if gap > rtol:
            raise RuntimeError(
                f"two products with the same vector differ by {gap:.3g} (relative) > rtol={rtol:.3g}: "
                "the operator is not deterministic. Likely causes: random data augmentation or a "
                "shuffling data loader, a model that draws random numbers outside nn.Dropout, "
                "non-deterministic GPU kernels (torch.use_deterministic_algorithms(True)), or a "
                "loss that depends on global state."
            )
        return gap

    def check_symmetric(self, *, rtol: float | None = None, seed: int = 0) -> float:
        r"""Check that :math:`w^\top A v = v^\top A w` for two random vectors; return the gap.

        The gap is :math:`|w^\top A v - v^\top A w| / \max(\|Av\|\|w\|, \|Aw\|\|v\|)`,
        from one block product of two columns. Eigensolvers, CG and MINRES assume a symmetric
        operator; run this on an operator you have reason to doubt (finite differences on a
        network with kinks, your own kernel) before a long computation.

        Parameters
        ----------
        rtol
            Allowed gap; default :math:`\max(\sqrt{\varepsilon}, 10 \cdot` ``accuracy``:math:`)`
            (``3.5e-4`` for exact float32 operators, ``1.5e-8`` for float64, ``1e-4`` for the
            float64 finite-difference Hessian).
        seed
            Seed of the two random vectors (drawn from a private generator).

        Raises
        ------
        RuntimeError
            If the gap exceeds ``rtol``.
        """
        if rtol is None:
            rtol = symmetry_tolerance(self.torch_dtype, self.accuracy)
        else:
            rtol = check_real(rtol, "rtol", positive=True)
        generator = torch.Generator().manual_seed(check_seed(seed) or 0)
        like = {"dtype": self.torch_dtype, "device": self.device}
        gap = symmetry_gap(self.block_product, self.shape[0], generator, **like)
        if gap > rtol:
            raise RuntimeError(
                f"the operator is not symmetric: w.(Av) and v.(Aw) differ by {gap:.3g} (relative) "
                f"> rtol={rtol:.3g}, so eigensolvers, CG and MINRES would return garbage or never "
                "converge. A finite-difference Hessian of a model with kinks (ReLU, max-pooling) "
                "is the usual cause: use HessianOperator. Otherwise check a custom kernel or loss."
            )
        return gap


class ModelCurvatureOperator(CurvatureOperator):
    """A curvature of ``loss_fn(model(inputs), targets)`` over ``data``, whose class names its
    kernels (``kernels``); the parameters are documented by :class:`HessianOperator`."""

    kernels: dict[str, Kernel]

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        data: Any,
        params: Sequence[torch.Tensor] | None = None,
        *,
        reduction: str | None = None,
        output: OutputSelector = None,
        kernel: str = AUTO,
        process_group: Any = None,
    ):
        """Build the operator: no product and no pass over the data yet (the parameters are
        described in the class docstring)."""
        objective, reduction = model_objective(model, loss_fn, data, params, output, reduction)
        super().__init__(
            objective, self.kernels, kernel=kernel, reduction=reduction, process_group=process_group
        )
