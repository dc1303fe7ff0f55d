"""The SciPy face of every curvature operator: the only place that crosses numpy <-> torch."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from ..distributed import allreduce_product, check_group
from ..layout import ParamLayout
from ..objective import ClosureObjective, ModelObjective, OutputSelector, resolve_params
from ..progress import bar
from ..symmetry import symmetry_gap, symmetry_tolerance
from ..validation import check_positive_int, check_real, check_seed
from .kernels import AUTO, Kernel, KernelChoice, Selection

__all__ = ["CurvatureOperator", "resolve_reduction"]

Objective = ModelObjective | ClosureObjective

REDUCTIONS = ("mean", "sum")


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


class _BatchSum:
    r"""The weighted sum :math:`\sum_b w_b P_b` of per-batch products, per parameter.

    Products are summed in their own dtype over at most ``CHUNK`` batches, then folded into
    float64: about 16x fewer mixed-precision passes (slow ones: a float32 -> float64 add is several
    times slower than a float32 add on a CPU) than summing every batch in float64, with the
    rounding of a float32 sum bounded by that of ``CHUNK`` terms whatever the number of batches.
    The first batch's products are adopted, not copied; a product that requires grad
    (``create_graph`` in the functional API) is summed out of place.
    """

    CHUNK = 16

    def __init__(self) -> None:
        self.chunk: list[torch.Tensor] | None = None
        self.wide: list[torch.Tensor] | None = None
        self.count = 0

    def add(self, products: list[torch.Tensor], weight: int) -> None:
        if self.chunk is None:
            self.chunk = [p * weight if p.requires_grad else p.mul_(weight) for p in products]
        else:
            self.chunk = [
                c + weight * p if p.requires_grad else c.add_(p, alpha=weight)
                for c, p in zip(self.chunk, products, strict=True)
            ]
        self.count += 1
        if self.count == self.CHUNK and self.chunk[0].dtype != torch.float64:
            self._fold()

    def _fold(self) -> None:
        wide = [c.to(torch.float64) for c in self.chunk]
        self.wide = (
            wide if self.wide is None else [a.add_(b) for a, b in zip(self.wide, wide, strict=True)]
        )
        self.chunk, self.count = None, 0

    def total(self, k: int) -> torch.Tensor:
        """The sum as one ``(k, n)`` tensor (float64 if anything was folded)."""
        if self.wide is not None and self.chunk is not None:
            self._fold()
        parts = self.wide if self.wide is not None else self.chunk
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1)


class CurvatureOperator(LinearOperator):
    r"""A symmetric ``n x n`` curvature matrix of a PyTorch loss as a SciPy ``LinearOperator``.

    The base of :class:`HessianOperator`, :class:`GaussNewtonOperator` and
    :class:`FiniteDifferenceHessianOperator`, which document their parameters. Each product
    loops over the data once, multiplies every batch with the operator's kernel, weights the
    batches by their sample counts and converts between numpy and torch; with a
    ``process_group``, the ranks' partial products are summed by one all-reduce
    (:mod:`curvop.distributed`).

    Attributes
    ----------
    layout : ParamLayout
        The flatten/unflatten adapter of the parameters.
    reduction : str
        ``"mean"`` (sample-weighted average over batches) or ``"sum"``.
    accuracy : float
        The stated relative accuracy of a product: 0 for exact operators (rounding only).
    max_block_columns : int
        Products of more columns run this many at a time, one pass over the data each (64; a
        batched backward pass holds a copy of the activations per column). Settable per operator.
    process_group
        The ``torch.distributed`` group the data is sharded over, or ``None``.
    """

    kernels: dict[str, Kernel]  # the candidate kernels, the reference first; set by subclasses
    accuracy: float = 0.0
    max_block_columns: int = 64

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
        objective = ModelObjective(model, loss_fn, data, resolve_params(model, params), output)
        warn_active_dropout(model)
        reduction = resolve_reduction(loss_fn, reduction)
        choice = KernelChoice(self.kernels, kernel)
        self._setup(objective, choice, reduction, check_group(process_group))

    def _setup(
        self, objective: Objective, kernel: KernelChoice, reduction: str, process_group: Any = None
    ) -> None:
        self._objective, self._kernel, self.reduction = objective, kernel, reduction
        self.process_group = process_group
        self.product_observers: list = []  # see curvop.counting
        self.layout = ParamLayout(objective.params)
        dtype = torch.empty((), dtype=self.layout.dtype).numpy().dtype
        super().__init__(dtype=dtype, shape=(self.layout.size, self.layout.size))

    @classmethod
    def _from_parts(
        cls, objective: Objective, kernel: KernelChoice | Kernel, reduction: str = "mean"
    ):
        """An operator of ``cls`` around any objective and kernel (closures, the functional API)."""
        operator = cls.__new__(cls)
        if not isinstance(kernel, KernelChoice):
            kernel = KernelChoice({"given": kernel}, "given")
        operator._setup(objective, kernel, reduction)
        return operator

    def __repr__(self) -> str:
        n = self.shape[0]
        return f"<{type(self).__name__} {n}x{n}, dtype={self.dtype}, reduction={self.reduction!r}>"

    @property
    def kernel_selections(self) -> dict[int, Selection]:
        """Per block width: the kernel in use and the seconds each candidate took on the first
        batch of the first product of that width (see :mod:`curvop.operators.kernels`)."""
        return dict(self._kernel.selections)

    def column_seconds(self, k: int) -> float | None:
        """Measured seconds per column of a ``k``-column product on the first batch, or ``None``
        before the first product of that width. The spectral toolkit reads it to choose block
        widths."""
        return self._kernel.column_seconds(k)

    # ------------------------------------------------------------------ torch interface
    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply a torch ``(n,)`` or ``(n, k)`` tensor, on the parameters' device and dtype.

        All ``k`` columns (up to ``max_block_columns``) are multiplied in a single pass over the
        data. Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` blocks: the kernels
        differentiate with autograd enabled locally. With a ``process_group``, one all-reduce
        completes the product; the host reads two scalars per product (the finiteness check and
        the ranks' failure flag), the product itself stays on the device.
        """
        V = self.layout.check_vector(V, "V")
        block = V if V.dim() == 2 else V.unsqueeze(1)
        result = self.block_product(block).contiguous()
        return result if V.dim() == 2 else result.squeeze(1)

    def block_product(self, block: torch.Tensor) -> torch.Tensor:
        """``A V`` for an ``(n, k)`` block already of the operator's dtype and device.

        The result is the transpose of a contiguous ``(k, n)`` tensor, the layout the products
        are summed in: the spectral toolkit keeps its vectors as rows and reads it without a
        copy (:meth:`apply` makes it contiguous). ``block`` may be such a transpose too.
        """
        if block.shape[1] == 0:
            return torch.zeros_like(block)
        if block.shape[1] > self.max_block_columns:  # bounds what a batched backward holds
            parts = torch.split(block, self.max_block_columns, dim=1)
            return torch.cat([self.block_product(part).T for part in parts]).T
        k = block.shape[1]
        for observe in self.product_observers:
            observe(k)
        partial, samples, failure = self._partial_product(block)
        if self.process_group is not None:
            partial, samples = allreduce_product(
                partial, samples, failure, (k, self.layout.size), block.device, self.process_group
            )
        elif failure is not None:
            raise failure
        if self.reduction == "mean":
            partial = partial / samples
        return partial.to(self.layout.dtype).T

    def _partial_product(
        self, block: torch.Tensor
    ) -> tuple[torch.Tensor | None, int, BaseException | None]:
        """This process's sum of weighted batch products as ``(k, n)``, its sample count, and
        the exception it hit (caught, so that other ranks learn of it; raised by the caller)."""
        columns = [t.movedim(-1, 0) for t in self.layout.split(block)]
        total, samples = _BatchSum(), 0
        try:
            for batch in self._objective.batches():
                with torch.inference_mode(False), torch.enable_grad():
                    products = self._kernel(self._objective, batch, columns)
                total.add(products, batch.num_samples if self.reduction == "mean" else 1)
                samples += batch.num_samples
            partial = total.total(block.shape[1])
            if not bool(torch.isfinite(partial.sum())):  # one reduction; the culprit on failure
                self._raise_not_finite(block, columns)
        except Exception as error:
            return None, samples, error
        return partial, samples, None

    def _raise_not_finite(self, block: torch.Tensor, columns: list[torch.Tensor]) -> None:
        """Blame ``V`` itself, or find the first batch whose product holds NaN or Inf (another
        pass over the data, on this error path only). Returns if none does: the sum overflowed."""
        if not bool(torch.isfinite(block).all()):
            raise ValueError("V must be finite, got a vector that contains NaN or Inf")
        for batch in self._objective.batches():
            with torch.inference_mode(False), torch.enable_grad():
                products = self._kernel(self._objective, batch, columns)
            if not all(bool(torch.isfinite(p).all()) for p in products):
                raise FloatingPointError(
                    f"the product is not finite: batch {batch.index} gave NaN or Inf (check the "
                    "inputs and targets of that batch, the loss and the parameters for NaN/Inf "
                    "or overflow)"
                )

    def to_dense(self, max_size: int = 4096, *, progress: bool = False) -> np.ndarray:
        """The ``(n, n)`` matrix as numpy, from block products with the identity (columns
        ``max_block_columns`` at a time; ``progress=True`` shows a bar, see :mod:`curvop.progress`).

        Raises ``ValueError`` when ``n > max_size`` (the matrix takes ``n**2`` entries of memory);
        pass a larger ``max_size`` to allow it.
        """
        n = self.shape[0]
        if check_positive_int(max_size, "max_size") < n:
            raise ValueError(
                f"to_dense: the operator has n={n} > max_size={max_size}, the dense matrix would "
                f"hold {n * n:,} entries; pass max_size={n} or more to build it anyway"
            )
        eye = torch.eye(n, dtype=self.layout.dtype, device=self.layout.device)
        columns = []
        with bar(progress, n, "to_dense") as shown:
            for block in torch.split(eye, self.max_block_columns, dim=1):
                columns.append(self.block_product(block))
                if shown is not None:
                    shown.update(block.shape[1])
        return torch.cat(columns, dim=1).cpu().numpy()

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
        generator = torch.Generator(device=self.layout.device).manual_seed(check_seed(seed) or 0)
        v = torch.randn(
            self.shape[0], generator=generator, dtype=self.layout.dtype, device=self.layout.device
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
            rtol = symmetry_tolerance(self.layout.dtype, self.accuracy)
        else:
            rtol = check_real(rtol, "rtol", positive=True)
        generator = torch.Generator().manual_seed(check_seed(seed) or 0)
        like = {"dtype": self.layout.dtype, "device": self.layout.device}
        gap = symmetry_gap(self.apply, self.shape[0], generator, **like)
        if gap > rtol:
            raise RuntimeError(
                f"the operator is not symmetric: w.(Av) and v.(Aw) differ by {gap:.3g} (relative) "
                f"> rtol={rtol:.3g}, so eigensolvers, CG and MINRES would return garbage or never "
                "converge. A finite-difference Hessian of a model with kinks (ReLU, max-pooling) "
                "is the usual cause: use HessianOperator. Otherwise check a custom kernel or loss."
            )
        return gap

    # ------------------------------------------------------------------ SciPy interface
    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``A @ x`` for numpy ``x`` of shape ``(n,)`` or ``(n, 1)``."""
        return super().matvec(self._check_shape(x, "x", vector=True))

    def matmat(self, X: np.ndarray) -> np.ndarray:
        """``A @ X`` for numpy ``X`` of shape ``(n, k)``, in one pass over the data."""
        return super().matmat(self._check_shape(X, "X", vector=False))

    rmatvec = matvec  # curvature matrices are symmetric
    rmatmat = matmat

    def dot(self, x):
        """``A @ x``: a numpy array goes through :meth:`matvec` / :meth:`matmat` (and their shape
        checks); anything else (a scalar, another operator) is SciPy's."""
        if isinstance(x, np.ndarray):
            return self.matvec(x) if x.ndim == 1 else self.matmat(x)
        return super().dot(x)

    def _check_shape(self, x: np.ndarray, name: str, *, vector: bool) -> np.ndarray:
        """SciPy's own check says only "dimension mismatch": state expected and received."""
        x = np.asanyarray(x)
        n = self.shape[1]
        valid = x.shape in ((n,), (n, 1)) if vector else (x.ndim == 2 and x.shape[0] == n)
        if not valid:
            expected = f"({n},) or ({n}, 1)" if vector else f"({n}, k)"
            raise ValueError(f"{name} must have shape {expected}, got {x.shape}")
        return x

    def _to_torch(self, X: np.ndarray) -> torch.Tensor:
        return self.layout.check_vector(np.asarray(X), "x", allow_numpy=True)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self.apply(self._to_torch(x)).cpu().numpy()

    _matmat = _matvec  # apply handles (n,) and (n, k) alike
    _rmatvec = _matvec  # curvature matrices are symmetric
    _rmatmat = _matvec

    def _adjoint(self) -> CurvatureOperator:
        return self

    _transpose = _adjoint
