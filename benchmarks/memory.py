"""One call in a fresh process: its wall time, products and peak memory.

``bench.py`` and ``gpu_suite.py`` run ``python benchmarks/memory.py SPEC`` once per measurement,
with ``SPEC`` a JSON object (see :class:`Spec`); the child prints one JSON line (see
:func:`measure`), and :func:`run_child` turns a crash, a timeout or memory running out into an
``error`` entry, so that one failure costs one figure, not the run.

The child builds the problem (imports, model and data: its ``baseline``), builds the operator,
warms it up (:func:`warm_up`) or only pays the process' one-time costs (:func:`prime`), times a
gradient, the call and another gradient (so that the call can also be expressed in gradients of
the same process; clocks read after the device's queued work has finished), and measures the call's peak memory with ``peaks.py``: on
CUDA ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, on the
CPU the resident set's high-water mark reset right before the call (or, where the reset is
refused, since the process started: this is why every call gets a fresh process). The report
says which (``peak_source``), the peak itself (``peak_mib``, absolute) and what the process
held right before the call (``before_mib``).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import models
import numpy as np
import peers
import torch
from harness import OPERATORS, ForwardCounter, elapsed, error_line, make_operator, now
from peaks import held_mib, measured_peak
from scipy.sparse.linalg import eigsh
from torch import nn

import curvop

MODULES = {
    "curvop": "curvop",
    "curvlinops": "curvlinops",
    "hessian-eigenthings": "hessian_eigenthings",
    "torch": "torch",
}
ALGORITHMS = (  # curvop's functions a child can call on an operator
    "top_eigenvalues",
    "spectral_density",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "xdiag",
    "hutchinson_diagonal",
)
CALLS = ("apply", "gradient", "eigsh", *ALGORITHMS)


@dataclass(frozen=True)
class Spec:
    """What one child measures.

    ``call`` is one of :data:`CALLS`: ``"apply"`` (one product with a seeded block of
    ``options["columns"]`` columns, default a vector), ``"gradient"`` (the loss' gradient,
    ``library="torch"``), ``"eigsh"`` (``scipy.sparse.linalg.eigsh(k, which="LA", tol)`` on the
    library's SciPy operator, from a seeded start) or one of curvop's algorithms with
    ``options`` in curvop's names (``num_probes``, ``num_steps``, ``k``, ``tol``,
    ``num_matvecs``, ``memory_gb``, ``seed``); hessian-eigenthings runs its own
    ``spectral_density`` under the same names. The operator is the ``kind`` (``"hessian"``,
    ``"ggn"``, ``"fd_hessian"``) of ``model`` (a key of ``models.MODELS``) at ``scale``.
    ``warm_up=False`` measures the call on a fresh operator, kernel choices included, as a
    user's first call (in a process that paid its one-time costs on a tiny model, see
    :func:`prime`).
    """

    model: str
    library: str
    call: str
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = "hessian"
    scale: str = "full"
    device: str = "cpu"
    seed: int = 0
    threads: int = 1
    warm_up: bool = True


def run_child(spec: Spec, timeout: float | None = None) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process; its JSON result, or ``{"error": ...}``."""
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(asdict(spec))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        reason = "killed (out of memory?)" if done.returncode in (-9, 137) else "exit"
        return {"error": f"{reason} {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the child
@dataclass(frozen=True)
class Prepared:
    """A call ready to measure: the call, a context manager counting its products (yielding a
    ``curvop.ProductCount``) and its warm-up."""

    call: Callable[[], Any]
    counted: Callable[[], AbstractContextManager[Any]]
    warm_up: Callable[[], None]


class _WarmedUp(Exception):
    """Raised by the warm-up's observer to end the warm-up call early."""


def warm_up(operator: Any, call: Callable[[], Any]) -> None:
    """Run ``call`` until its first product of a width it already multiplied: the first product
    of each width is where ``kernel="auto"`` chooses its kernel, so the timed call no longer
    pays for those choices (except at widths that first appear later, such as a shorter last
    chunk of probes). Uses only ``curvop.count_products``; a call that ends first ran whole."""
    seen: set[int] = set()

    def stop_at_repeat(columns: int) -> None:
        if columns in seen:
            raise _WarmedUp
        seen.add(columns)

    try:
        with curvop.count_products(operator, on_product=stop_at_repeat):
            call()
    except _WarmedUp:
        pass


def _curvop(problem: Any, spec: Spec) -> Prepared:
    """curvop's operator of ``spec.kind``: one product, ARPACK on it, or one of its algorithms."""
    operator = make_operator(problem, spec.kind)
    if spec.call == "apply":
        V = problem.vectors(spec.options.get("columns", 1), spec.seed)
        V = V[:, 0] if V.shape[1] == 1 else V
        call = lambda: operator.apply(V)  # noqa: E731
        return Prepared(call, lambda: curvop.count_products(operator), call)
    if spec.call == "eigsh":
        return _eigsh(operator, problem, spec, operator.apply)
    function = getattr(curvop, spec.call)
    call = lambda: function(operator, **spec.options)  # noqa: E731
    return Prepared(call, lambda: curvop.count_products(operator), lambda: warm_up(operator, call))


def _eigsh(scipy_operator: Any, problem: Any, spec: Spec, product: Callable) -> Prepared:
    """ARPACK's ``eigsh`` for the ``k`` largest eigenvalues at ``tol``, from a seeded start;
    ``product`` (a torch product of one vector) is the warm-up."""
    k, tol = spec.options.get("k", 1), spec.options.get("tol", 0.0)
    generator = np.random.default_rng(spec.seed)
    v0 = generator.standard_normal(scipy_operator.shape[0]).astype(scipy_operator.dtype)

    def call() -> Any:
        return eigsh(scipy_operator, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)

    vector = problem.vectors(1, spec.seed)[:, 0]
    return Prepared(call, lambda: curvop.count_products(scipy_operator), lambda: product(vector))


@contextmanager
def _forward_products(problem: Any) -> Iterator[Any]:
    """hessian-eigenthings' own operator is no SciPy operator, so ``curvop.count_products``
    cannot count it: its products are counted as model forwards over batches (its ``matvec``
    evaluates the model once per batch), single columns each. Filled in on exit."""
    count = curvop.ProductCount()
    with ForwardCounter(problem.model) as forwards:
        yield count
    count.calls = count.columns = forwards.count // len(problem.batches)


def _peer(library: str, problem: Any, spec: Spec) -> Prepared:
    """A peer's operator: ``eigsh`` on its SciPy face, or hessian-eigenthings' own SLQ."""
    peer = peers.build_peer(library, spec.kind, problem.model, problem.loss_fn, problem.batches)
    if peer is None:
        raise ValueError(f"{library} has no {spec.kind} operator")
    if spec.call == "eigsh":
        return _eigsh(peer.scipy(), problem, spec, peer.matvec)
    if library == "hessian-eigenthings" and spec.call == "spectral_density":
        return _eigenthings_slq(peer, problem, spec)
    raise ValueError(f"{library} is measured on eigsh (and SLQ for hessian-eigenthings) only")


def _eigenthings_slq(peer: Any, problem: Any, spec: Spec) -> Prepared:
    """hessian-eigenthings' own SLQ (``spectral_density``) on its Hessian operator."""
    import hessian_eigenthings as he  # an optional peer: imported where it is asked for

    options = spec.options

    def call() -> Any:
        with peers.math_attention():  # see peers.math_attention: it fails on SDPA otherwise
            return he.spectral_density(
                peer.native,
                num_runs=options["num_probes"],
                lanczos_steps=options["num_steps"],
                seed=options.get("seed"),
            )

    vector = problem.vectors(1, spec.seed)[:, 0]
    return Prepared(call, lambda: _forward_products(problem), lambda: peer.matvec(vector))


def _gradient(problem: Any) -> Prepared:
    """The loss' gradient over all batches (no products to count)."""

    @contextmanager
    def nothing() -> Iterator[Any]:
        yield curvop.ProductCount()

    return Prepared(problem.gradient, nothing, problem.gradient)


def prime(device: str) -> None:
    """Pay the process' one-time costs (torch.func's decompositions and the like, loaded by the
    first product of each kernel) on a tiny model of its own, so that a call measured without a
    warm-up is not charged for them: a block product of two columns by the Hessian and the GGN
    runs every candidate kernel."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).to(device)
    batch = (torch.ones(2, 2, device=device), torch.tensor([0, 1], device=device))
    for kind in ("hessian", "ggn"):
        operator = OPERATORS[kind](model, nn.CrossEntropyLoss(), [batch])
        operator.apply(torch.ones(operator.shape[0], 2, device=device))


def prepare(problem: Any, spec: Spec) -> Prepared:
    """The call ``spec`` asks for, on ``problem``."""
    if spec.call not in CALLS:
        raise ValueError(f"call must be one of {CALLS}, got {spec.call!r}")
    if spec.call == "gradient":
        return _gradient(problem)
    if spec.library == "curvop":
        return _curvop(problem, spec)
    return _peer(spec.library, problem, spec)


def _summary(result: Any) -> dict[str, Any]:
    """A few numbers of a result, to check that the calls did the same thing."""
    if hasattr(result, "std_error"):
        return {"trace": float(result.value), "std_error": float(result.std_error)}
    nodes = getattr(result, "nodes", getattr(result, "raw_eigenvalues", None))
    if nodes is not None:
        nodes = torch.as_tensor(nodes).double().cpu().numpy()
        return {"largest_node": float(np.nanmax(nodes)), "smallest_node": float(np.nanmin(nodes))}
    values = torch.as_tensor(result).double().cpu().reshape(-1)
    if values.numel() > 16:  # a product, a gradient or a diagonal: its norm
        return {"norm": float(values.norm())}
    return {"eigenvalues": values.tolist()}


def measure(spec: Spec) -> dict[str, Any]:
    """Build the problem, warm up, time a gradient, the call and a gradient; report."""
    torch.set_num_threads(spec.threads)
    importlib.import_module(MODULES[spec.library])  # its imports (scipy, ...) in the baseline
    problem = models.build(spec.model, spec.seed, spec.scale, spec.device)
    report: dict[str, Any] = {
        "name": problem.name,
        "n": problem.size,
        "itemsize": problem.dtype.itemsize,
        "baseline_mib": held_mib(spec.device),
    }
    try:
        prepared = prepare(problem, spec)
        if spec.warm_up:
            prepared.warm_up()
        else:
            prime(spec.device)
    except Exception as error:  # reported, not raised: the parent goes on
        return {**report, "error": error_line(error)}
    gradients = [elapsed(problem.gradient)]
    with measured_peak(spec.device) as peak, prepared.counted() as count:
        start = now()
        try:
            result = prepared.call()
            report["seconds"] = now() - start
            report.update(_summary(result))
        except Exception as error:
            report["error"] = error_line(error)
    del prepared
    gradients.append(elapsed(problem.gradient))
    report.update(
        columns=count.columns,
        calls=count.calls,
        gradient_seconds=sum(gradients) / 2,
        before_mib=peak.before_mib,
        peak_mib=peak.peak_mib,
        peak_source=peak.source,
    )
    return report


if __name__ == "__main__":
    print(json.dumps(measure(Spec(**json.loads(sys.argv[1])))), flush=True)
