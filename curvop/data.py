"""Turn "one batch or a re-iterable collection of batches" into a uniform, checked loop.

A batch is a 2-tuple or 2-list ``(inputs, targets)`` whose second element is a tensor. Its sample
count is ``targets.shape[0]``. ``inputs`` is a tensor, a tuple of tensors (positional arguments
of the model) or a mapping of tensors (a dict, a ``UserDict``, ...: keyword arguments). Tensors
nested anywhere in mappings, tuples and lists are fingerprinted and moved to the device.

Every pass records a cheap fingerprint of each batch (its shapes and dtypes, and three weighted
sums of every tensor in it, invariant to the order of samples inside a batch, as is the loss).
A later pass that sees different batches raises ``RuntimeError``: a shuffling or augmenting
loader would otherwise make every product a different matrix, and Lanczos, ARPACK and CG would
silently return garbage.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "DataSource", "is_single_batch", "map_tensors"]


@dataclass(frozen=True)
class Batch:
    """One batch on the parameters' device, with its position in the pass."""

    index: int
    inputs: Any
    targets: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0]) if self.targets.dim() > 0 else 1

    def model_args(self) -> tuple[tuple, dict]:
        """Positional and keyword arguments for ``model(...)``: a mapping is keyword arguments."""
        if isinstance(self.inputs, Mapping):
            return (), dict(self.inputs)
        if isinstance(self.inputs, tuple):
            return self.inputs, {}
        return (self.inputs,), {}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, nested ones (in tuples, lists, mappings) included."""
        return list(_tensors((self.inputs, self.targets)))

    def input_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the inputs, nested ones included."""
        return list(_tensors(self.inputs))

    def cast(self, dtype: torch.dtype) -> Batch:
        """The batch with every floating-point tensor converted to ``dtype`` (integer tensors,
        such as class labels or token ids, unchanged)."""

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        return Batch(self.index, map_tensors(self.inputs, convert), convert(self.targets))


def _tensors(item: Any) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, Mapping | tuple | list):
        for value in item.values() if isinstance(item, Mapping) else item:
            yield from _tensors(value)


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` batch rather than a collection of batches."""
    return isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def map_tensors(item: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``item`` with ``function`` applied to every tensor in it, nested ones included.

    A mapping keeps its type where ``type(item)(a_dict)`` rebuilds it (``dict``, ``OrderedDict``,
    ``UserDict`` and its subclasses), else it becomes a ``dict``; a named tuple keeps its type;
    other tuples and lists become tuples. Anything else is returned as it is.
    """
    if isinstance(item, torch.Tensor):
        return function(item)
    if isinstance(item, Mapping):
        return _rebuilt({key: map_tensors(value, function) for key, value in item.items()}, item)
    if isinstance(item, tuple | list):
        values = [map_tensors(value, function) for value in item]
        return type(item)(*values) if hasattr(item, "_fields") else tuple(values)
    return item


def _rebuilt(mapped: dict, original: Mapping) -> Mapping:
    """``mapped`` as a mapping of ``original``'s type, or a ``dict`` where that type cannot be
    built from a dict (a ``defaultdict`` takes its default factory first)."""
    try:
        return type(original)(mapped)
    except (TypeError, ValueError):
        return mapped


GOLDEN = (5**0.5 - 1) / 2
FINGERPRINT_RTOL = 1e3  # times the epsilon of a tensor's dtype: rounding, not a change of data


@functools.lru_cache(maxsize=64)
def _feature_weights(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Distinct weights :math:`1 + \\{j\varphi\\}` per feature position (a fixed pattern, not
    random numbers: no generator involved), so that moving a value to another position within a
    sample (a flip, a crop) changes the sample's weighted sum."""
    positions = torch.arange(length, dtype=torch.float64)
    return (1 + torch.remainder(positions * GOLDEN, 1.0)).to(dtype=dtype, device=device)


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    r"""Three float64 numbers that summarize a tensor whose first dimension indexes samples.

    With :math:`p_i = \sum_j w_j x_{ij}` the weighted sum of sample :math:`i`: :math:`\sum_i
    p_i`, :math:`\sum_i p_i^2` and :math:`\sum_i |p_i|`. One matrix-vector product in the
    tensor's own dtype, so it costs about one read of the data (a float64 copy, squares and a
    sort per sample cost ~10x more). Invariant to the order of samples inside a batch, as is the
    loss; changed by swapping samples between batches, by noise, flips or crops of a sample.
    Compared with a tolerance (:func:`_same`), since rounding may depend on threads.
    """
    rows = torch.atleast_1d(tensor.detach())
    rows = rows.reshape(rows.shape[0], -1)
    if not rows.is_floating_point():
        rows = rows.to(torch.float64)
    sums = (rows @ _feature_weights(rows.shape[1], rows.dtype, rows.device)).to(torch.float64)
    return torch.stack([sums.sum(), sums.square().sum(), sums.abs().sum()])


def _same(a: torch.Tensor, b: torch.Tensor, dtypes: Sequence[torch.dtype]) -> bool:
    """Whether two batches' fingerprints (``(tensors, 3)``) agree within rounding of each
    tensor's dtype. NaN equals NaN: a NaN in the data is reported as a non-finite product, not as
    data that changed."""
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.nan_to_num(), b.nan_to_num()
    rtol = a.new_tensor([FINGERPRINT_RTOL * _epsilon(dtype) for dtype in dtypes])
    scale = torch.stack([a[:, 2], a[:, 1]], dim=1).abs() * rtol[:, None]
    return bool(((a[:, :2] - b[:, :2]).abs() <= scale).all())


def _epsilon(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


class DataSource:
    """A re-iterable, fingerprinted view of ``data`` that yields :class:`Batch` on ``device``.

    Parameters
    ----------
    data
        One ``(inputs, targets)`` batch, or a re-iterable collection of them (a list, a
        ``DataLoader``). A one-shot iterator such as a generator raises ``TypeError``; a
        collection with a length of zero raises ``ValueError``.
    device
        Where the batches are moved (the parameters' device).
    """

    def __init__(self, data: Any, device: torch.device):
        if is_single_batch(data):
            self._data: Iterable = [data]
        elif isinstance(data, Iterator):
            raise TypeError(
                f"data must be one (inputs, targets) batch or a re-iterable collection of batches "
                f"(a list, a DataLoader), got a one-shot iterator {type(data).__name__}: an "
                "operator passes over the data once per product, so pass list(data) instead"
            )
        elif isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping):
            self._data = data
        else:
            raise TypeError(
                "data must be one (inputs, targets) batch whose targets are a tensor, or a "
                f"re-iterable collection of such batches, got {type(data).__name__}"
            )
        if hasattr(self._data, "__len__") and len(self._data) == 0:
            raise ValueError("data must contain at least one batch, got an empty collection")
        if is_single_batch(data) and data[1].dim() > 0 and data[1].shape[0] == 0:
            raise ValueError(
                f"data must contain at least one sample, got a batch with targets of shape "
                f"{tuple(data[1].shape)}"
            )
        self.device = device
        self._reference: tuple[list[tuple], list[torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[Batch]:
        shapes: list[tuple] = []
        stats: list[torch.Tensor] = []
        for index, item in enumerate(self._data):
            if not is_single_batch(item):
                raise TypeError(
                    f"batch {index} of data must be an (inputs, targets) tuple or list whose "
                    f"targets are a tensor, got {type(item).__name__}"
                )
            inputs, targets = item
            batch = Batch(
                index, map_tensors(inputs, lambda t: t.to(self.device)), targets.to(self.device)
            )
            tensors = batch.tensors()
            shapes.append(tuple((tuple(t.shape), t.dtype) for t in tensors))
            stats.append(torch.stack([_fingerprint(t) for t in tensors]))
            self._check_shapes(shapes)
            yield batch
        if not shapes:
            raise ValueError("data yielded no batches: it must contain at least one batch")
        self._check_pass(shapes, stats)

    def _check_shapes(self, shapes: list[tuple]) -> None:
        if self._reference is None:
            return
        reference = self._reference[0]
        index = len(shapes) - 1
        if index >= len(reference) or reference[index] != shapes[index]:
            self._raise_changed(f"batch {index} differs in count or shape")

    def _check_pass(self, shapes: list[tuple], stats: list[torch.Tensor]) -> None:
        if self._reference is None:
            self._reference = (shapes, stats)
            return
        reference_shapes, reference_stats = self._reference
        if len(shapes) != len(reference_shapes):
            self._raise_changed(f"{len(shapes)} batches instead of {len(reference_shapes)}")
        dtypes = [dtype for signature in shapes for _, dtype in signature]
        if not _same(torch.cat(stats), torch.cat(reference_stats), dtypes):
            first = next(
                i
                for i, (a, b, signature) in enumerate(
                    zip(stats, reference_stats, shapes, strict=True)
                )
                if not _same(a, b, [dtype for _, dtype in signature])
            )
            self._raise_changed(f"the contents of batch {first} changed")

    @staticmethod
    def _raise_changed(what: str) -> None:
        raise RuntimeError(
            f"the data changed between products ({what}): every product must see the same "
            "batches, or the operator is a different matrix each time and eigensolvers, CG and "
            "estimators return garbage. Use a DataLoader with shuffle=False and no random "
            "augmentation, or pass a fixed list of batches."
        )
