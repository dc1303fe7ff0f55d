"""One memory budget for an algorithm's vectors and the autograd graphs of its block products
(curvop.linalg.workspace, curvop.memory): peaks measured from the tensors a call creates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import curvop
from curvop import memory
from curvop.memory import peak_tensor_bytes
from curvop.operators import base as base_module

MIB = 2**20


def conv_hessian(kernel: str = "auto") -> curvop.HessianOperator:
    """A small float32 conv net whose products hold several MiB of graph per column."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )  # fmt: skip
    x = torch.randn(96, 3, 16, 16, generator=generator)
    y = torch.randint(0, 10, (96,), generator=generator)
    data = [(x[:48], y[:48]), (x[48:], y[48:])]
    return curvop.HessianOperator(model, nn.CrossEntropyLoss(), data, kernel=kernel)


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


CALLS = {
    "top-5": (lambda op, **o: curvop.top_eigenvalues(op, 5, seed=0, tol=1e-3, **o), 20),
    "slq-4x30": (
        lambda op, **o: curvop.spectral_density(op, num_probes=4, num_steps=30, seed=0, **o),
        4 * 30 + 16,
    ),
    "hutchinson-30": (lambda op, **o: curvop.hutchinson_trace(op, 30, seed=0, **o), 60),
    "hutchpp-30": (lambda op, **o: curvop.hutchpp_trace(op, 30, seed=0, **o), 60),
    "xtrace-30": (lambda op, **o: curvop.xtrace(op, 30, seed=0, **o), 4 * 15 + 15),
    "xdiag-30": (lambda op, **o: curvop.xdiag(op, 30, seed=0, **o), 4 * 15 + 15),
}  # (call, the float64 n-vectors it may hold at once)


@pytest.mark.parametrize("name", CALLS)
def test_the_default_budget_holds_a_call_to_five_products_plus_its_vectors(name, monkeypatch):
    """With the defaults, a block product may hold four single products' graphs (small models may
    use a floor of 64 MiB instead; zero here, so that the rule itself is what is tested), so a
    call adds at most five single products plus the n-vectors it keeps."""
    from curvop.linalg import workspace

    monkeypatch.setattr(base_module, "DEFAULT_GRAPH_FLOOR", 0)
    monkeypatch.setattr(workspace, "DEFAULT_GRAPH_FLOOR", 0)
    op = conv_hessian()
    op.apply(torch.randn(op.shape[0], 4))  # the kernels are measured before the call
    single = op.product_cost(1).bytes
    call, vectors = CALLS[name]
    _, peak = peak_tensor_bytes(lambda: call(op))
    allowed = 5 * single + vectors * op.shape[0] * 8
    assert peak <= allowed, f"{peak / MIB:.1f} MiB > {allowed / MIB:.1f} MiB"


@pytest.mark.parametrize("name", CALLS)
def test_an_explicit_budget_bounds_the_peak(name):
    """memory_gb bounds vectors and graphs together: a budget of two single products plus the
    call's vectors is kept (within the error of the measured line, 25%)."""
    op = conv_hessian("batched")  # a graph that grows with the columns
    op.apply(torch.randn(op.shape[0], 4))
    call, vectors = CALLS[name]
    budget = 2 * op.product_cost(1).bytes + vectors * op.shape[0] * 8
    _, peak = peak_tensor_bytes(lambda: call(op, memory_gb=budget / 2**30))
    assert peak <= 1.25 * budget, f"{peak / MIB:.1f} MiB > {budget / MIB:.1f} MiB"


def test_a_product_splits_a_block_that_would_exceed_its_limit():
    op = conv_hessian("batched")  # its memory grows with the columns
    V = torch.randn(op.shape[0], 12)
    whole = op.block_product(V, memory_bytes=2**40)
    single = op.product_cost(1).bytes
    with curvop.count_products(op) as count:
        limited = op.block_product(V, memory_bytes=2 * single)
    assert count.calls > 1 and count.columns == 12  # several passes
    assert op.kernel_selections[12].bytes <= 2 * single
    torch.testing.assert_close(limited, whole, rtol=1e-5, atol=1e-6)
    op.max_block_columns = 5  # a cap on top of the memory limit
    with curvop.count_products(op) as count:
        op.block_product(V, memory_bytes=2**40)
    assert count.calls == 3


def test_the_default_budget_is_half_the_free_memory_of_the_device(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 * 2**30)
    assert memory.default_budget_bytes(torch.device("cpu")) == 5 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    assert memory.free_bytes(torch.device("cuda", 0)) == 8 * 2**30
    assert memory.free_bytes(torch.device("cpu")) > 0  # /proc/meminfo here


def test_memory_gb_is_checked():
    op = conv_hessian()
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="memory_gb must be a positive finite real number"):
            curvop.hutchinson_trace(op, 3, memory_gb=bad)
    assert np.isfinite(curvop.hutchinson_trace(op, 3, seed=0, memory_gb=None).value)
