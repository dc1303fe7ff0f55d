"""The generalized Gauss-Newton matrix ``J^T H_loss J``, for any loss."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..autodiff import vjp, vjp_columns
from ..data import Batch
from ..objective import ModelObjective, output_fix
from .base import ModelCurvatureOperator

__all__ = ["GaussNewtonOperator", "gauss_newton_columns", "gauss_newton_columns_forward"]


def _model_output(objective: ModelObjective, batch: Batch, values: Sequence[torch.Tensor]):
    output = objective.output(batch, values)
    if not isinstance(output, torch.Tensor):
        described, fix = output_fix(output)
        raise TypeError(
            f"batch {batch.index}: the model returned a {described}, but the Gauss-Newton "
            f"matrix differentiates one output tensor: {fix}"
        )
    return output


def _loss_hessian_times(
    objective: ModelObjective, batch: Batch, output: torch.Tensor, jv: torch.Tensor, **options
) -> torch.Tensor:
    r""":math:`(\nabla^2_f \ell)\, JV`: reverse-over-reverse through the loss alone (autograd, so
    any loss works: MSE, cross-entropy, BCE-with-logits, custom)."""
    detached = output.detach().requires_grad_()
    loss = objective.loss_of_output(batch, detached)
    output_gradient = vjp(loss, [detached], create_graph=True)
    return vjp_columns(output_gradient, [detached], [jv], **options)[0]


def gauss_newton_columns(
    objective: ModelObjective,
    batch: Batch,
    columns: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    looped: bool = False,
) -> list[torch.Tensor]:
    r"""GGN of one batch times ``k`` columns, :math:`J^\top (\nabla^2_f \ell) J V`, all in reverse
    mode.

    :math:`J = \partial f / \partial \theta` is the Jacobian of the model output ``f``. The cost
    is a constant number of passes, independent of the number of outputs:

    1. :math:`JV` by the double-vjp trick: :math:`g(u) = J^\top u` is linear in a dummy ``u``,
       so :math:`\partial \langle g(u), v \rangle / \partial u = J v`;
    2. :math:`(\nabla^2_f \ell) JV` through the loss alone;
    3. :math:`J^\top (\cdot)` by a vjp.

    The backward passes over ``k`` columns are batched, or ``looped`` over retained graphs.
    """
    options = {"create_graph": create_graph, "looped": looped}
    params = objective.params
    output = _model_output(objective, batch, params)
    dummy = torch.zeros_like(output, requires_grad=True)
    transposed = vjp(output, params, dummy, create_graph=True)
    jv = vjp_columns(transposed, [dummy], columns, **options)[0]
    hjv = _loss_hessian_times(objective, batch, output, jv, **options)
    return vjp_columns([output], params, [hjv], **options)


def gauss_newton_columns_forward(
    objective: ModelObjective, batch: Batch, columns: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    r"""The same product with :math:`JV` in forward mode: ``torch.func.jvp`` of the model output,
    ``vmap``-ed over the columns (one more forward pass, no double-vjp)."""
    params = objective.params
    output = _model_output(objective, batch, params)
    primals = tuple(p.detach() for p in params)

    def jvp(*tangents: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(lambda *v: _model_output(objective, batch, v), primals, tangents)[1]

    if columns[0].shape[0] == 1:
        jv = jvp(*(c[0] for c in columns)).unsqueeze(0)
    else:
        jv = torch.func.vmap(jvp, randomness="same")(*columns)
    hjv = _loss_hessian_times(objective, batch, output, jv)
    return vjp_columns([output], params, [hjv])


KERNELS = {
    "batched": gauss_newton_columns,
    "looped": functools.partial(gauss_newton_columns, looped=True),
    "forward": gauss_newton_columns_forward,
}


class GaussNewtonOperator(ModelCurvatureOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_b w_b J_b^\top H_b J_b`.

    :math:`J_b` is the Jacobian of the model output on batch ``b`` with respect to the parameters
    and :math:`H_b = \nabla^2_f \ell_b` the Hessian of the loss with respect to that output
    (computed by autograd, so every loss works). :math:`G` is positive semi-definite whenever the
    loss is convex in the output, and equals the Hessian when the model is linear in its
    parameters. Batch weights :math:`w_b` are as in :class:`HessianOperator`. A product costs a
    constant number of passes, whatever the number of outputs.

    Parameters
    ----------
    model, loss_fn, data, params, reduction
        As for :class:`HessianOperator`: the network (never modified), ``loss_fn(output,
        targets) -> scalar``, one ``(inputs, targets)`` batch or a re-iterable collection of
        them, the parameters to differentiate (default: all that require grad), and the
        reduction when ``loss_fn`` has no ``reduction`` attribute.
    output
        The model output :math:`f` that ``J`` differentiates and the loss receives, when the
        model returns more than a tensor (a dict such as ``{"logits": ...}``, a Hugging Face
        output, a tuple): a key or attribute name (``"logits"``), an index, or a callable.
    kernel
        ``"auto"`` (default: each candidate measured once, on the first batch, and the fastest
        within a product's memory limit used; see :class:`HessianOperator`), ``"batched"`` or
        ``"looped"`` (:math:`JV` by the double-vjp trick, the backward passes over the columns
        ``vmap``-ed or looped), or ``"forward"`` (:math:`JV` by ``torch.func.jvp``).
    process_group
        As for :class:`HessianOperator`: the data sharded over ``torch.distributed`` ranks.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> G = GaussNewtonOperator(model, nn.CrossEntropyLoss(), (x, y))
    >>> import curvop
    >>> step = curvop.solve_damped(G, torch.ones(G.shape[0]), damping=1e-2).x
    """

    kernels = KERNELS
