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
) -> list[torch.Tensor]:
    r"""Columns of :math:`\sum_i (\partial \mathrm{outputs}_i / \partial \mathrm{inputs})^\top c_i`.

    Parameters
    ----------
    outputs, inputs
        Tensors of one autograd graph.
    cotangents
        One tensor per output, shaped ``(k, *output.shape)``: ``k`` columns multiplied in one
        backward pass (``is_grads_batched``; a plain pass when ``k == 1``).

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
    batched = k > 1
    grads = torch.autograd.grad(
        [o for o, _ in live],
        list(inputs),
        grad_outputs=[c if batched else c[0] for _, c in live],
        retain_graph=retain_graph or create_graph,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [
        x.new_zeros((k, *x.shape)) if g is None else (g if batched else g.unsqueeze(0))
        for g, x in zip(grads, inputs, strict=True)
    ]


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
    cotangent = torch.ones_like(output) if cotangent is None else cotangent
    columns = vjp_columns([output], inputs, [cotangent.unsqueeze(0)], create_graph=create_graph)
    return [column[0] for column in columns]
