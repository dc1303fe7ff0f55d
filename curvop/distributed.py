r"""Data-parallel products on ``torch.distributed``: each rank multiplies its shard of the data.

The curvature of the loss over all the data is a sample-weighted sum over shards, so a product is
complete after one all-reduce of the ranks' partial sums. That all-reduce carries three things in
one float64 buffer on the operator's device (so NCCL works without a host round trip):

.. math::
    [\, \textstyle\sum_{b \in \text{shard}} w_b A_b V \;|\; N_{\text{shard}} \;|\; \text{failed} \,]

the partial product, the shard's sample count (for the mean over all samples) and a failure
flag. A rank whose model, loss or data raises still joins the all-reduce, with the flag set, so no
rank is left waiting in a collective: every rank then raises, the failing one with its own
exception, the others with a ``RuntimeError`` that quotes it (gathered only on this error path).

Everything else the toolkit needs from the ranks (a common seed, a common decision) also goes
through this module, so that all ranks run the same algorithm in lockstep.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "agree_on_measurements",
    "allreduce_product",
    "broadcast_seed",
    "check_group",
    "min_over_ranks",
]


class DistributedError(RuntimeError):
    """Another rank failed during a collective product."""


def check_group(process_group: Any) -> Any:
    """``None`` (single process), or an initialized ``torch.distributed`` process group
    (``torch.distributed.group.WORLD`` for all ranks)."""
    if process_group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment), "
            "or pass process_group=None for a single process"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}"
        )
    return process_group


def allreduce_product(
    partial: torch.Tensor | None,
    samples: int,
    failure: BaseException | None,
    shape: tuple[int, ...],
    device: torch.device,
    process_group: Any,
) -> tuple[torch.Tensor, int]:
    """Sum the ranks' partial products and sample counts in one all-reduce.

    Parameters
    ----------
    partial
        This rank's partial product of ``shape`` (any floating dtype), or ``None`` if it failed.
    samples
        This rank's sample count.
    failure
        The exception this rank hit, or ``None``.

    Returns
    -------
    total, samples
        The float64 sum over all ranks (identical on every rank) and the total sample count.

    Raises
    ------
    BaseException
        ``failure`` itself on the rank that failed; :class:`DistributedError` quoting it on the
        others.
    """
    size = 1
    for extent in shape:
        size *= extent
    buffer = torch.zeros(size + 2, dtype=torch.float64, device=device)
    if failure is None:
        buffer[:size] = partial.reshape(-1)
        buffer[size] = samples
    else:
        buffer[size + 1] = 1
    dist.all_reduce(buffer, group=process_group)
    if bool(buffer[size + 1] > 0):
        _raise_failure(failure, process_group)
    return buffer[:size].view(shape), int(round(float(buffer[size])))


def _raise_failure(failure: BaseException | None, process_group: Any) -> None:
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    messages: list[str | None] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(messages, message, group=process_group)
    if failure is not None:
        raise failure
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    rank, text = failed[0]
    raise DistributedError(
        f"rank {rank} of the process group failed during a curvature product ({len(failed)} "
        f"rank(s) failed), so this rank stops too: {text}"
    )


def broadcast_seed(process_group: Any, device: torch.device) -> int:
    """A fresh random seed drawn on the group's first rank and shared with all of them."""
    seed = torch.tensor([secrets.randbelow(2**62)], dtype=torch.int64, device=device)
    dist.broadcast(seed, src=dist.get_global_rank(process_group, 0), group=process_group)
    return int(seed)


def min_over_ranks(value: float, process_group: Any, device: torch.device) -> float:
    """The least ``value`` of the ranks (one all-reduce), so that a memory limit read from each
    rank's free memory (which differs between ranks) is the same on every rank: the columns per
    pass, and so the shapes of the all-reduces, must match."""
    buffer = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.MIN, group=process_group)
    return float(buffer)


def agree_on_measurements(
    results: dict[tuple[str, int], Any], reference: str, process_group: Any, device: torch.device
) -> dict[tuple[str, int], Any]:
    """The kernel measurements of every rank made one (two all-reduces), so that every rank
    chooses the same kernel and the same columns per pass (the all-reduces of a product must
    match): the mean of the seconds, the largest peak bytes, and a candidate that failed on any
    rank failed on all.

    Parameters
    ----------
    results
        ``(candidate, width) -> Measurement`` or the exception it raised; the same keys, in the
        same order, on every rank.
    reference
        The candidate whose exceptions are the user's code raising: then every rank raises (the
        failing one its own exception, the others :class:`DistributedError`).
    """
    from .operators.kernels import Measurement  # the operators import this module

    keys = list(results)
    failed = [isinstance(results[key], BaseException) for key in keys]
    seconds = [0.0 if bad else results[key].seconds for key, bad in zip(keys, failed, strict=True)]
    peaks = [
        0.0 if bad else float(results[key].bytes) for key, bad in zip(keys, failed, strict=True)
    ]
    own = next(
        (
            results[key]
            for key, bad in zip(keys, failed, strict=True)
            if bad and key[0] == reference
        ),
        None,
    )
    total = torch.tensor(seconds, dtype=torch.float64, device=device)
    largest = torch.tensor(
        [*peaks, *map(float, failed), float(own is not None)], dtype=torch.float64, device=device
    )
    dist.all_reduce(total, group=process_group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=process_group)
    if bool(largest[-1] > 0):
        _raise_failure(own, process_group)
    size = dist.get_world_size(process_group)
    agreed: dict[tuple[str, int], Any] = {}
    for i, key in enumerate(keys):
        if bool(largest[len(keys) + i] > 0):
            agreed[key] = results[key] if failed[i] else RuntimeError("failed on another rank")
        else:
            agreed[key] = Measurement(float(total[i]) / size, float(largest[i]))
    return agreed
