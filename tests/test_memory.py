"""Peak memory (curvop.memory): what a call creates, the transient buffers of a batched backward
pass included, and the default budget from the device's free memory."""

from __future__ import annotations

import torch
from conftest import conv_hessian

from curvop import memory
from curvop.memory import peak_tensor_bytes


def test_peaks_count_what_a_call_creates():
    _, peak = peak_tensor_bytes(lambda: torch.zeros(1000) + 1)
    assert peak == 8000  # two float32 arrays alive at once
    kept = torch.zeros(10**6)
    _, peak = peak_tensor_bytes(lambda: kept.view(1000, 1000)[0].sum())
    assert peak < 100  # a view of an existing tensor adds nothing; the sum adds 4 bytes


def test_the_peak_of_a_batched_backward_grows_with_its_columns():
    """What the saved-tensor hooks of autograd do not see: the transient buffers of a batched
    second backward pass grow with the number of columns."""
    op = conv_hessian()
    op.apply(torch.randn(op.shape[0], 4))  # measures the kernels
    measured = op.kernel_measurements
    batched = measured["batched"]
    assert batched[4].bytes > 2 * batched[1].bytes
    assert measured["looped"][4].bytes < batched[4].bytes  # one column at a time: flat


def test_the_default_budget_is_a_quarter_of_the_free_memory_of_the_device(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 * 2**30)
    assert memory.default_budget_bytes(torch.device("cpu")) == 10 * 2**30 // 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    assert memory.free_bytes(torch.device("cuda", 0)) == 8 * 2**30
    assert memory.free_bytes(torch.device("cpu")) > 0  # /proc/meminfo here
