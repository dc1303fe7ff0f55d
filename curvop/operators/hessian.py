"""The exact Hessian of the loss: reverse-over-reverse or forward-over-reverse products."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ..autodiff import vjp, vjp_columns
from ..data import Batch
from ..objective import ClosureObjective, ModelObjective
from .base import CurvatureOperator, ModelCurvatureOperator
from .kernels import AUTO

__all__ = ["HessianOperator", "hessian_columns", "hessian_columns_forward"]


def hessian_columns(
    objective: ModelObjective | ClosureObjective,
    batch: Batch,
    columns: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    looped: bool = False,
) -> list[torch.Tensor]:
    r"""Hessian of one batch's loss times ``k`` columns, :math:`\nabla^2_\theta \ell \, V`, by
    reverse-over-reverse differentiation.

    One forward pass, one backward pass with ``create_graph``, then a backward pass of
    :math:`\langle \nabla_\theta \ell, v_j \rangle` for the ``k`` columns: batched, or ``looped``
    over the retained graph (see :func:`~curvop.autodiff.vjp_columns`).
    """
    with objective.evaluated(batch) as (loss, leaves):
        gradient = vjp(loss, leaves, create_graph=True)
        return vjp_columns(gradient, leaves, columns, create_graph=create_graph, looped=looped)


def hessian_columns_forward(
    objective: ModelObjective, batch: Batch, columns: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    r"""The same product by forward-over-reverse differentiation with ``torch.func``:
    :math:`Hv = \partial_t \nabla\ell(\theta + t v)|_{t=0}`, the ``jvp`` of the gradient,
    ``vmap``-ed over the ``k`` columns (the gradient's own graph is shared by all of them).
    """
    gradient = torch.func.grad(objective.loss_function(batch), argnums=tuple(range(len(columns))))
    primals = tuple(p.detach() for p in objective.params)

    def product(*tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.jvp(gradient, primals, tangents)[1]

    if columns[0].shape[0] == 1:
        return [t.unsqueeze(0) for t in product(*(c[0] for c in columns))]
    return list(torch.func.vmap(product, randomness="same")(*columns))


REVERSE_KERNELS = {
    "batched": hessian_columns,
    "looped": functools.partial(hessian_columns, looped=True),
}
KERNELS = {**REVERSE_KERNELS, "forward": hessian_columns_forward}


class HessianOperator(ModelCurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the loss over all the data.

    .. math::
        L(\theta) = \sum_b w_b \, \ell_b(\theta), \qquad
        w_b = \frac{N_b}{\sum_c N_c} \text{ (mean)} \quad\text{or}\quad w_b = 1 \text{ (sum)},

    where :math:`\ell_b` is ``loss_fn(model(inputs_b), targets_b)`` and :math:`N_b` the batch's
    sample count, so a short last batch is weighted exactly. A block of ``k`` columns is
    multiplied in one pass over the data. Each product costs about three to four gradients for
    one column, less per column in a block where the model allows it.

    Parameters
    ----------
    model
        The network. It is never modified: parameters, buffers and ``training`` stay as they are.
    loss_fn
        ``loss_fn(output, targets) -> scalar``; its ``reduction`` attribute, when present, fixes
        the reduction.
    data
        One ``(inputs, targets)`` batch or a re-iterable collection of batches (a list, a
        ``DataLoader`` with ``shuffle=False``). ``inputs`` is a tensor, a tuple (positional
        arguments) or a dict (keyword arguments); the sample count is ``targets.shape[0]``.
    params
        The parameters to differentiate (default: all of the model's that require grad).
    reduction
        ``"mean"`` (default) or ``"sum"`` when ``loss_fn`` has no ``reduction`` attribute.
    output
        What the loss is computed from when the model returns more than a tensor: a key
        (``"logits"`` of a dict, or an attribute such as a Hugging Face output's), an index into
        a tuple, or a callable applied to the output. Default: the output as it is.
    kernel
        How products are computed: ``"auto"`` (default) measures every candidate once, on the
        first batch of the first product (time and peak memory, with one column and with a
        block), and then multiplies every block with the one that is fastest within its memory
        limit (:mod:`curvop.operators.kernels`); or force one: ``"batched"``
        (reverse-over-reverse, the second backward pass ``vmap``-ed over the columns),
        ``"looped"`` (the same, looped over one retained graph: memory flat in the columns),
        ``"forward"`` (forward-over-reverse with ``torch.func``; dropped by ``"auto"`` where
        ``torch.func`` cannot trace the model). ``op.kernel_measurements`` shows what was
        measured, ``op.kernel_selections`` what was chosen per block width.
    process_group
        A ``torch.distributed`` process group over which the data is sharded: each rank passes
        its own shard as ``data`` and every product is the curvature of the union of the shards
        (one all-reduce per product; see :mod:`curvop.distributed`). ``None`` (default): a single
        process, no distributed call at all.

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

    kernels = KERNELS

    @classmethod
    def from_function(
        cls,
        func: Callable[[], torch.Tensor],
        params: torch.Tensor | Sequence[torch.Tensor],
        *,
        kernel: str = AUTO,
    ) -> CurvatureOperator:
        """The Hessian of a closure ``func() -> scalar loss`` with respect to ``params``.

        ``kernel`` is ``"auto"``, ``"batched"`` or ``"looped"`` (a closure reads its parameters
        itself, so ``torch.func`` cannot substitute them: no ``"forward"``). Returns a
        :class:`CurvatureOperator` of the closure's Hessian.
        """
        objective = ClosureObjective(func, params)
        return CurvatureOperator(
            objective, REVERSE_KERNELS, kernel=kernel, name="HessianOperator.from_function"
        )
