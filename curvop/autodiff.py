"""The one autograd primitive the kernels share: vector-Jacobian products of many columns at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["vjp", "vjp_columns"]


def vjp_columns(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
    create_graph: bool = False,
    looped: bool = False,
) -> list[torch.Tensor]:
    r"""Columns of :math:`\sum_i (\partial \mathrm{outputs}_i / \partial \mathrm{inputs})^\top c_i`.

    Parameters
    ----------
    outputs, inputs
        Tensors of one autograd graph.
    cotangents
        One tensor per output, shaped ``(k, *output.shape)``.
    looped
        How ``k > 1`` columns are multiplied: one batched backward pass (``False``,
        ``is_grads_batched``, i.e. ``vmap`` over the backward graph), or ``k`` backward passes
        over the retained graph (``True``). Which is faster depends on the model: batching pays
        where the backward pass is many small operations, a loop where an operation has no
        batching rule and ``vmap`` falls back to a slow path.

    Returns
    -------
    list of torch.Tensor
        One ``(k, *input.shape)`` tensor per input; zeros where an input does not influence the
        outputs, or where no output depends on the graph at all (a constant gradient).
    """
    k = cotangents[0].shape[0]
    live = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not live:
        return [x.new_zeros((k, *x.shape)) for x in inputs]
    live_outputs = [o for o, _ in live]

    def backward(grad_outputs: list[torch.Tensor], retain: bool, batched: bool) -> tuple:
        return torch.autograd.grad(
            live_outputs,
            list(inputs),
            grad_outputs=grad_outputs,
            retain_graph=retain or create_graph,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )

    if k == 1 or looped:
        passes = [
            backward([c[j] for _, c in live], retain_graph or j < k - 1, batched=False)
            for j in range(k)
        ]
        grads = [_stacked(g) for g in zip(*passes, strict=True)]
    else:
        grads = backward([c for _, c in live], retain_graph, batched=True)
    return [
        x.new_zeros((k, *x.shape)) if g is None else g for g, x in zip(grads, inputs, strict=True)
    ]


def _stacked(columns: tuple[torch.Tensor | None, ...]) -> torch.Tensor | None:
    """The columns of one input as ``(k, *shape)`` (``None`` if the input is unused)."""
    if columns[0] is None:
        return None
    return columns[0].unsqueeze(0) if len(columns) == 1 else torch.stack(columns)


def vjp(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    cotangent: torch.Tensor | None = None,
    *,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    r"""One vector-Jacobian product :math:`(\partial \mathrm{output} / \partial \mathrm{inputs})^\top c`.

    ``cotangent`` defaults to ones (the gradient of a scalar ``output``). The single-column case
    of :func:`vjp_columns`, with its zeros for inputs that do not influence ``output`` (also when
    ``output`` does not depend on the graph at all, e.g. only unused parameters are selected).
    """
    if not output.requires_grad:
        return [x.new_zeros(x.shape) for x in inputs]
    # not through vjp_columns: its (1, ...) stacking would put an unsqueeze and a select per
    # input into a created graph, and every later backward through it would pay for them
    grads = torch.autograd.grad(
        output,
        list(inputs),
        grad_outputs=torch.ones_like(output) if cotangent is None else cotangent,
        retain_graph=create_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return [x.new_zeros(x.shape) if g is None else g for g, x in zip(grads, inputs, strict=True)]
