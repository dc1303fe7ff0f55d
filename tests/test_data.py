"""Data (curvop.data): batches in any mapping or sequence, walked, fingerprinted, moved and
passed to the model; data that changes between products is caught; data that is no collection
of batches is refused."""

from __future__ import annotations

from collections import OrderedDict, UserDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch
from conftest import (
    F64,
    TINY_N,
    DictInputModel,
    by_operator,
    dense_hessian,
    make_case,
    random_vector,
    regression_data,
    small_mlp,
    split_batches,
    tiny_batch,
    tiny_linear,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

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


@by_operator
def test_shuffling_loader_raises_on_the_second_product(cls):
    loader = DataLoader(
        TensorDataset(*regression_data()),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    op = cls(small_mlp(), nn.MSELoss(), loader)
    v = random_vector(op)
    op.apply(v)
    with pytest.raises(RuntimeError, match="data changed between products") as info:
        op.apply(v)
    assert "shuffle=False" in str(info.value) and "augmentation" in str(info.value)


class NoisyDataset(Dataset):
    """Random augmentation: every access adds fresh noise to the inputs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


@by_operator
def test_random_augmentation_raises_on_the_second_product(cls):
    op = cls(small_mlp(), nn.MSELoss(), DataLoader(NoisyDataset(*regression_data()), batch_size=5))
    v = random_vector(op)
    op.apply(v)
    with pytest.raises(RuntimeError, match="data changed between products.*shuffle=False"):
        op.apply(v)


@by_operator
def test_unshuffled_loader_matches_a_list_of_batches(cls):
    x, y = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)  # 5, 5, 2
    from_loader = cls(small_mlp(), nn.MSELoss(), loader)
    from_list = cls(small_mlp(), nn.MSELoss(), split_batches(x, y, [5, 5, 2]))
    V = random_vector(from_loader, k=3)
    first = from_loader.apply(V)
    for _ in range(3):  # repeated passes see the same fingerprints
        assert torch.equal(from_loader.apply(V), first)
    torch.testing.assert_close(first, from_list.apply(V), rtol=1e-12, atol=1e-14)


def test_permuting_the_samples_of_a_single_batch_is_harmless():
    """The fingerprint (and a mean or sum loss) is invariant to the order inside a batch."""
    x, y = regression_data()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    op, reference = (
        HessianOperator(small_mlp(), nn.MSELoss(), loader),
        HessianOperator(small_mlp(), nn.MSELoss(), (x, y)),
    )
    v = random_vector(op)
    for _ in range(3):
        torch.testing.assert_close(op.apply(v), reference.apply(v), rtol=1e-12, atol=1e-14)


def test_a_list_changed_between_products_is_detected():
    x, y = regression_data()
    batches = split_batches(x, y, [6, 6])
    op = HessianOperator(small_mlp(), nn.MSELoss(), batches)
    v = random_vector(op)
    op.apply(v)
    with torch.no_grad():
        batches[1][0][0, 0] += 1e-6  # one input entry, in place
    with pytest.raises(RuntimeError, match=r"contents of batch 1 changed"):
        op.apply(v)
    batches[1][0][0, 0] -= 1e-6
    batches.append(split_batches(x, y, [6, 6])[0])
    with pytest.raises(RuntimeError, match=r"batch 2 differs in count or shape"):
        op.apply(v)
    del batches[1:]
    with pytest.raises(RuntimeError, match=r"1 batches instead of 2"):
        op.apply(v)


class ScaledByNestedInput(nn.Module):
    """Called as ``model(x, {"scale": [s]})``: a tensor nested two levels deep."""

    def __init__(self):
        super().__init__()
        self.body = small_mlp()

    def forward(self, x: torch.Tensor, extras: dict) -> torch.Tensor:
        return self.body(x) * extras["scale"][0]


def test_a_change_in_a_nested_input_is_detected():
    x, y = regression_data()
    scale = torch.full((12, 1), 2.0, dtype=F64)
    op = HessianOperator(ScaledByNestedInput(), nn.MSELoss(), ((x, {"scale": [scale]}), y))
    v = random_vector(op)
    op.apply(v)
    scale[3] = 2.5
    with pytest.raises(RuntimeError, match="contents of batch 0 changed"):
        op.apply(v)


# ------------------------------------------------------------ data that is no collection of batches
def test_a_mapping_is_not_a_collection_of_batches():
    with pytest.raises(TypeError, match="got UserDict"):
        DataSource(UserDict(a=(torch.ones(2, 1), torch.ones(2))), torch.device("cpu"))


@by_operator
@pytest.mark.parametrize(
    "data",
    [[], DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 2)))],
    ids=["empty-list", "empty-loader"],
)
def test_empty_data_raises_at_construction(cls, data):
    with pytest.raises(ValueError, match="data must contain at least one batch"):
        cls(tiny_linear(), nn.MSELoss(), data)


def test_a_batch_without_samples_raises_at_construction():
    with pytest.raises(ValueError, match=r"data must contain at least one sample, got .* \(0, 2\)"):
        HessianOperator(tiny_linear(), nn.MSELoss(), (torch.zeros(0, 3), torch.zeros(0, 2)))


@by_operator
@pytest.mark.parametrize(
    "make",
    [lambda: (b for b in [tiny_batch()]), lambda: iter([tiny_batch()])],
    ids=["generator", "iterator"],
)
def test_a_one_shot_iterator_is_rejected(cls, make):
    with pytest.raises(TypeError, match="data must be .* got a one-shot iterator"):
        cls(tiny_linear(), nn.MSELoss(), make())


@pytest.mark.parametrize("data", ["xy", {"x": 1}, 3.0], ids=["str", "dict", "float"])
def test_data_that_is_no_batch_collection_is_rejected(data):
    with pytest.raises(TypeError, match="data must be one .*batch"):
        HessianOperator(tiny_linear(), nn.MSELoss(), data)


def test_a_malformed_batch_is_named_at_the_first_product():
    op = HessianOperator(tiny_linear(), nn.MSELoss(), [tiny_batch(), (torch.zeros(2, 3),)])
    with pytest.raises(TypeError, match="batch 1 of data must be an .inputs, targets. tuple"):
        op.apply(torch.zeros(TINY_N, dtype=F64))
