"""A Hessian from finite differences of gradients: no second derivatives, gradient memory only."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..autodiff import vjp
from ..data import Batch
from ..objective import ClosureObjective, ModelObjective, OutputSelector
from ..validation import check_real
from .base import CurvatureOperator, model_objective
from .kernels import Kernel

__all__ = [
    "FiniteDifferenceHessianOperator",
    "KinkError",
    "PRECISIONS",
    "SCHEMES",
    "finite_difference_columns",
]

SCHEMES = ("central", "forward")
PRECISIONS = ("float64", "native")
STEP_FACTOR = 1 / 16  # of sqrt(eps) (1 + ||theta||); see finite_difference_columns
RETRY_FACTOR = 16  # a step that crossed a kink is retried this many times smaller ...
RETRIES = 2  # ... at most this many times
KINK_TOLERANCE = 1e-3  # allowed relative disagreement of the one-sided differences (float64)
NATIVE_KINK_TOLERANCE = 3e-2  # the same in float32 and narrower, whose rounding is ~5e-3
# disagreements below this many float64 eps times ||g|| are rounding, not kinks (in float64 a
# direction along which the gradient does not change; narrower dtypes get no such benefit)
ROUNDING_FLOOR = 1e3 * torch.finfo(torch.float64).eps
# The stated relative accuracy of a product (the tests hold it with a margin):
ACCURACY = {"float64": 1e-5, "native": 1e-2}


class KinkError(RuntimeError):
    """Finite differences crossed a point where the loss is not differentiable."""


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """The 2-norm of a list of tensors seen as one vector."""
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
    )


def _gradient(objective, batch: Batch, displacement, dtype) -> list[torch.Tensor]:
    with objective.evaluated(batch, displacement, dtype) as (loss, leaves):
        return vjp(loss, leaves)


def _one_sided_differences(
    objective, batch: Batch, base: list[torch.Tensor], v: list[torch.Tensor], h: float, dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """:math:`d_+ = g(\theta + hv) - g_0` and :math:`d_- = g_0 - g(\theta - hv)`, and
    :math:`\\|g_+\\| + \\|g_-\\|` (the scale of their rounding)."""
    plus = _gradient(objective, batch, [h * t for t in v], dtype)
    minus = _gradient(objective, batch, [-h * t for t in v], dtype)
    ahead = [a - b for a, b in zip(plus, base, strict=True)]
    behind = [b - c for b, c in zip(base, minus, strict=True)]
    return ahead, behind, _norm(plus) + _norm(minus)


def _central_difference(
    objective, batch: Batch, base: list[torch.Tensor], v: list[torch.Tensor], h: float, dtype,
    tolerance: float, column: int,
) -> list[torch.Tensor]:  # fmt: skip
    r""":math:`(g_+ - g_-) / 2h`, retried with steps :data:`RETRY_FACTOR` and its square times
    smaller while the one-sided differences disagree (a kink crossed on one side; see
    :func:`finite_difference_columns`); :class:`KinkError` if they still do."""
    for _ in range(RETRIES + 1):
        ahead, behind, scale = _one_sided_differences(objective, batch, base, v, h, dtype)
        gap = _norm([a - b for a, b in zip(ahead, behind, strict=True)])
        total = [a + b for a, b in zip(ahead, behind, strict=True)]
        # NaN/Inf pass through: the operator reports them, naming the batch
        if gap <= tolerance * _norm(total) + ROUNDING_FLOOR * scale or not math.isfinite(gap):
            return [t / (2 * h) for t in total]
        h /= RETRY_FACTOR
    relative = gap / max(_norm(total), torch.finfo(total[0].dtype).tiny)
    raise KinkError(
        f"finite differences crossed a point where the loss is not differentiable, in batch "
        f"{batch.index}, column {column}: the one-sided differences disagree by {relative:.2g} "
        f"(relative), also with steps {RETRY_FACTOR}x and {RETRY_FACTOR**RETRIES}x smaller. Either "
        "the loss has kinks along this direction (ReLU-like activations, max-pooling, abs), and "
        "the finite-difference Hessian is the wrong tool for this model: use HessianOperator "
        "(exact, and usually cheaper)"
        + (
            ", or precision='float64'"
            if dtype is None and isinstance(objective, ModelObjective)
            else ""
        )
        + "; or the operator is not deterministic (check_deterministic() names the likely causes)."
    )


def finite_difference_columns(
    objective: ModelObjective | ClosureObjective,
    batch: Batch,
    columns: Sequence[torch.Tensor],
    *,
    eps: float | None = None,
    scheme: str = "central",
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    r"""Hessian of one batch's loss times ``k`` columns, by differences of gradients.

    With :math:`g_0 = g(\theta)` and :math:`g_\pm = g(\theta \pm hv)`, central:
    :math:`Hv \approx (g_+ - g_-) / 2h`; forward: :math:`Hv \approx (g_+ - g_0) / h`, with

    .. math:: h = \tfrac{1}{16}\sqrt{\varepsilon}\,(1 + \|\theta\|) / \|v\|

    unless ``eps`` gives ``h``; :math:`\varepsilon` is that of ``dtype``, the precision the
    gradients are evaluated in (default: the parameters'). The step trades rounding error
    (about :math:`\varepsilon / \rho` for a relative step :math:`\rho`) against the kinks of
    ReLU-like activations: a perturbation that moves a pre-activation across zero changes the
    gradient by a jump :math:`J` that does not shrink with :math:`h`, an error :math:`J / 2h`
    in the product. Two defences:

    - evaluating in float64 (``dtype``) allows a step about :math:`10^4` times smaller
      relative to :math:`\theta` than float32, so crossings become that much rarer;
    - the central scheme checks every column: the one-sided differences
      :math:`d_+ = g_+ - g_0` and :math:`d_- = g_0 - g_-` agree to :math:`O(h^2)` where the loss
      is smooth, while a kink on one side adds :math:`J` to one of them, so
      :math:`\|d_+ - d_-\| / \|d_+ + d_-\|` measures the error :math:`J / 2h` of the product
      itself. Above ``KINK_TOLERANCE`` (``1e-3`` in float64) the column is retried with a
      step 16 and 256 times smaller; if it still disagrees, :class:`KinkError` is raised.

    Cost per batch: :math:`2k + 1` gradients (central; :math:`k + 1` forward), plus retries.
    The products come back in the evaluation precision.
    """
    params = objective.params
    work = dtype or params[0].dtype
    rounding = torch.finfo(work).eps
    tolerance = (
        KINK_TOLERANCE if rounding <= torch.finfo(torch.float64).eps else NATIVE_KINK_TOLERANCE
    )
    with torch.no_grad():
        scale = (1 + _norm(params)) * rounding**0.5 * STEP_FACTOR
    batch = batch.cast(dtype) if dtype else batch  # once, not per evaluation
    base = _gradient(objective, batch, None, dtype)
    products = []
    for j in range(columns[0].shape[0]):
        v = [c[j].to(work) for c in columns]
        norm = _norm(v)
        h = (scale / norm if norm else 0.0) if eps is None else eps
        if norm == 0:
            products.append([torch.zeros_like(g) for g in base])
        elif scheme == "forward":
            plus = _gradient(objective, batch, [h * t for t in v], dtype)
            products.append([(a - b) / h for a, b in zip(plus, base, strict=True)])
        else:
            products.append(_central_difference(objective, batch, base, v, h, dtype, tolerance, j))
    return [torch.stack(column) for column in zip(*products, strict=True)]


def _kernels(eps: float | None, scheme: str, dtype: torch.dtype | None) -> dict[str, Kernel]:
    """The one kernel of a finite-difference operator (timed like the others' candidates)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    eps = None if eps is None else check_real(eps, "eps", positive=True)
    return {
        scheme: functools.partial(finite_difference_columns, eps=eps, scheme=scheme, dtype=dtype)
    }


class FiniteDifferenceHessianOperator(CurvatureOperator):
    r"""The Hessian approximated by finite differences of gradients along each vector.

    Needs only first derivatives, so it works where double backward is unsupported, at
    :math:`2k + 1` gradient evaluations per batch for ``k`` columns (central differences).
    Where the model supports double backward, :class:`HessianOperator` is exact and usually
    cheaper: prefer it.

    By default the gradients are evaluated in **float64** whatever the model's dtype (the
    parameters, buffers and floating-point data are converted exactly; the model itself is
    never touched). That allows a step small enough to avoid the activations' kinks, which
    float32 rounding would swallow, and makes products accurate to the stated ``1e-5``
    (relative), float32 ReLU CNNs included. Every central difference is checked for a
    kink crossing (see :func:`finite_difference_columns`); a crossing that persists at smaller
    steps raises :class:`KinkError`, since the loss is then not differentiable along that
    direction and the Hessian there is not what finite differences measure.

    Parameters
    ----------
    model, loss_fn, data, params, reduction, output, process_group
        As for :class:`HessianOperator`: the network (never modified), ``loss_fn(output,
        targets) -> scalar``, one ``(inputs, targets)`` batch or a re-iterable collection of
        them, the parameters (default: all that require grad), the reduction when ``loss_fn``
        has none, what to pick from a model output that is not a tensor, and the
        ``torch.distributed`` group the data is sharded over.
    eps
        The step ``h`` in :math:`\theta \pm h v`; default
        :math:`\tfrac{1}{16}\sqrt{\varepsilon}\,(1 + \|\theta\|) / \|v\|` (:math:`\varepsilon`
        of the evaluation precision).
    scheme
        ``"central"`` (default) or ``"forward"`` (first order, ``k + 1`` gradients per batch:
        an error :math:`O(h)` instead of :math:`O(h^2)`, and no kink check).
    precision
        ``"float64"`` (default): evaluate the gradients in float64. ``"native"``: in the
        model's own dtype, for models whose operations have no float64 kernels; in float32
        products are accurate to the stated ``1e-2`` on smooth networks, and networks with
        kinks usually raise :class:`KinkError`.

    Attributes
    ----------
    accuracy : float
        The stated relative accuracy of a product (``1e-5`` in float64, ``1e-2`` native
        float32); :meth:`check_symmetric` and the eigensolvers allow asymmetry of this order.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> H = FiniteDifferenceHessianOperator(model, nn.MSELoss(), (x, y))
    >>> import numpy as np
    >>> Hv = H @ np.ones(H.shape[0], dtype=np.float32)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        data: Any,
        params: Sequence[torch.Tensor] | None = None,
        *,
        reduction: str | None = None,
        output: OutputSelector = None,
        eps: float | None = None,
        scheme: str = "central",
        precision: str = "float64",
        process_group: Any = None,
    ):
        """Build the operator: no product and no pass over the data yet (the parameters are
        described in the class docstring above)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        objective, reduction = model_objective(model, loss_fn, data, params, output, reduction)
        native = precision == "native" and objective.params[0].dtype != torch.float64
        super().__init__(
            objective,
            _kernels(eps, scheme, torch.float64 if precision == "float64" else None),
            reduction=reduction,
            process_group=process_group,
            accuracy=ACCURACY["native" if native else "float64"],
        )

    @classmethod
    def from_function(
        cls,
        func: Callable[[], torch.Tensor],
        params: torch.Tensor | Sequence[torch.Tensor],
        *,
        eps: float | None = None,
        scheme: str = "central",
    ) -> CurvatureOperator:
        """The finite-difference Hessian of a closure ``func() -> scalar loss``, as a
        :class:`CurvatureOperator`.

        The parameters are displaced in place during a product and restored bitwise afterwards,
        also when ``func`` raises. A closure reads its parameters and data itself, so the
        gradients are evaluated in the parameters' own dtype (``precision="native"``).
        """
        objective = ClosureObjective(func, params)
        native = objective.params[0].dtype != torch.float64
        return CurvatureOperator(
            objective,
            _kernels(eps, scheme, None),
            accuracy=ACCURACY["native" if native else "float64"],
            name="FiniteDifferenceHessianOperator.from_function",
        )
