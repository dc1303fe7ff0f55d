"""IdentityOperator (curvop.operators.identity): any dtype, a copy of V, numpy, a short repr."""

from __future__ import annotations

import numpy as np
import torch
from conftest import F64

from curvop import IdentityOperator


def test_the_identity_alone_works_with_any_dtype():
    identity = IdentityOperator(3)
    for dtype in (torch.float32, F64):
        V = torch.randn(3, 2, dtype=dtype)
        product = identity @ V
        torch.testing.assert_close(product, V)
        assert product.data_ptr() != V.data_ptr()  # a copy: the caller may write into it
    np.testing.assert_array_equal(identity @ np.arange(3.0), np.arange(3.0))
    assert repr(0.5 * identity) == "0.5 * IdentityOperator(3)"
