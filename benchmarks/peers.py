"""Adapters that put the peer libraries behind one small interface, for ``bench.py`` only.

The peers (``curvlinops-for-pytorch`` and ``hessian-eigenthings``) are never dependencies of
curvop: install them by hand to include them in the benchmark (see ``benchmarks/README.md``).
Each adapter builds an operator on the same model and batches as curvop and exposes

- ``matvec(v)``: a torch ``(n,)`` -> ``(n,)`` product in the parameters' dtype (curvlinops also
  takes an ``(n, k)`` block; hessian-eigenthings has no block product);
- ``scipy()``: a SciPy ``LinearOperator`` with an explicit ``dtype`` (no trial product), for
  ``eigsh``;
- ``native``: the library's own operator, for its own algorithms (hessian-eigenthings'
  ``spectral_density``).

Only the public constructors of the peers are used (their signatures were read from the
installed sources: curvlinops 3.0, hessian-eigenthings 1.0.0a5).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

__all__ = ["KINDS", "PeerOperator", "available_peers", "build_peer", "peer_version"]

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Matvec = Callable[[torch.Tensor], torch.Tensor]

KINDS = ("hessian", "ggn", "fd_hessian")
MODULES = {"curvlinops": "curvlinops", "hessian-eigenthings": "hessian_eigenthings"}
DISTRIBUTIONS = {
    "curvlinops": "curvlinops-for-pytorch",
    "hessian-eigenthings": "hessian-eigenthings",
}


@dataclass(frozen=True)
class PeerOperator:
    """One peer's operator on one problem: a torch product and a SciPy face."""

    library: str
    kind: str
    matvec: Matvec
    scipy: Callable[[], LinearOperator]
    native: Any = None  # the library's own operator object (for its own algorithms)


def _import(library: str) -> Any | None:
    try:
        return importlib.import_module(MODULES[library])
    except Exception:  # an import error of any of the peer's own dependencies counts as absent
        return None


def available_peers() -> list[str]:
    """The peer libraries that import cleanly here, in a fixed order."""
    return [library for library in MODULES if _import(library) is not None]


def peer_version(library: str) -> str:
    """The installed version of a peer, or ``"?"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTIONS[library])
    except PackageNotFoundError:
        return "?"


@contextmanager
def math_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` on its math backend, as curvop runs it: its fused CPU
    backend has neither a forward-mode derivative (curvlinops raises ``NotImplementedError:
    Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu``) nor a double
    backward (hessian-eigenthings raises ``derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``). A no-op
    for models without attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _with_math_attention(matvec: Matvec) -> Matvec:
    def product(v: torch.Tensor) -> torch.Tensor:
        with math_attention():
            return matvec(v)

    return product


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _wrap_scipy(matvec: Matvec, n: int, dtype: torch.dtype, device: torch.device) -> LinearOperator:
    """A SciPy operator with an explicit dtype around a torch product on ``device`` (no trial
    product)."""

    def numpy_matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)
        return matvec(v).cpu().numpy()

    return LinearOperator((n, n), matvec=numpy_matvec, dtype=_numpy_dtype(dtype))


def _curvlinops(
    kind: str, model: nn.Module, loss_fn: nn.Module, batches: Batches, defaults: bool
) -> PeerOperator | None:
    curvlinops = _import("curvlinops")
    classes = {"hessian": "HessianLinearOperator", "ggn": "GGNLinearOperator"}
    if curvlinops is None or kind not in classes:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    # Without the defaults: no determinism check (two gradient passes and two products) and a
    # known sample count (no extra traversal of the data), so construction costs nothing.
    options = {} if defaults else {"check_deterministic": False, "num_data": _num_samples(batches)}
    operator = getattr(curvlinops, classes[kind])(model, loss_fn, params, batches, **options)
    dtype = params[0].dtype

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return operator @ v

    return PeerOperator(
        "curvlinops", kind, matvec, lambda: operator.to_scipy(_numpy_dtype(dtype)), operator
    )


def _eigenthings(
    kind: str, model: nn.Module, loss_fn: nn.Module, batches: Batches, defaults: bool
) -> PeerOperator | None:
    he = _import("hessian-eigenthings")
    if he is None:
        return None
    if kind == "ggn":
        operator = he.GGNOperator(
            model, batches, he.supervised_forward, he.supervised_loss_of_output(loss_fn)
        )
    else:
        method = "finite_difference" if kind == "fd_hessian" else "autograd"
        operator = he.HessianOperator(model, batches, he.supervised_loss(loss_fn), method=method)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return operator.matvec(v).detach()

    return PeerOperator(
        "hessian-eigenthings",
        kind,
        matvec,
        lambda: _wrap_scipy(matvec, operator.size, operator.dtype, operator.device),
        operator,
    )


def _num_samples(batches: Batches) -> int:
    return sum(int(x.shape[0]) for x, _ in batches)


def build_peer(
    library: str,
    kind: str,
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Batches,
    *,
    defaults: bool = False,
) -> PeerOperator | None:
    """The peer's operator of ``kind`` (one of :data:`KINDS`), or ``None`` when it has none.

    ``defaults=True`` builds it with the library's default options (to count the passes its
    construction makes); otherwise with the options that make construction free. Its
    ``matvec`` runs attention on the math backend (see :func:`math_attention`); its ``scipy``
    and ``native`` faces do not.
    """
    builders = {"curvlinops": _curvlinops, "hessian-eigenthings": _eigenthings}
    peer = builders[library](kind, model, loss_fn, batches, defaults)
    return None if peer is None else replace(peer, matvec=_with_math_attention(peer.matvec))
