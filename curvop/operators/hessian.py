"""The exact Hessian of the loss, by reverse-over-reverse differentiation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..autodiff import vjp, vjp_columns
from ..data import Batch
from ..objective import ClosureObjective, ModelObjective
from .base import CurvatureOperator

__all__ = ["HessianOperator", "hessian_columns"]


def hessian_columns(
    objective: ModelObjective | ClosureObjective,
    batch: Batch,
    columns: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    r"""Hessian of one batch's loss times ``k`` columns: :math:`\nabla^2_\theta \ell \, V`.

    One forward pass, one backward pass with ``create_graph``, then one batched backward pass of
    :math:`\langle \nabla_\theta \ell, v_j \rangle` for all ``k`` columns.
    """
    with objective.evaluated(batch) as (loss, leaves):
        gradient = vjp(loss, leaves, create_graph=True)
        return vjp_columns(gradient, leaves, columns, create_graph=create_graph)


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the loss over all the data.

    .. math::
        L(\theta) = \sum_b w_b \, \ell_b(\theta), \qquad
        w_b = \frac{N_b}{\sum_c N_c} \text{ (mean)} \quad\text{or}\quad w_b = 1 \text{ (sum)},

    where :math:`\ell_b` is ``loss_fn(model(inputs_b), targets_b)`` and :math:`N_b` the batch's
    sample count, so a short last batch is weighted exactly. Each product costs about
    four gradient evaluations per batch for a single vector; a block of ``k`` columns is
    multiplied in one pass over the data with one batched backward pass per batch.

    Parameters are those of :class:`CurvatureOperator`.

    Examples
    --------
    >>> model = nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> H = HessianOperator(model, nn.MSELoss(), (x, y))
    >>> H.shape
    (8, 8)
    >>> from scipy.sparse.linalg import eigsh
    >>> top = eigsh(H, k=1, which="LA", return_eigenvectors=False)
    """

    kernel = staticmethod(hessian_columns)

    @classmethod
    def from_function(
        cls, func: Callable[[], torch.Tensor], params: torch.Tensor | Sequence[torch.Tensor]
    ) -> HessianOperator:
        """The Hessian of a closure ``func() -> scalar loss`` with respect to ``params``."""
        return cls._from_parts(ClosureObjective(func, params), hessian_columns)
