"""Sections 3, 4 and 5 of ``bench.py``: curvop's spectral algorithms, time and memory.

3. ``curvop.top_eigenvalues`` against ``scipy.sparse.linalg.eigsh`` on the same operator at the
same ``tol``; 4. ``curvop.spectral_density`` (SLQ) against hessian-eigenthings' own SLQ, time and
peak memory, each call in a fresh process; 5. the peak memory of curvop's spectral calls with
their default budget, against one product's peak plus the vectors each method must hold, and
on ResNet-18 against 6 GiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

import memory
import numpy as np
from harness import (
    Config,
    Ratio,
    Targets,
    Task,
    fmt,
    log,
    make_operator,
    peer_libraries,
    problem_of,
    ratios_to_gradient,
    section,
    table,
)
from models import Problem
from scipy.sparse.linalg import eigsh

import curvop

FALLBACK_MEMORY_GB = 2.0  # memory_gb of a rerun when curvop's default budget cannot hold a call
MIB_PER_GIB = 1024
LONG_CALL = 60.0  # seconds: an SLQ call this long is not repeated
FLOAT64 = 8  # bytes


# ----------------------------------------------------------------------------- 3. eigensolvers
@dataclass(frozen=True)
class SolverRun:
    """One eigensolver on one operator: time, products, the eigenvalues."""

    ratio: Ratio
    calls: int
    columns: int
    values: np.ndarray


def _solver_tasks(
    operator: curvop.CurvatureOperator, config: Config, results: dict[str, object]
) -> dict[Hashable, Task]:
    """curvop's ``top_eigenvalues`` and ARPACK's ``eigsh`` at the same ``tol``, from seeded
    starts, recording their eigenvalues and products in ``results``."""
    k, tol, seed = config.eig_k, config.eig_tol, config.seed
    v0 = np.random.default_rng(seed).standard_normal(operator.shape[0]).astype(operator.dtype)
    calls = {
        "curvop": lambda: curvop.top_eigenvalues(operator, k, tol=tol, seed=seed),
        "eigsh": lambda: eigsh(
            operator, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False
        ),
    }
    memory.warm_up(operator, calls["curvop"])  # kernel choices and the block-or-single decision

    def counted(name: str, call: Callable[[], np.ndarray]) -> Task:
        def task() -> None:
            with curvop.count_products(operator) as count:
                values = np.sort(np.asarray(call(), dtype=np.float64))[::-1]
            results[name] = (count, values)

        return task

    return {name: counted(name, call) for name, call in calls.items()}


def measure_solvers(model: str, config: Config) -> tuple[Problem, dict[str, SolverRun], float]:
    """Both solvers on the warmed-up Hessian of ``model``, interleaved (ABBA for two repeats)."""
    problem = problem_of(model, config)
    operator = make_operator(problem, "hessian")
    results: dict[str, object] = {}
    tasks = _solver_tasks(operator, config, results)
    ratios, gradient = ratios_to_gradient(
        tasks, problem.gradient, config.long_repeats, calibrated=False
    )
    runs = {
        name: SolverRun(
            ratio,
            results[name][0].calls,
            results[name][0].columns,
            results[name][1],
        )
        for name, ratio in ratios.items()
    }
    return problem, runs, gradient


def bench_eigen(config: Config, targets: Targets) -> str:
    """Section 3: ``top_eigenvalues(k=5)`` against ``eigsh(k=5, which="LA")``, same tolerance."""
    rows = []
    for model in config.solver_models:
        began = time.perf_counter()
        problem, runs, gradient = measure_solvers(model, config)
        log(f"eigensolvers on {model}: {time.perf_counter() - began:.0f} s")
        ours, theirs = runs["curvop"], runs["eigsh"]
        speed = ours.ratio.median / theirs.ratio.median
        gap = float(np.max(np.abs(ours.values - theirs.values)) / np.max(np.abs(theirs.values)))
        for name, run in runs.items():
            rows.append(
                [
                    problem.name,
                    f"{problem.size:,}",
                    name,
                    run.columns,
                    run.calls,
                    f"{run.ratio.seconds:.1f}",
                    run.ratio,
                    f"{speed:.2f}" if name == "curvop" else "",
                    ", ".join(f"{value:.4g}" for value in run.values),
                    f"{gap:.1e}" if name == "curvop" else "",
                ]
            )
        limit = 0.67 if model == "mlp" else 1.0
        figures = f"{fmt(ours.ratio.median)} vs {fmt(theirs.ratio.median)} gradients: {speed:.2f}x"
        targets.check(
            f"top-{config.eig_k} ≤ {limit}x eigsh's time", problem.name, figures, speed <= limit
        )
    headers = [
        "model",
        "n",
        "solver",
        "products (columns)",
        "calls",
        "time (s)",
        "time (gradients)",
        "curvop / eigsh",
        f"top {config.eig_k}",
        "max |Δλ| / max |λ|",
    ]
    return section(
        f"3. Top-{config.eig_k} eigenvalues: curvop.top_eigenvalues against eigsh",
        _EIGEN_INTRO.format(k=config.eig_k, tol=config.eig_tol, repeats=config.long_repeats),
        table(headers, rows),
    )


_EIGEN_INTRO = (
    'The Hessian (`kernel="auto"`, float32), warmed up by a call of `top_eigenvalues` that '
    "stops at its first product of a width it already multiplied (so that the kernel chosen at "
    "each width and the choice between blocks and single vectors are not timed); then "
    "`curvop.top_eigenvalues(H, k={k}, tol={tol:g}, seed=0)` and "
    '`scipy.sparse.linalg.eigsh(H, k={k}, which="LA", tol={tol:g}, v0=...)` on the same '
    "operator, interleaved with gradients, {repeats} run(s) each (alternating which goes first). "
    "The tolerances are not the same criterion: curvop stops when every wanted Ritz pair has "
    "‖Az − θz‖ ≤ tol·‖A‖ (‖A‖ estimated by the largest Ritz value and product column seen), "
    "ARPACK when ‖Az − θz‖ ≤ tol·|θ| for each one (here in float32 ARPACK, since the operator is "
    "float32), so eigsh's is the stricter of the two by ‖A‖/|θ| for eigenvalues below the top. "
    "Products are the columns multiplied, calls the product calls (one pass over the data "
    "each): curvop multiplies blocks of k + 1 columns where a column in a block costs enough "
    "less than one alone, else single vectors; the last column compares the two results."
)


# ----------------------------------------------------------------------------- 4. SLQ
def _child(spec: memory.Spec, config: Config) -> dict[str, object]:
    """Run ``spec`` in a fresh process; rerun it with :data:`FALLBACK_MEMORY_GB` if curvop's
    default budget could not hold it (the result then says so)."""
    result = memory.run_child(spec, config.timeout)
    error = str(result.get("error", ""))
    if spec.library == "curvop" and "memory_gb" in error and "memory_gb" not in spec.options:
        retry = replace(spec, options={**spec.options, "memory_gb": FALLBACK_MEMORY_GB})
        result = {**memory.run_child(retry, config.timeout), "default_error": error}
    return result


def _spec(
    model: str, library: str, call: str, options: dict, config: Config, *, warm_up: bool = True
) -> memory.Spec:
    """What a child measures, at the run's scale, device, seed and threads."""
    return memory.Spec(
        model,
        library,
        call,
        options,
        scale=config.scale,
        device=config.device,
        seed=config.seed,
        threads=config.threads,
        warm_up=warm_up,
    )


def _slq_runs(model: str, probes: int, steps: int, config: Config) -> dict[str, list[dict]]:
    """curvop's and hessian-eigenthings' SLQ, each in fresh processes, alternating first."""
    peers = [name for name in peer_libraries(config) if name == "hessian-eigenthings"]
    libraries = ["curvop", *peers]
    options = {"num_probes": probes, "num_steps": steps, "seed": config.seed}
    results: dict[str, list[dict]] = {library: [] for library in libraries}
    for repeat in range(config.long_repeats):
        for library in libraries if repeat % 2 == 0 else libraries[::-1]:
            results[library].append(
                _child(_spec(model, library, "spectral_density", options, config), config)
            )
        if max(float(runs[-1].get("seconds", 0)) for runs in results.values()) > LONG_CALL:
            break  # calls of minutes: their noise is small next to their length
    return results


def _median(results: list[dict], key: str) -> float | None:
    values = [float(result[key]) for result in results if key in result]
    return float(np.median(values)) if values else None


def _in_gradients(results: list[dict]) -> float | None:
    values = [r["seconds"] / r["gradient_seconds"] for r in results if "seconds" in r]
    return float(np.median(values)) if values else None


def _above(results: list[dict]) -> float | None:
    """The median peak above what the process held right before the call (MiB)."""
    values = [r["peak_mib"] - r["before_mib"] for r in results if "seconds" in r]
    return float(np.median(values)) if values else None


def _budget(results: list[dict]) -> str:
    """The memory_gb curvop ran with, and the default's error if it needed the fallback."""
    failed = next((r["default_error"] for r in results if "default_error" in r), None)
    return f"{FALLBACK_MEMORY_GB:g} (the default raised: {failed})" if failed else "default"


def _failure(results: list[dict]) -> str | None:
    """The first error, if no run succeeded."""
    errors = [str(r["error"]) for r in results if "error" in r]
    return None if any("seconds" in r for r in results) or not errors else errors[0]


def _peak_sources(results: list[dict]) -> str:
    """How the children measured their peaks (see ``peaks.py``)."""
    sources = sorted({str(r["peak_source"]) for r in results if "peak_source" in r})
    return ", ".join(sources) or "no child reported"


def _memory_cells(results: list[dict], *, gradients: bool = True) -> list[str]:
    """Time (s), time in gradients (if asked), products, calls, the memory held before the call,
    its peak and the peak above before (MiB), medians; the error where every run failed."""
    width = 7 if gradients else 6
    failure = _failure(results)
    if failure is not None:
        return [f"fails: {failure}", *[""] * (width - 1)]
    cells = [f"{_median(results, 'seconds'):.1f}"]
    cells += [fmt(_in_gradients(results))] if gradients else []
    return cells + [
        f"{_median(results, 'columns'):.0f}",
        f"{_median(results, 'calls'):.0f}",
        f"{_median(results, 'before_mib'):.0f}",
        f"{_median(results, 'peak_mib'):.0f}",
        f"{_above(results):.0f}",
    ]


MEMORY_HEADERS = ["products", "calls", "before (MiB)", "peak (MiB)", "above before (MiB)"]


def bench_slq(config: Config, targets: Targets) -> str:
    """Section 4: SLQ of curvop and of hessian-eigenthings, wall time and peak memory."""
    rows, every = [], []
    for model in config.models:
        for probes, steps in config.slq:
            began = time.perf_counter()
            results = _slq_runs(model, probes, steps, config)
            log(f"SLQ {probes}x{steps} on {model}: {time.perf_counter() - began:.0f} s")
            name = str(results["curvop"][0].get("name", model))
            for library, runs in results.items():
                budget = _budget(runs) if library == "curvop" else "–"
                rows.append([name, f"{probes} x {steps}", library, budget, *_memory_cells(runs)])
                every += runs
            _check_slq(model, name, probes, steps, results, targets)
    headers = ["model", "probes x steps", "library", "curvop memory_gb", "time (s)"]
    headers += ["time (gradients)", *MEMORY_HEADERS]
    intro = _SLQ_INTRO.format(repeats=config.long_repeats, source=_peak_sources(every))
    return section(
        "4. Spectral density (SLQ): curvop against hessian-eigenthings", intro, table(headers, rows)
    )


_SLQ_INTRO = (
    "`curvop.spectral_density(H, num_probes=p, num_steps=m, seed=0)` (Rademacher probes, full "
    "reorthogonalization with the basis in the operator's dtype, float32; as many probes side "
    "by side as `memory_gb` holds, at least one, their products as one block per step) against "
    "hessian-eigenthings' own SLQ, `hessian_eigenthings.spectral_density(op, num_runs=p, "
    "lanczos_steps=m)` (one probe after the other, single products, full reorthogonalization "
    "in the operator's dtype, float32), both on the Hessian of the same model and data. Each "
    "call runs in a fresh process ({repeats} process(es) each, alternating which goes first, "
    "one each where a call took over a minute; medians) after a warm-up (curvop: the call up to "
    "its first product of a width it already multiplied; hessian-eigenthings: one product); "
    "time in seconds and in gradients of the same process (timed right before and after the "
    "call). Products are the columns multiplied, calls the product calls (passes over the data; "
    "hessian-eigenthings' counted as model forwards per batch). Memory: {source}; before = "
    "what the process held right before the call (imports, model, data, operator), peak = its "
    "high-water mark during the call (absolute), above before = the difference."
)


def _check_slq(
    model: str, name: str, probes: int, steps: int, results: dict, targets: Targets
) -> None:
    """SLQ ≤ 0.67x hessian-eigenthings' time on the MLP, ≤ 1.0x elsewhere; peak ≤ 1.5x."""
    if "hessian-eigenthings" not in results:
        return
    ours, theirs = results["curvop"], results["hessian-eigenthings"]
    case = f"{name}, {probes} x {steps}"
    time_ours, time_theirs = _in_gradients(ours), _in_gradients(theirs)
    limit = 0.67 if model == "mlp" else 1.0
    if time_ours is not None and time_theirs is not None:
        speed = time_ours / time_theirs
        figures = f"{fmt(time_ours)} vs {fmt(time_theirs)} gradients: {speed:.2f}x"
        targets.check(f"SLQ ≤ {limit}x hessian-eigenthings' time", case, figures, speed <= limit)
    else:
        targets.check(f"SLQ ≤ {limit}x hessian-eigenthings' time", case, "a call failed", None)
    if _failure(ours) is None and _failure(theirs) is None:
        peak_ours, peak_theirs = _median(ours, "peak_mib"), _median(theirs, "peak_mib")
        ratio = peak_ours / peak_theirs
        figures = f"{peak_ours:.0f} vs {peak_theirs:.0f} MiB: {ratio:.2f}x ({_budget(ours)})"
        targets.check("SLQ peak memory ≤ 1.5x hessian-eigenthings'", case, figures, ratio <= 1.5)


# ----------------------------------------------------------------------------- 5. memory
ESTIMATORS = ("hutchinson_trace", "hutchpp_trace", "xtrace", "xdiag")
MEMORY_CALLS = {"resnet18": ("top_eigenvalues", "spectral_density", "xtrace")}  # else all
PRODUCT_MULTIPLE = 5  # a call's peak above before: at most this many products' plus its vectors
RESNET18_LIMIT_GIB = 6.0  # each call's resident peak on ResNet-18 (11.2M parameters), CPU


def memory_calls(model: str, config: Config) -> list[tuple[str, dict[str, object]]]:
    """One product, then the spectral calls of section 5 on ``model``, with their options."""
    probes, steps = config.slq[0]
    seed = config.seed
    options = {
        "top_eigenvalues": {"k": config.eig_k, "tol": config.eig_tol, "seed": seed},
        "spectral_density": {"num_probes": probes, "num_steps": steps, "seed": seed},
        **{name: {"num_matvecs": config.trace_matvecs, "seed": seed} for name in ESTIMATORS},
    }
    names = MEMORY_CALLS.get(model, tuple(options))
    return [("apply", {}), *[(name, options[name]) for name in names]]


def held_vectors_mib(call: str, options: dict, n: int, itemsize: int) -> float | None:
    """The n-vectors ``call`` must hold at once, in MiB: for the top k, ARPACK's basis of
    max(2k + 2, 20) float64 vectors; for SLQ, the p x m Lanczos vectors in the operator's dtype
    (``itemsize`` bytes); for the estimators, every probe and its product in float64. ``None``
    for one product, the reference."""
    if call == "top_eigenvalues":
        vectors, size = max(2 * int(options["k"]) + 2, 20), FLOAT64
    elif call == "spectral_density":
        vectors, size = int(options["num_probes"]) * int(options["num_steps"]), itemsize
    elif call in ESTIMATORS:
        vectors, size = 2 * int(options["num_matvecs"]), FLOAT64
    else:
        return None
    return vectors * n * size / 2**20


def _shown(options: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items() if key != "seed")


@dataclass(frozen=True)
class MemoryRow:
    """One call of section 5: its child's result, and the product's peak above before."""

    model: str
    call: str
    options: dict
    result: dict
    product: float | None  # MiB above before of one product on the same model

    @property
    def name(self) -> str:
        return str(self.result.get("name", self.model))

    @property
    def above(self) -> float | None:
        return _above([self.result])

    @property
    def vectors(self) -> float | None:
        n, itemsize = self.result.get("n"), self.result.get("itemsize")
        if n is None or itemsize is None:
            return None
        return held_vectors_mib(self.call, self.options, int(n), int(itemsize))

    def cells(self) -> list[str]:
        above, vectors = self.above, self.vectors
        multiple = "–" if above is None or not self.product else f"{above / self.product:.1f}"
        shown = "–" if vectors is None else f"{vectors:.0f}"
        budget = _budget([self.result])
        head = [self.name, f"`{self.call}`", _shown(self.options), budget]
        return [*head, *_memory_cells([self.result], gradients=False), multiple, shown]


def _memory_rows(model: str, config: Config) -> list[MemoryRow]:
    """Every call of :func:`memory_calls` on ``model`` in a fresh process with curvop's defaults:
    one product after a warm-up product (the unit), the algorithms on a fresh operator (no
    warm-up: a user's first call, kernel choices included)."""
    rows: list[MemoryRow] = []
    product = None
    for call, options in memory_calls(model, config):
        began = time.perf_counter()
        spec = _spec(model, "curvop", call, options, config, warm_up=call == "apply")
        row = MemoryRow(model, call, options, _child(spec, config), product)
        log(f"memory of {call} on {model}: {time.perf_counter() - began:.0f} s")
        product = row.above if call == "apply" else product
        rows.append(row)
    return rows


def _check_memory(row: MemoryRow, config: Config, targets: Targets) -> None:
    """A call's peak above before ≤ 5 products' plus its vectors; ResNet-18 ≤ 6 GiB (CPU)."""
    case = f"{row.name}, {row.call}({_shown(row.options)})"
    above, vectors = row.above, row.vectors
    if row.call != "apply" and row.product and above is not None and vectors is not None:
        limit = PRODUCT_MULTIPLE * row.product + vectors
        figures = (
            f"{above:.0f} MiB vs {limit:.0f} = {PRODUCT_MULTIPLE} x {row.product:.0f} + "
            f"{vectors:.0f} ({_budget([row.result])})"
        )
        targets.check(
            f"peak above before ≤ {PRODUCT_MULTIPLE}x one product's + the vectors it holds",
            case,
            figures,
            above <= limit,
        )
    if row.model == "resnet18" and config.device == "cpu" and row.call != "apply":
        failed = _failure([row.result]) is not None
        peak = None if failed else float(row.result["peak_mib"]) / MIB_PER_GIB
        targets.check(
            f"11M parameters: peak resident memory ≤ {RESNET18_LIMIT_GIB:g} GiB",
            case,
            "fails" if peak is None else f"{peak:.2f} GiB ({_budget([row.result])})",
            None if peak is None else peak <= RESNET18_LIMIT_GIB,
        )


def bench_memory(config: Config, targets: Targets) -> str:
    """Section 5: peak memory of curvop's spectral calls with their default budget."""
    rows = [row for model in config.memory_models for row in _memory_rows(model, config)]
    for row in rows:
        _check_memory(row, config, targets)
    headers = ["model", "call", "options", "memory_gb", "time (s)", *MEMORY_HEADERS]
    headers += ["x one product", "vectors (MiB)"]
    intro = _MEMORY_INTRO.format(
        source=_peak_sources([row.result for row in rows]), multiple=PRODUCT_MULTIPLE
    )
    return section(
        "5. Peak memory with the default budget",
        intro,
        table(headers, [row.cells() for row in rows]),
    )


_MEMORY_INTRO = (
    "Each call on the Hessian (float32) in a fresh process, with curvop's defaults but for the "
    "options shown (`memory_gb` the default unless it raised; then the rerun's). `apply` is "
    "one product after a warm-up product; the algorithms run on a fresh operator without a "
    "warm-up, as a user's first call does: the first product of each block width also times "
    "the candidate kernels on the first batch (the process has paid its one-time costs on a "
    "tiny model first). Memory: {source}; before = what the process held right before the "
    "call (imports, model, data, operator; for `apply` its vector too), peak = its "
    "high-water mark during the call, above before = the difference; x one product = above "
    "before / that of `apply` (first row of each model). "
    "Vectors = the n-vectors the method must hold at once: top-k, ARPACK's basis of "
    "max(2k + 2, 20) in float64; SLQ p x m, its p·m Lanczos vectors in float32; the "
    "estimators, their m probes and m products in float64. The target: above before ≤ "
    "{multiple} x one product's + the vectors; on ResNet-18 (CPU), each call's peak ≤ 6 GiB."
)
