"""Optional progress bars for long calls: columns multiplied so far, with tqdm when installed.

Every long function of the toolkit (and ``to_dense``) takes ``progress=False``; ``True`` shows a
bar that counts the operator's column products (with the total where it is known in advance:
estimators, SLQ, ``to_dense``; a running count where it is not: eigensolvers, solves). tqdm picks
a notebook widget or a terminal bar by itself (``tqdm.auto``). It is an optional dependency
(``pip install tqdm``, part of the ``demo`` extra); without it ``progress=True`` warns once and
runs silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .counting import count_products

__all__ = ["bar", "counting"]


@contextmanager
def bar(enabled: bool, total: int | None, description: str) -> Iterator[Any]:
    """A tqdm bar (or ``None`` when disabled or tqdm is missing), closed on exit."""
    if not isinstance(enabled, bool):
        raise TypeError(f"progress must be True or False, got {type(enabled).__name__}")
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn(
            "progress=True needs tqdm (pip install tqdm); running without a progress bar",
            UserWarning,
            stacklevel=4,
        )
        yield None
        return
    progress = tqdm(total=total, desc=description, unit=" products", leave=False)
    try:
        yield progress
    finally:
        progress.close()


@contextmanager
def counting(op: Any, enabled: bool, total: int | None, description: str) -> Iterator[None]:
    """Inside the block, every product of ``op`` advances a bar (when ``enabled``) by the number
    of columns it multiplies."""
    with bar(enabled, total, description) as progress:
        if progress is None:
            yield
            return
        with count_products(op, progress.update):
            yield
