"""One spectral call in a fresh process: its wall time, products and peak resident memory.

``bench.py`` runs ``python benchmarks/memory.py SPEC`` once per measurement, with ``SPEC`` a JSON
object (see :class:`Spec`); the child prints one JSON line (see :func:`measure`). A fresh process
per call makes the high-water mark of its resident set (which never goes down)
the peak of that call alone, on top of the process' own baseline: Python, torch, the model and
the data, which the child reports too (its resident set right after building them, before any
product). Nothing is subtracted from the peak. The peak is read from ``VmHWM`` rather than
``ru_maxrss`` (see :func:`_peak_mib`).

Inside the child, the operator is first warmed up (curvop: one product of each block width the
call will use, so that the kernel choice of ``kernel="auto"``, made on the first product of each
width, is not timed; hessian-eigenthings: one product), then a gradient, the call and another
gradient are timed, so that the call can also be expressed in gradients of the same process.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULES = {"curvop": "curvop", "hessian-eigenthings": "hessian_eigenthings"}
CALLS = ("top_eigenvalues", "spectral_density", "xtrace")


@dataclass(frozen=True)
class Spec:
    """What one child measures.

    ``call`` is one of :data:`CALLS` (hessian-eigenthings: ``spectral_density`` only), with
    ``options`` in curvop's names (``num_probes``, ``num_steps``, ``k``, ``tol``,
    ``num_matvecs``, ``memory_gb``, ``seed``); the Hessian of ``model`` (a key of
    ``models.MODELS``) is the operator.
    """

    model: str
    library: str
    call: str
    options: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    seed: int = 0
    threads: int = 1


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
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the child
def _status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (in kB there), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _resident_mib() -> float:
    """The current resident set of this process (``VmRSS``), in MiB."""
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    """The high-water mark of this process' resident set since it started (``VmHWM``), in MiB.

    Not ``ru_maxrss``: Linux carries it over ``fork`` and ``exec``, so a child of a large
    process reports at least its parent's resident set at the fork (850 MiB for a child whose
    own peak was 320 MiB, under ``bench.py``), while ``VmHWM`` belongs to the address space
    ``exec`` created.
    """
    return _status_mib("VmHWM")


def _counting(product: Callable, counts: dict[str, int]) -> Callable:
    """``product`` counting its calls (data passes) and columns in ``counts``."""

    def counted(V):
        counts["passes"] += 1
        counts["columns"] += 1 if V.dim() == 1 else V.shape[1]
        return product(V)

    return counted


def _curvop_call(problem: Any, spec: Spec, counts: dict[str, int]) -> Callable[[], Any]:
    """Build curvop's Hessian, warm it up on the widths ``spec.call`` uses; return the call."""
    import curvop
    from curvop.linalg.adapter import as_block_operator
    from curvop.linalg.density import probes_at_once

    operator = curvop.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    options = dict(spec.options)
    if spec.call == "top_eigenvalues":
        widths = [1, options["k"] + 1]
    elif spec.call == "xtrace":
        widths = [options["num_matvecs"] // 2]
    else:
        probes, steps = options["num_probes"], options["num_steps"]
        memory_gb = options.get("memory_gb", 1.0)
        block = as_block_operator(operator)
        chunk = probes_at_once(block, steps, block.dtype.itemsize, probes, memory_gb)
        widths = sorted({chunk, probes % chunk or chunk})
    for width in widths:
        operator.apply(problem.vectors(width, spec.seed))
    operator.block_product = _counting(operator.block_product, counts)  # every product's entry
    function = getattr(curvop, spec.call)
    return lambda: function(operator, **options)


def _eigenthings_call(problem: Any, spec: Spec, counts: dict[str, int]) -> Callable[[], Any]:
    """hessian-eigenthings' own SLQ (``spectral_density``) on its Hessian operator."""
    import hessian_eigenthings as he
    import peers

    if spec.call != "spectral_density":
        raise ValueError(
            f"hessian-eigenthings is measured on spectral_density only, not {spec.call}"
        )
    peer = peers.build_peer(
        "hessian-eigenthings", "hessian", problem.model, problem.loss_fn, problem.batches
    )
    operator = peer.native
    peer.matvec(problem.vectors(1, spec.seed)[:, 0])  # the warm-up
    operator.matvec = _counting(operator.matvec, counts)
    options = spec.options

    def call() -> Any:
        with peers.math_attention():  # see peers.math_attention: it fails on SDPA otherwise
            return he.spectral_density(
                operator,
                num_runs=options["num_probes"],
                lanczos_steps=options["num_steps"],
                seed=options.get("seed"),
            )

    return call


def _summary(result: Any) -> dict[str, Any]:
    """A few numbers of a result, to check that the calls did the same thing."""
    import numpy as np

    if hasattr(result, "std_error"):
        return {"trace": float(result.value), "std_error": float(result.std_error)}
    nodes = getattr(result, "nodes", getattr(result, "raw_eigenvalues", None))
    if nodes is not None:
        nodes = np.asarray(nodes, dtype=np.float64)
        return {"largest_node": float(np.nanmax(nodes)), "smallest_node": float(np.nanmin(nodes))}
    return {"eigenvalues": [float(v) for v in np.asarray(result).ravel()]}


def measure(spec: Spec) -> dict[str, Any]:
    """Build the problem, warm up, time a gradient, the call and a gradient; report."""
    import torch

    sys.path.insert(0, str(HERE))
    import models

    torch.set_num_threads(spec.threads)
    importlib.import_module(MODULES[spec.library])  # its imports (scipy, ...) in the baseline
    problem = models.build(spec.model, spec.seed, spec.quick)
    counts = {"passes": 0, "columns": 0}
    builders = {"curvop": _curvop_call, "hessian-eigenthings": _eigenthings_call}
    baseline = _resident_mib()  # imports, model and data
    call = builders[spec.library](problem, spec, counts)
    report: dict[str, Any] = {"n": problem.size, "baseline_mib": baseline}
    gradients = []
    start = time.perf_counter()
    problem.gradient()
    gradients.append(time.perf_counter() - start)
    start = time.perf_counter()
    try:
        result = call()
        report["seconds"] = time.perf_counter() - start
        report.update(_summary(result))
    except Exception as error:  # reported, not raised: the parent goes on
        report["error"] = f"{type(error).__name__}: {error}"
    start = time.perf_counter()
    problem.gradient()
    gradients.append(time.perf_counter() - start)
    report.update(counts, gradient_seconds=sum(gradients) / 2, peak_mib=_peak_mib())
    return report


if __name__ == "__main__":
    print(json.dumps(measure(Spec(**json.loads(sys.argv[1])))), flush=True)
