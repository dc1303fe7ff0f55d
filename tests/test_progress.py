"""progress=True: a bar that counts the column products of long calls (tqdm, optional)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from linalg_cases import dense_case, hessian

import curvop


class RecordingBar:
    """Stands in for tqdm.auto.tqdm and records what a call reported."""

    made: list[RecordingBar] = []

    def __init__(self, total=None, desc=None, **_):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        RecordingBar.made.append(self)

    def update(self, count):
        self.n += count

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    RecordingBar.made = []
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    return RecordingBar.made


CALLS = {
    "top_eigenvalues": lambda op: curvop.top_eigenvalues(op, 2, seed=0, progress=True),
    "spectral_density": lambda op: curvop.spectral_density(
        op, num_probes=3, num_steps=10, seed=0, progress=True
    ),
    "kpm": lambda op: curvop.spectral_density(
        op, method="kpm", num_probes=3, num_steps=10, seed=0, progress=True
    ),
    "lanczos": lambda op: curvop.lanczos(op, 7, seed=0, progress=True),
    "solve_damped": lambda op: curvop.solve_damped(op, np.ones(op.shape[0]), 1.0, progress=True),
    "to_dense": lambda op: op.to_dense(progress=True),
}


@pytest.mark.parametrize("name", CALLS)
def test_the_bar_counts_every_column_product(name, bars):
    op = hessian()
    with curvop.count_products(op) as count:
        CALLS[name](op)
    (shown,) = bars
    assert shown.closed and shown.n > 0
    # solve_damped checks symmetry first (two columns), before its bar starts
    assert shown.n == count.columns - (2 if name == "solve_damped" else 0)
    if name in ("spectral_density", "lanczos", "to_dense"):
        assert shown.total == shown.n  # known in advance


def test_no_bar_by_default(bars):
    curvop.top_eigenvalues(hessian(), 2, seed=0)
    assert bars == []


def test_without_tqdm_progress_warns_and_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    op, _, eigenvalues = dense_case("indefinite")
    with pytest.warns(UserWarning, match="progress=True needs tqdm"):
        values = curvop.top_eigenvalues(op, 1, seed=0, progress=True)
    assert values[0] == pytest.approx(eigenvalues.max())


def test_progress_must_be_a_bool():
    with pytest.raises(TypeError, match="progress must be True or False, got str"):
        curvop.lanczos(hessian(), 3, seed=0, progress="yes")
    with pytest.raises(TypeError, match="progress must be True or False"):
        hessian().to_dense(progress=1)


def test_a_bar_is_closed_when_the_call_raises(bars):
    op = hessian()
    op._block_product = lambda V, memory_bytes: (_ for _ in ()).throw(KeyError("boom"))
    with pytest.raises(KeyError):
        curvop.top_eigenvalues(op, 1, seed=0, progress=True)
    assert bars[0].closed
