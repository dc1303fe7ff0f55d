"""The one place that knows how devices differ: CUDA work is asynchronous, CPU work is not."""

from __future__ import annotations

import time

import torch

__all__ = ["clock"]


def clock(device: torch.device) -> float:
    """A wall-clock reading (seconds) after the work queued on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
