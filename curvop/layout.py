"""Flat vectors <-> lists of parameter-shaped tensors.

SciPy and curvop's estimators see the parameters as one flat vector of length ``n``; autograd
sees a list of tensors. :class:`ParamLayout` converts between the two, for single vectors
``(n,)`` and for blocks of ``k`` column vectors ``(n, k)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = ["ParamLayout", "as_tensor_list"]


def as_tensor_list(tensors: torch.Tensor | Iterable[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Return ``tensors`` (one tensor or an iterable of tensors) as a list of tensors."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    items = list(tensors) if isinstance(tensors, Iterable) else None
    if items is None or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(
            f"{name} must be a tensor or a sequence of tensors, got {type(tensors).__name__}"
        )
    return items


class ParamLayout:
    """The flatten/unflatten adapter between flat vectors and parameter-shaped tensors.

    Parameters
    ----------
    params
        The parameters (tensors) that define the layout. All must share one dtype and device.

    Attributes
    ----------
    size : int
        Total number of entries ``n``.
    shapes : list of torch.Size
        The parameters' shapes, in order.
    dtype : torch.dtype
    device : torch.device

    Examples
    --------
    >>> layout = ParamLayout([torch.zeros(2, 3), torch.zeros(4)])
    >>> layout.size
    10
    >>> [t.shape for t in layout.unflatten(torch.arange(10.0))]
    [torch.Size([2, 3]), torch.Size([4])]
    """

    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor]):
        params = as_tensor_list(params, "params")
        if not params:
            raise ValueError("params must contain at least one tensor, got an empty sequence")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                "params must share one dtype and one device, got dtypes "
                f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}"
            )
        if params[0].is_complex() or not params[0].is_floating_point():
            raise TypeError(f"params must be real floating point, got dtype {params[0].dtype}")
        self.shapes: list[torch.Size] = [p.shape for p in params]
        self.numels: list[int] = [p.numel() for p in params]
        self.size: int = sum(self.numels)
        self.dtype: torch.dtype = params[0].dtype
        self.device: torch.device = params[0].device

    def __repr__(self) -> str:
        return f"ParamLayout(size={self.size}, tensors={len(self.shapes)}, dtype={self.dtype})"

    def flatten(self, tensors: Sequence[torch.Tensor], name: str = "tensors") -> torch.Tensor:
        """Concatenate parameter-shaped tensors into a flat ``(size,)`` or ``(size, k)`` tensor.

        Each tensor has its parameter's shape, optionally followed by one column axis ``k``
        (the same ``k`` for all). ``name`` is the argument named in error messages.
        """
        tensors = as_tensor_list(tensors, name)
        if len(tensors) != len(self.shapes):
            raise ValueError(f"{name} must hold {len(self.shapes)} tensors, got {len(tensors)}")
        first, shape0 = tensors[0], self.shapes[0]
        columns = first.shape[len(shape0) :] if first.dim() == len(shape0) + 1 else ()
        for i, (t, shape) in enumerate(zip(tensors, self.shapes, strict=True)):
            if t.shape != torch.Size((*shape, *columns)):
                raise ValueError(
                    f"{name}[{i}] must have shape {tuple(shape) + tuple(columns)}, "
                    f"got {tuple(t.shape)}"
                )
        return torch.cat([t.reshape(-1, *columns) for t in tensors])

    def unflatten(self, vector: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Split a flat ``(size,)`` or ``(size, k)`` vector into parameter-shaped tensors.

        Numpy input is converted; the result is on the parameters' device and dtype, each tensor
        shaped like its parameter with the trailing ``k`` axis kept.
        """
        return self.split(self.check_vector(vector, "vector", allow_numpy=True))

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of a checked ``(size,)`` / ``(size, k)`` tensor shaped like the parameters.

        No validation and no copy (any dtype): writing into a view writes into ``vector``.
        """
        columns = tuple(vector.shape[1:])
        offsets = itertools.accumulate(self.numels, initial=0)
        # narrow, not torch.split: autograd allows in-place writes into single views only
        return [
            vector.narrow(0, offset, numel).view((*shape, *columns))
            for offset, numel, shape in zip(offsets, self.numels, self.shapes, strict=False)
        ]

    def check_vector(
        self, vector: torch.Tensor | np.ndarray, name: str, *, allow_numpy: bool = False
    ) -> torch.Tensor:
        """Validate a flat ``(size,)`` / ``(size, k)`` vector and return it as a torch tensor.

        Numpy arrays (when ``allow_numpy``) are converted to the layout's dtype and device. A
        torch tensor must already be on the layout's device with its dtype: no silent copies.
        """
        if isinstance(vector, np.ndarray) and allow_numpy:
            if np.iscomplexobj(vector):
                raise TypeError(f"{name} must be real, got complex dtype {vector.dtype}")
            vector = torch.as_tensor(vector, dtype=self.dtype, device=self.device)
        elif not isinstance(vector, torch.Tensor):
            kinds = "a torch tensor or numpy array" if allow_numpy else "a torch tensor"
            raise TypeError(f"{name} must be {kinds}, got {type(vector).__name__}")
        if vector.is_complex():
            raise TypeError(f"{name} must be real, got complex dtype {vector.dtype}")
        if vector.dim() not in (1, 2) or vector.shape[0] != self.size:
            raise ValueError(
                f"{name} must have shape ({self.size},) or ({self.size}, k), got {tuple(vector.shape)}"
            )
        if vector.dtype != self.dtype or vector.device != self.device:
            if not allow_numpy:
                raise ValueError(
                    f"{name} must have dtype {self.dtype} on device {self.device}, got dtype "
                    f"{vector.dtype} on device {vector.device} (convert it explicitly with .to())"
                )
            vector = vector.to(dtype=self.dtype, device=self.device)
        return vector
