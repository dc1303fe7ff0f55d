"""Peak memory of one call, measured in this process.

On CUDA the caching allocator's high-water mark (``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats``): tensors only, not the allocator's cache or the CUDA
context. On the CPU the resident set's high-water mark ``VmHWM``, reset to the current resident
set right before the call by writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0 and later).
Where that reset is refused, ``VmHWM`` counts since the process started, which a fresh process
per call (``memory.py``) turns into the call's peak all the same; :attr:`Peak.source` says which
was measured. Every figure is absolute; :attr:`Peak.above_mib` subtracts what the process held
right before the call.

On the CPU, glibc keeps the memory of freed tensors below its mmap threshold (up to 32 MiB each)
for reuse, so the resident set would still count what earlier work freed, and a later call
reusing it would seem to need nothing: ``malloc_trim(0)`` hands that memory back right before
"before" is read (where glibc is the C library).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Peak", "held_mib", "measured_peak"]

MIB = 2**20
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SOURCES = {
    "cuda": "CUDA max_memory_allocated",
    "reset": "VmHWM reset before the call (after malloc_trim)",
    "process": "VmHWM since the process started",
}


@dataclass
class Peak:
    """The memory a call held: before it, at its peak, and how that peak was measured."""

    before_mib: float
    source: str
    peak_mib: float = math.nan

    @property
    def above_mib(self) -> float:
        """The peak above what the process held right before the call."""
        return self.peak_mib - self.before_mib


def _status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (in kB there), in MiB; NaN where there is none."""
    if not STATUS.exists():
        return math.nan
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return math.nan


def _on_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def held_mib(device: torch.device | str) -> float:
    """What the process holds now: CUDA tensors on a CUDA device, else its resident set."""
    if _on_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / MIB
    return _status_mib("VmRSS")


def _trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc's ``malloc_trim``; a no-op
    elsewhere)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _reset_resident_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set; ``False`` where the kernel refuses."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def measured_peak(device: torch.device | str) -> Iterator[Peak]:
    """Measure the peak memory of the ``with`` block on ``device`` (filled in on exit, also
    when the block raises)."""
    if _on_cuda(device):
        peak = Peak(held_mib(device), SOURCES["cuda"])
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _trim_heap()
        before = held_mib(device)
        peak = Peak(before, SOURCES["reset" if _reset_resident_peak() else "process"])
    try:
        yield peak
    finally:
        if _on_cuda(device):
            torch.cuda.synchronize(device)
            peak.peak_mib = torch.cuda.max_memory_allocated(device) / MIB
        else:
            peak.peak_mib = _status_mib("VmHWM")
