"""The generalized Gauss-Newton matrix ``J^T H_loss J``, for any loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..autodiff import vjp, vjp_columns
from ..data import Batch
from ..objective import ModelObjective
from .base import CurvatureOperator

__all__ = ["GaussNewtonOperator", "gauss_newton_columns"]


def gauss_newton_columns(
    objective: ModelObjective,
    batch: Batch,
    columns: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    r"""GGN of one batch times ``k`` columns: :math:`J^\top (\nabla^2_f \ell) J V`.

    :math:`J = \partial f / \partial \theta` is the Jacobian of the model output ``f``. The cost
    is a constant number of passes, independent of the number of outputs:

    1. :math:`JV` by the double-vjp trick: :math:`g(u) = J^\top u` is linear in a dummy ``u``,
       so :math:`\partial \langle g(u), v \rangle / \partial u = J v`.
    2. :math:`(\nabla^2_f \ell) JV` by reverse-over-reverse through the loss alone (autograd, so
       any loss works: MSE, cross-entropy, BCE-with-logits, custom).
    3. :math:`J^\top (\cdot)` by one batched vjp.
    """
    params = objective.params
    output = objective.output(batch, params)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor, got {type(output).__name__} (the Gauss-Newton "
            "matrix differentiates the model output)"
        )
    dummy = torch.zeros_like(output, requires_grad=True)
    transposed = vjp(output, params, dummy, create_graph=True)
    jv = vjp_columns(transposed, [dummy], columns, create_graph=create_graph)[0]

    detached = output.detach().requires_grad_()
    loss = objective.loss_of_output(batch, detached)
    output_gradient = vjp(loss, [detached], create_graph=True)[0]
    hjv = vjp_columns([output_gradient], [detached], [jv], create_graph=create_graph)[0]
    return vjp_columns([output], params, [hjv], create_graph=create_graph)


class GaussNewtonOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_b w_b J_b^\top H_b J_b`.

    :math:`J_b` is the Jacobian of the model output on batch ``b`` with respect to the parameters
    and :math:`H_b = \nabla^2_f \ell_b` the Hessian of the loss with respect to that output
    (computed by autograd, so every loss works). :math:`G` is positive semi-definite whenever the
    loss is convex in the output, and equals the Hessian when the model is linear in its
    parameters. Batch weights :math:`w_b` are as in :class:`HessianOperator`.

    Parameters are those of :class:`CurvatureOperator`. The model must return a tensor.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> G = GaussNewtonOperator(model, nn.CrossEntropyLoss(), (x, y))
    >>> from scipy.sparse.linalg import aslinearoperator, cg
    >>> import numpy as np
    >>> damped = G + 1e-2 * aslinearoperator(np.eye(G.shape[0]))
    >>> x, info = cg(damped, np.ones(G.shape[0]))
    """

    kernel = staticmethod(gauss_newton_columns)
