"""The reference functional API, rebuilt on curvop's kernels.

Same names, signatures and return conventions as the module curvop grew out of (a single tensor
for a single parameter, else a list), with its defects fixed: parameters are never left
perturbed, finite differences are central and well scaled, the Gauss-Newton product costs a
constant number of passes, and trace probes follow the parameters' dtype (and are unbiased when
sparse).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layout import as_tensor_list
from .linalg.trace import hutchinson_trace
from .objective import ClosureObjective, ModelObjective, resolve_params
from .operators.base import CurvatureOperator
from .operators.finite_difference import _kernels
from .operators.gauss_newton import gauss_newton_columns
from .operators.hessian import hessian_columns
from .validation import check_positive_int, check_real

__all__ = ["approximate_hvp", "exact_hvp", "gauss_newton_product", "hessian_trace", "model_hvp"]

Tensors = torch.Tensor | list[torch.Tensor]


def _operator(objective, kernel, reduction: str = "mean") -> CurvatureOperator:
    """The operator of one kernel, unmeasured: these functions make single products."""
    return CurvatureOperator(objective, {"kernel": kernel}, reduction=reduction, measured=False)


def _multiply(operator: CurvatureOperator, v: torch.Tensor | Sequence[torch.Tensor]) -> Tensors:
    layout = operator.layout
    flat = layout.check_vector(layout.flatten(as_tensor_list(v, "v"), "v"), "v")
    result = layout.unflatten(operator.apply(flat))
    return result[0] if len(result) == 1 else result


def exact_hvp(
    func: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    v: torch.Tensor | Sequence[torch.Tensor],
    create_graph: bool = False,
    *,
    seed: int | None = None,
) -> Tensors:
    """The exact Hessian-vector product ``Hv`` of ``func() -> scalar`` by double backpropagation.

    ``create_graph=True`` keeps the graph of the result, for higher-order derivatives. ``func``
    runs under the random seed ``seed`` (fresh when ``None``) with the global random state saved
    and restored.
    """
    kernel = functools.partial(hessian_columns, create_graph=create_graph)
    objective = ClosureObjective(func, params, seed=seed)
    return _multiply(_operator(objective, kernel), v)


def approximate_hvp(
    func: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    v: torch.Tensor | Sequence[torch.Tensor],
    num_samples: int = 1,
    damping: float = 0.0,
    *,
    seed: int | None = None,
) -> Tensors:
    r"""``(H + \text{damping}\, I) v`` by central differences of gradients.

    The step is :math:`\tfrac{1}{16}\sqrt{\varepsilon}(1 + \|\theta\|)/\|v\|`, scaled to the
    dtype (see :func:`~curvop.operators.finite_difference.finite_difference_columns`), and a
    difference across a kink of ``func`` raises :class:`~curvop.KinkError` (``func`` runs in
    its parameters' own dtype: in float32 that is unreliable on ReLU networks). The
    parameters are displaced in place and restored bitwise, also when ``func`` raises.
    ``num_samples`` averages that many evaluations of a stochastic ``func``: evaluation ``s`` runs
    under the random seed ``seed + s`` (``seed`` fresh when ``None``), and both sides of a
    difference share it. The global random state is saved and restored.
    """
    damping = check_real(damping, "damping")
    objective = ClosureObjective(func, params, num_samples=num_samples, seed=seed)
    product = _multiply(_operator(objective, _kernels(None, "central", None)["central"]), v)
    if damping:
        vectors = as_tensor_list(v, "v")
        if isinstance(product, torch.Tensor):
            return product + damping * vectors[0]
        return [p + damping * t for p, t in zip(product, vectors, strict=True)]
    return product


def _model_product(kernel, model: nn.Module, loss_fn, x, y, v, create_graph: bool) -> Tensors:
    """``kernel`` of ``loss_fn(model(x), y)`` over all of ``model.parameters()`` times ``v``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of targets, got {type(y).__name__}")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"model: every parameter must require grad (this function differentiates all of "
            f"model.parameters()), but {frozen} do not"
        )
    params = resolve_params(model, None)
    objective = ModelObjective(model, loss_fn, (x, y), params)
    kernel = functools.partial(kernel, create_graph=create_graph)
    return _multiply(_operator(objective, kernel, reduction="sum"), v)


def model_hvp(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor | Sequence[torch.Tensor],
    create_graph: bool = False,
) -> Tensors:
    """The exact Hessian-vector product of ``loss_fn(model(x), y)`` over ``model.parameters()``.

    The model is evaluated functionally: BatchNorm running statistics are not updated.
    """
    return _model_product(hessian_columns, model, loss_fn, x, y, v, create_graph)


def gauss_newton_product(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor | Sequence[torch.Tensor],
    create_graph: bool = False,
) -> Tensors:
    """The generalized Gauss-Newton product ``J^T H_loss J v`` over ``model.parameters()``.

    A constant number of passes, whatever the number of outputs (no loop over them).
    """
    return _model_product(gauss_newton_columns, model, loss_fn, x, y, v, create_graph)


def hessian_trace(
    func: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    num_samples: int = 10,
    create_graph: bool = False,
    sparse: bool = False,
    *,
    seed: int | None = None,
) -> float:
    r"""Hutchinson's estimate :math:`\frac{1}{m}\sum_i z_i^\top H z_i` of the Hessian's trace.

    :func:`curvop.hutchinson_trace` on the Hessian of ``func``. Probes are Rademacher vectors
    (exact in the parameters' dtype), drawn from a private generator (``seed``); with ``sparse=True`` each entry is nonzero with probability 0.1 and scaled by
    :math:`1/\sqrt{0.1}`, which keeps the estimate unbiased. All probes are multiplied in one
    block product.
    """
    check_positive_int(num_samples, "num_samples")
    kernel = functools.partial(hessian_columns, create_graph=create_graph)
    operator = _operator(ClosureObjective(func, params, seed=seed), kernel)
    distribution = "sparse_rademacher" if sparse else "rademacher"
    return hutchinson_trace(operator, num_samples, distribution=distribution, seed=seed).value
