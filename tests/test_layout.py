"""ParamLayout (curvop.layout): the flatten/unflatten adapter, and the arguments it checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import F64

from curvop import ParamLayout


@pytest.fixture
def params() -> list[torch.Tensor]:
    return [
        torch.zeros(2, 3, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros((), dtype=torch.float64),
    ]


# ---------------------------------------------------------------- attributes, flatten and unflatten
def test_attributes(params):
    layout = ParamLayout(params)
    assert layout.size == 11
    assert layout.shapes == [torch.Size([2, 3]), torch.Size([4]), torch.Size([])]
    assert layout.dtype == torch.float64 and layout.device == torch.device("cpu")


def test_round_trip_vector_and_block(params):
    layout = ParamLayout(params)
    vector = torch.arange(11.0, dtype=torch.float64)
    pieces = layout.unflatten(vector)
    assert [p.shape for p in pieces] == layout.shapes
    assert torch.equal(pieces[0], vector[:6].reshape(2, 3)) and float(pieces[2]) == 10.0
    assert torch.equal(layout.flatten(pieces), vector)

    block = torch.randn(11, 3, dtype=torch.float64)
    columns = layout.unflatten(block)
    assert [tuple(c.shape) for c in columns] == [(2, 3, 3), (4, 3), (3,)]
    assert torch.equal(columns[0][..., 1], block[:6, 1].reshape(2, 3))
    assert torch.equal(layout.flatten(columns), block)


def test_unflatten_accepts_numpy_and_converts(params):
    layout = ParamLayout(params)
    pieces = layout.unflatten(np.arange(11, dtype=np.float32))
    assert all(isinstance(p, torch.Tensor) and p.dtype == torch.float64 for p in pieces)
    assert [tuple(p.shape) for p in layout.unflatten(np.ones((11, 2)))] == [(2, 3, 2), (4, 2), (2,)]


def test_single_tensor_and_generator_of_parameters():
    model = torch.nn.Linear(3, 2)
    layout = ParamLayout(model.parameters())
    assert layout.size == 8 and layout.dtype == torch.float32
    assert ParamLayout(torch.zeros(5)).size == 5


# --------------------------------------------------------------------- argument checks
def test_wrong_length_or_shape_states_expected_and_received(params):
    layout = ParamLayout(params)
    with pytest.raises(ValueError, match=r"\(11,\) or \(11, k\), got \(10,\)"):
        layout.unflatten(torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got \(11, 2, 1\)"):
        layout.unflatten(np.zeros((11, 2, 1)))
    with pytest.raises(ValueError, match=r"tensors\[1\] must have shape \(4,\), got \(5,\)"):
        layout.flatten([torch.zeros(2, 3), torch.zeros(5), torch.zeros(())])
    with pytest.raises(ValueError, match="3 tensors, got 2"):
        layout.flatten([torch.zeros(2, 3), torch.zeros(4)])
    with pytest.raises(TypeError, match="complex"):
        layout.unflatten(np.zeros(11, dtype=complex))


def test_layout_rejects_mixed_dtypes_and_devices():
    with pytest.raises(ValueError, match=r"params must share one dtype .*float32.*float64"):
        ParamLayout([torch.zeros(2), torch.zeros(2, dtype=F64)])


def test_layout_rejects_empty_integer_and_non_tensor_params():
    with pytest.raises(ValueError, match="params must contain at least one tensor"):
        ParamLayout([])
    with pytest.raises(
        TypeError, match="params must be real floating point, got dtype torch.int64"
    ):
        ParamLayout([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(
        TypeError, match="params must be a tensor or a sequence of tensors, got int"
    ):
        ParamLayout(3)


def test_layout_flatten_names_the_argument():
    layout = ParamLayout([torch.zeros(2, 3), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"v\[1\] must have shape \(4,\), got \(5,\)"):
        layout.flatten([torch.zeros(2, 3), torch.zeros(5)], "v")
    with pytest.raises(ValueError, match="tensors must hold 2 tensors, got 1"):
        layout.flatten([torch.zeros(2, 3)])
