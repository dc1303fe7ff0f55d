"""count_products (curvop.counting): the one counter sees a sum's products and its terms'."""

from __future__ import annotations

import torch
from conftest import F64

import curvop


def test_counting_sees_the_terms(curvature_pair):
    H, G, _, _ = curvature_pair
    total = H + G
    V = torch.randn(H.shape[0], 3, dtype=F64)
    with curvop.count_products(total) as outer, curvop.count_products(H) as inner:
        total.block_product(V)
    assert (outer.columns, outer.calls) == (3, 1)
    assert inner.columns == 3
