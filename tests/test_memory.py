"""No graph, cache or tensor survives a product: thousands of products do not grow the process."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from torch import nn

from curvop import FiniteDifferenceHessianOperator, GaussNewtonOperator, HessianOperator

OPERATORS = [HessianOperator, GaussNewtonOperator, FiniteDifferenceHessianOperator]
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def wide_model() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """About 1e5 float32 parameters: a leaked graph keeps at least a gradient's 400 KB per
    product, 800 MB over 2000 products."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(316, 316), nn.Tanh(), nn.Linear(316, 8))
    x, y = torch.randn(2, 316, generator=generator), torch.randn(2, 8, generator=generator)
    return model, (x, y)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_thousands_of_products_do_not_grow_the_resident_set():
    model, batch = wide_model()
    ops = [cls(model, nn.MSELoss(), batch) for cls in OPERATORS]
    n = ops[0].shape[0]
    assert n > 100_000
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    x = v.numpy()
    for op in ops:  # warm-up: allocator pools, autograd caches
        for _ in range(10):
            op.apply(v)
            op.matvec(x)
    gc.collect()
    before = resident_bytes()
    # 2000 products, half through torch and half through the SciPy interface
    for op, count in zip(ops, (500, 250, 250), strict=True):
        for _ in range(count):
            op.apply(v)
            op.matvec(x)
    gc.collect()
    growth = resident_bytes() - before
    assert growth < 32 * 2**20, f"resident set grew by {growth / 2**20:.1f} MiB"


class SavedTensor:
    """Stands in for a tensor saved by the autograd graph; lives exactly as long as the graph."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


@pytest.mark.parametrize("cls", OPERATORS, ids=["hessian", "ggn", "fd"])
@pytest.mark.parametrize("k", [None, 3])
def test_no_autograd_graph_survives_a_product(cls, k):
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator)
    op = cls(model, nn.MSELoss(), [(x, y), (x[:2], y[:2])])
    V = torch.randn((op.shape[0],) if k is None else (op.shape[0], k), generator=generator)
    op.apply(V)  # the first pass records the data fingerprints
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> SavedTensor:
        holder = SavedTensor(tensor)
        saved.append(weakref.ref(holder))
        return holder

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            result = op.apply(V)
        alive = sum(ref() is not None for ref in saved)  # before any collection: no cycles
        gc.collect()
        cyclic_tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert saved, "the hooks saw no saved tensors: the check would be vacuous"
    assert alive == 0, f"{alive} of {len(saved)} saved tensors outlive the product"
    assert not cyclic_tensors, "a product left tensors in reference cycles"
    assert not result.requires_grad and result.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
