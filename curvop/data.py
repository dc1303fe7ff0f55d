"""Turn "one batch or a re-iterable collection of batches" into a uniform, checked loop.

A batch is a 2-tuple or 2-list ``(inputs, targets)`` whose second element is a tensor. Its sample
count is ``targets.shape[0]``. ``inputs`` is a tensor, a tuple of tensors (positional arguments
of the model) or a dict of tensors (keyword arguments).

Every pass records a cheap fingerprint of each batch (its sizes, and the sum and sum of squares of
every tensor in it, which are invariant to the order of samples inside a batch, as is the loss).
A later pass that sees different batches raises ``RuntimeError``: a shuffling or augmenting
loader would otherwise make every product a different matrix, and Lanczos, ARPACK and CG would
silently return garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "DataSource", "is_single_batch"]


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
        """Positional and keyword arguments for ``model(...)``."""
        if isinstance(self.inputs, dict):
            return (), self.inputs
        if isinstance(self.inputs, tuple):
            return self.inputs, {}
        return (self.inputs,), {}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, nested ones (in tuples, lists, dicts) included."""
        return list(_tensors((self.inputs, self.targets)))

    def cast(self, dtype: torch.dtype) -> Batch:
        """The batch with every floating-point tensor converted to ``dtype`` (integer tensors,
        such as class labels or token ids, unchanged)."""

        def convert(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        return Batch(self.index, _map_tensors(self.inputs, convert), convert(self.targets))


def _tensors(item: Any) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, dict | tuple | list):
        for value in item.values() if isinstance(item, dict) else item:
            yield from _tensors(value)


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` batch rather than a collection of batches."""
    return isinstance(data, tuple | list) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def _map_tensors(item: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``item`` with ``function`` applied to every tensor in it (lists become tuples)."""
    if isinstance(item, torch.Tensor):
        return function(item)
    if isinstance(item, dict):
        return {key: _map_tensors(value, function) for key, value in item.items()}
    if isinstance(item, tuple | list):
        return tuple(_map_tensors(value, function) for value in item)
    return item


def _fingerprint(batch: Batch) -> torch.Tensor:
    """Sum and sum of squares of every tensor of the batch, in float64, without a host sync.

    Each sample's sums are sorted before they are added up, so the fingerprint is bitwise
    invariant to the order of samples inside a batch (a plain sum is not: floating-point addition
    is not associative), as is a mean or sum loss.
    """
    stats = []
    for tensor in batch.tensors():
        rows = torch.atleast_1d(tensor.detach().to(torch.float64)).unsqueeze(-1).flatten(1)
        for values in (rows, rows.square()):
            stats.append(values.sum(1).sort().values.sum())
    return torch.stack(stats)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of fingerprints, with NaN equal to NaN (a NaN in the data is reported as a
    non-finite product, not as data that changed)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


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
        elif isinstance(data, Iterable) and not isinstance(data, str | bytes | dict):
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
                index, _map_tensors(inputs, lambda t: t.to(self.device)), targets.to(self.device)
            )
            shapes.append(tuple(tuple(t.shape) for t in batch.tensors()))
            stats.append(_fingerprint(batch))
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
        if not _same(torch.cat(stats), torch.cat(reference_stats)):
            first = next(
                i
                for i, (a, b) in enumerate(zip(stats, reference_stats, strict=True))
                if not _same(a, b)
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
