"""Data (curvop.data): batches in any mapping or sequence, walked, fingerprinted, moved and
passed to the model; data that changes between products is caught; data that is no collection
of batches is refused."""

from __future__ import annotations

from collections import OrderedDict, UserDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch
from conftest import (
    DictInputModel,
    dense_hessian,
    make_case,
)
from torch import nn

import curvop
from curvop import HessianOperator
from curvop.data import Batch, DataSource, map_tensors

Pair = namedtuple("Pair", ["features", "scale"])


def _dict_case():
    return make_case("dict", "mse", "mean", (6,))


# --------------------------------------------------------------- batches in any mapping or sequence
def test_a_user_dict_batch_gives_the_hessian_of_the_dict_batch():
    case = _dict_case()
    inputs, targets = case.data
    operator = curvop.HessianOperator(case.model, case.loss_fn, (UserDict(inputs), targets))
    np.testing.assert_allclose(operator.to_dense(), dense_hessian(case).numpy(), rtol=1e-10)


def test_tensors_in_nested_mappings_and_sequences_are_all_fingerprinted():
    x = torch.arange(6.0).reshape(3, 2)
    inputs = UserDict({"a": OrderedDict(b=[x, (x + 1,)]), "c": Pair(x + 2, x + 3)})
    batch = Batch(0, inputs, torch.zeros(3))
    assert [t[0, 0].item() for t in batch.input_tensors()] == [0.0, 1.0, 2.0, 3.0]
    assert len(batch.tensors()) == 5


def test_map_tensors_reaches_every_tensor_and_keeps_the_types():
    x = torch.ones(2, 3)
    inputs = UserDict({"a": OrderedDict(b=[x]), "c": Pair(x, x), "d": 7})
    moved = map_tensors(inputs, lambda t: t.to("meta"))
    assert type(moved) is UserDict and type(moved["a"]) is OrderedDict
    assert type(moved["a"]["b"]) is tuple and moved["a"]["b"][0].device.type == "meta"
    assert type(moved["c"]) is Pair and moved["c"].scale.device.type == "meta"
    assert moved["d"] == 7
    assert x.device.type == "cpu" and inputs["a"]["b"][0] is x  # the user's data untouched


def test_a_mapping_that_cannot_be_rebuilt_becomes_a_dict():
    inputs = defaultdict(list, {"x": torch.ones(2)})
    moved = map_tensors(inputs, lambda t: t * 2)
    assert type(moved) is dict and torch.equal(moved["x"], torch.full((2,), 2.0))


def test_the_source_moves_tensors_inside_a_user_dict_to_the_device():
    x, y = torch.ones(4, 3), torch.zeros(4)
    source = DataSource((UserDict({"features": x, "scale": x[:, :1]}), y), torch.device("meta"))
    (batch,) = list(source)
    assert all(t.device.type == "meta" for t in batch.tensors())
    args, kwargs = batch.model_args()
    assert args == () and type(kwargs) is dict and set(kwargs) == {"features", "scale"}


def test_a_user_dict_model_input_is_passed_as_keyword_arguments():
    model = DictInputModel().double()
    features = torch.randn(5, 3, dtype=torch.float64)
    scale = torch.rand(5, 1, dtype=torch.float64)
    batch = Batch(0, UserDict(features=features, scale=scale), torch.zeros(5))
    args, kwargs = batch.model_args()
    torch.testing.assert_close(model(*args, **kwargs), model(features=features, scale=scale))


def test_dataloader_and_tuple_inputs():
    torch.manual_seed(0)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(4, 3)

        def forward(self, u, w):
            return torch.tanh(self.a(u)) + self.b(w)

    model = TwoInputs().double()
    u, w = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, 3, dtype=torch.float64)
    dataset = [((u[i], w[i]), y[i]) for i in range(10)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    from_loader = HessianOperator(model, nn.MSELoss(), loader).to_dense()
    whole = HessianOperator(model, nn.MSELoss(), ((u, w), y)).to_dense()
    np.testing.assert_allclose(from_loader, whole, atol=1e-12)


# --------------------------------------------------------------- data that changes between products
def test_a_change_inside_a_user_dict_is_caught():
    case = _dict_case()
    inputs, targets = case.data
    batch = UserDict({name: tensor.clone() for name, tensor in inputs.items()})
    operator = curvop.HessianOperator(case.model, case.loss_fn, (batch, targets))
    vector = torch.ones(operator.shape[0], dtype=torch.float64)
    operator.apply(vector)
    batch["scale"][0] += 1.0
    with pytest.raises(RuntimeError, match=r"the data changed between products \(the contents"):
        operator.apply(vector)


# ------------------------------------------------------------ data that is no collection of batches
def test_a_mapping_is_not_a_collection_of_batches():
    with pytest.raises(TypeError, match="got UserDict"):
        DataSource(UserDict(a=(torch.ones(2, 1), torch.ones(2))), torch.device("cpu"))
