r"""How much memory a computation takes, and how much a device has to spare.

Two questions decide how wide curvop's block products may be:

- **What does a product hold at its peak?** :func:`peak_tensor_bytes` runs a function under a
  ``TorchDispatchMode`` that sees every tensor an operation returns, on any device and inside
  ``torch.func`` transforms, and follows each storage until it is freed: the peak of the bytes
  alive at once is what the call added to the process, the autograd graph and the transient
  buffers of a batched backward pass included. (The saved-tensor hooks of
  ``torch.autograd.graph`` see only what the graph saves, which does not grow with the columns of
  a batched second backward pass, and ``torch.func`` refuses them.)
- **How much may a call use by default?** :func:`default_budget_bytes`: a quarter
  (:data:`DEFAULT_SHARE`) of the memory free on the device right now, from
  ``torch.cuda.mem_get_info`` on a GPU and from ``MemAvailable`` in ``/proc/meminfo`` (or the
  available physical pages) on the CPU: room for the call, leaving the rest to the model, its
  data and whatever else the process (or a training run beside it) holds.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["DEFAULT_SHARE", "default_budget_bytes", "free_bytes", "peak_tensor_bytes"]

DEFAULT_SHARE = 0.25  # of the device's free memory: the default budget of a call
FALLBACK_FREE = 4 * 2**30  # bytes assumed free where the platform does not say

T = TypeVar("T")


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    """Where a tensor's storage lives (``None`` for a wrapper without one of its own)."""
    try:
        storage = tensor.untyped_storage()
        return str(storage.device), storage.data_ptr()
    except RuntimeError:  # a wrapper without storage of its own (torch.func levels)
        return None


class _PeakTracker(TorchDispatchMode):
    """Counts the bytes of the storages that operations create while it is active, until each
    is freed, and keeps the peak of their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[tuple[str, int], weakref.ref] = {}

    def _track(self, tensor: torch.Tensor, key: tuple[str, int]) -> None:
        if key in self._storages:
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return

        def freed(_: weakref.ref, key: tuple[str, int] = key, nbytes: int = nbytes) -> None:
            if self._storages.pop(key, None) is not None:
                self.live -= nbytes

        self._storages[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._efficientzerotensor.default:
            # torch.func's symbolic zeros crash the process when a later operation inside a
            # transform meets them under a dispatch mode (torch 2.13): real zeros instead (the
            # same values; counted, so the peak errs on the safe side)
            func = torch.ops.aten.zeros.default
        result = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for leaf in tree_leaves(result):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue
            key = _storage_key(leaf)
            if key is not None and key not in inputs:  # views and in-place results add nothing
                self._track(leaf, key)
        return result


def peak_tensor_bytes(function: Callable[[], T]) -> tuple[T, int]:
    """``function()`` and the peak bytes of the tensors it created that were alive at once.

    Tensors that existed before the call (parameters, data, the caller's vectors) are not
    counted; those the call returns are, as they are alive at its end. Storages are counted once
    however many views share them.

    Examples
    --------
    >>> _, peak = peak_tensor_bytes(lambda: torch.zeros(1000) + 1)  # two arrays of 4000 bytes
    >>> peak
    8000
    """
    tracker = _PeakTracker()
    with tracker:
        result = function()
    return result, tracker.peak


def free_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's own count on a GPU, ``MemAvailable`` on the CPU
    (memory the kernel can hand out without swapping), else the available physical pages, else
    :data:`FALLBACK_FREE`."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_FREE


def default_budget_bytes(device: torch.device) -> int:
    """The default memory budget of a call on ``device``: :data:`DEFAULT_SHARE` of what is free."""
    return int(DEFAULT_SHARE * free_bytes(device))
