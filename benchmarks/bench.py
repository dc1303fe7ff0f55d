"""Benchmark curvop's curvature products and spectral tools, in units of one gradient evaluation.

Timed figures are ratios: the time of an operation divided by the time of one gradient of the
same loss over the same data, measured interleaved in the same run (a gradient is timed right
before and right after each operation; the compared items rotate through one loop), reported as
the median over repeats with the interquartile range in brackets. Shared, noisy machines change
absolute times by factors; the ratios stay put. Peak memory is measured in a fresh process per
call (``memory.py``).

Sections (``--sections`` picks some):

1. ``products``: one product, and blocks of k columns, per operator and per kernel (each forced
   kernel and ``"auto"``), against the same double-backward loop written without curvop and
   against curvlinops and hessian-eigenthings; 2. block efficiency and the auto kernel's choice;
3. ``eigen``: ``curvop.top_eigenvalues`` against ``scipy.sparse.linalg.eigsh`` on the same
   operator; 4. ``slq``: ``curvop.spectral_density`` against hessian-eigenthings' SLQ, time and
   peak memory; 5. ``memory``: peak memory of top-5, SLQ and XTrace on ResNet-18; 6-9 (``outputs``,
   ``passes``, ``peers``, ``accuracy``): the GGN against the number of outputs, passes over the
   data, the peers' agreement with curvop, and estimators against a dense ground truth on
   curvop's built-in problem. The report ends with the issue's targets, met or not.

The models (``models.py``): an MLP 784-256-256-10, a small CNN, ResNet-20 and ResNet-18 for
3x32x32 inputs (BatchNorm in eval mode) and a GPT-style transformer (token cross-entropy).

Run ``python benchmarks/bench.py`` (full, about 65 minutes on 2 cores) or ``--quick`` (smaller
data, fewer repeats, no ResNet-18, about 70 s); ``--help`` lists the options. Torch runs on one
thread unless ``--threads`` says otherwise (on a shared machine two-thread timings swing far
more). The output is a markdown report on stdout (``--output`` also writes it to a file).
Everything measured is deterministic: fixed seeds for models, data and vectors. The peers are
compared when they are installed, and skipped otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.sparse.linalg import eigsh

import curvop

sys.path.insert(0, str(Path(__file__).resolve().parent))
# sibling modules of this script
import agreement  # noqa: E402
import memory  # noqa: E402
import peers  # noqa: E402
from harness import (  # noqa: E402
    LABELS,
    Config,
    Ratio,
    Targets,
    Task,
    apply_task,
    counted_products,
    fmt,
    make_operator,
    prepare,
    ratios_to_gradient,
    section,
    table,
)
from models import Problem, build  # noqa: E402

KERNELS = ("auto", "batched", "looped", "forward")
KINDS = ("hessian", "ggn")  # the operators with kernels (the FD Hessian has one)
FD_PRECISIONS = ("float64", "native")
BENCH_MODELS = ("mlp", "cnn", "resnet20", "gpt")
QUICK_MODELS = ("mlp", "cnn")
QUICK_SOLVER_MODELS = ("cnn",)  # curvop's top-5 on the MLP alone takes a minute (see the README)
SECTIONS = ("products", "eigen", "slq", "memory", "outputs", "passes", "peers", "accuracy")
QUICK_SECTIONS = ("products", "eigen", "slq", "outputs", "passes")  # no dense ground truth
FALLBACK_MEMORY_GB = 2.0  # memory_gb of a rerun when curvop's default budget cannot hold a call
MIB_PER_GIB = 1024
LONG_CALL = 60.0  # seconds: an SLQ call this long is not repeated


# ----------------------------------------------------------------------------- configuration
def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The run's :class:`Config` from the command line (``--quick`` shrinks the defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test under 2 minutes: MLP and CNN on small data (top-5 on the CNN only), "
        f"sections {' '.join(QUICK_SECTIONS)}",
    )
    parser.add_argument("--repeats", type=int, help="repeats per product figure (5, quick 3)")
    parser.add_argument(
        "--long-repeats", type=int, help="repeats per eigensolver / SLQ figure (2, quick 1)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=BENCH_MODELS, help=f"models of sections 1-4 {BENCH_MODELS}"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip section 5 (ResNet-18)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], help="block widths")
    parser.add_argument("--eig-k", type=int, default=5, help="eigenvalues in section 3")
    parser.add_argument("--eig-tol", type=float, default=1e-3, help="eigensolver tolerance")
    parser.add_argument(
        "--slq", nargs="+", help="SLQ probes x steps, e.g. 4x30 10x80 (default; quick 4x30)"
    )
    parser.add_argument("--trace-matvecs", type=int, default=30, help="XTrace / Hutch++ products")
    parser.add_argument("--outputs", type=int, nargs="+", help="GGN sweep (1 10 100; quick 1 10)")
    parser.add_argument("--naive-outputs", type=int, nargs="+", help="per-output loop sweep")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier ratios)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    slq = args.slq or (["4x30"] if quick else ["4x30", "10x80"])
    small_sweep = [1, 10] if quick else [1, 10, 100]
    config = Config(
        quick=quick,
        repeats=args.repeats or (3 if quick else 5),
        long_repeats=args.long_repeats or (1 if quick else 2),
        models=tuple(args.models or (QUICK_MODELS if quick else BENCH_MODELS)),
        solver_models=tuple(args.models or (QUICK_SOLVER_MODELS if quick else BENCH_MODELS)),
        memory_model=None if (quick or args.no_memory) else "resnet18",
        sections=tuple(args.sections or (QUICK_SECTIONS if quick else SECTIONS)),
        blocks=tuple(args.blocks),
        forced_blocks=(max(args.blocks),),
        eig_k=args.eig_k,
        eig_tol=args.eig_tol,
        slq=tuple(tuple(int(part) for part in item.split("x")) for item in slq),
        trace_matvecs=args.trace_matvecs,
        outputs=tuple(args.outputs or small_sweep),
        naive_outputs=tuple(args.naive_outputs or small_sweep),
        peers=not args.no_peers,
        seed=args.seed,
        timeout=args.timeout,
        threads=args.threads,
    )
    return config, args


def _problem(name: str, config: Config) -> Problem:
    return build(name, config.seed, config.quick)


def _libraries(config: Config) -> list[str]:
    return peers.available_peers() if config.peers else []


# ----------------------------------------------------------------------------- 1-2. products
Key = tuple[str, str, int]  # (who: a kernel, "bare", a peer or "FD <precision>"; kind; k)


@dataclass(frozen=True)
class ProductRun:
    """Section 1's measurements on one model: ratios to a gradient per (who, kind, k)."""

    model: str  # the key of models.MODELS
    problem: Problem
    ratios: dict[Key, Ratio]
    errors: dict[Key, str]
    gradient_seconds: float
    chosen: dict[tuple[str, int], str]  # (kind, k) -> the kernel "auto" chose
    first_batch: dict[tuple[str, int], dict[str, float]]  # (kind, k) -> seconds per candidate

    def get(self, who: str, kind: str, k: int) -> Ratio | None:
        return self.ratios.get((who, kind, k))

    def per_column(self, who: str, kind: str, k: int) -> Ratio | None:
        ratio = self.get(who, kind, k)
        return None if ratio is None else ratio.scaled(1 / k)

    def efficiency(self, who: str, kind: str, k: int) -> float | None:
        """Per-column cost of a ``k``-column block over the same one's single product."""
        block, single = self.per_column(who, kind, k), self.get(who, kind, 1)
        return None if block is None or single is None else block.median / single.median

    def cell(self, who: str, kind: str, k: int = 1) -> str:
        """The per-column ratio, the error of a task that failed, or a dash."""
        ratio = self.per_column(who, kind, k)
        if ratio is not None:
            return str(ratio)
        error = self.errors.get((who, kind, k))
        return f"fails: {error}" if error else "–"


def _columns(problem: Problem, widths: Sequence[int], seed: int) -> dict[int, torch.Tensor]:
    """Fixed vectors: ``(n,)`` for ``k = 1``, ``(n, k)`` blocks otherwise (nested columns)."""
    V = problem.vectors(max(widths), seed)
    return {k: V[:, 0].contiguous() if k == 1 else V[:, :k].contiguous() for k in widths}


def bare_hessian_task(problem: Problem, V: torch.Tensor) -> Task:
    """The double-backward loop written without curvop: per batch a forward, a gradient with
    ``create_graph``, one backward of :math:`\\langle g, v\\rangle` (``is_grads_batched`` for a
    block), the products summed with the batches' sample weights in the parameters' dtype."""
    params, total = problem.params, problem.num_samples
    k = 1 if V.dim() == 1 else V.shape[1]

    def task() -> torch.Tensor:
        pieces = V.reshape(len(V), k).split([p.numel() for p in params])
        vectors = [t.T.reshape(k, *p.shape) for t, p in zip(pieces, params, strict=True)]
        vectors = [t[0] for t in vectors] if k == 1 else vectors
        result: list[torch.Tensor] | None = None
        for x, y in problem.batches:
            loss = problem.loss_fn(problem.model(x), y)
            gradient = torch.autograd.grad(loss, params, create_graph=True)
            products = torch.autograd.grad(gradient, params, vectors, is_grads_batched=k > 1)
            weight = x.shape[0] / total
            result = (
                [p.mul_(weight) for p in products]
                if result is None
                else [r.add_(p, alpha=weight) for r, p in zip(result, products, strict=True)]
            )
        flat = torch.cat([r.reshape(k, -1) for r in result], dim=1).T.contiguous()
        return flat if k > 1 else flat[:, 0]

    return task


def _peer_tasks(
    problem: Problem, kind: str, libraries: list[str], columns: dict[int, torch.Tensor]
) -> tuple[dict[Key, Task], dict[Key, str]]:
    """Single products of every peer, and blocks of curvlinops (hessian-eigenthings' ``matvec``
    takes one vector: k columns cost k products)."""
    tasks: dict[Key, Task] = {}
    errors: dict[Key, str] = {}
    for library in libraries:
        try:
            peer = peers.build_peer(library, kind, problem.model, problem.loss_fn, problem.batches)
        except Exception as error:
            errors[(library, kind, 1)] = f"{type(error).__name__}: {error}"
            continue
        if peer is None:
            continue
        widths = list(columns) if library == "curvlinops" else [1]
        for k in widths:
            tasks[(library, kind, k)] = lambda m=peer.matvec, V=columns[k]: m(V)
    return tasks, errors


def product_tasks(
    problem: Problem, config: Config, *, bare: bool
) -> tuple[dict[Key, Task], dict[Key, str], dict[str, curvop.CurvatureOperator]]:
    """Every product section 1 times on ``problem``; the peers' construction errors; the
    ``"auto"`` operators (to read their choices)."""
    widths = (1, *config.blocks)
    columns = _columns(problem, widths, config.seed)
    tasks: dict[Key, Task] = {}
    errors: dict[Key, str] = {}
    autos = {}
    for kind in KINDS:
        for kernel in KERNELS:
            operator = make_operator(problem, kind, kernel=kernel)
            autos[kind] = operator if kernel == "auto" else autos.get(kind)
            for k in widths if kernel == "auto" else (1, *config.forced_blocks):
                tasks[(kernel, kind, k)] = apply_task(operator, columns[k])
        peer_tasks, peer_errors = _peer_tasks(problem, kind, _libraries(config), columns)
        tasks.update(peer_tasks)
        errors.update(peer_errors)
    for precision in FD_PRECISIONS:
        operator = make_operator(problem, "fd_hessian", precision=precision)
        tasks[(f"FD {precision}", "fd_hessian", 1)] = apply_task(operator, columns[1])
    if bare:
        for k in (1, *config.forced_blocks):
            tasks[("bare", "hessian", k)] = bare_hessian_task(problem, columns[k])
    return tasks, errors, autos


def measure_products(model: str, config: Config) -> ProductRun:
    """Warm every product up, then time them all interleaved against the gradient."""
    problem = _problem(model, config)
    tasks, errors, autos = product_tasks(problem, config, bare=model == "mlp")
    prepared = prepare(tasks)
    ratios, gradient = ratios_to_gradient(prepared, problem.gradient, config.repeats)
    selections = {
        (kind, k): selection
        for kind, operator in autos.items()
        for k, selection in operator.kernel_selections.items()
    }
    chosen = {key: selection.kernel for key, selection in selections.items()}
    first_batch = {key: selection.seconds for key, selection in selections.items()}
    errors.update(prepared.errors)
    errors.update(
        ((name, kind, k), reason)
        for (kind, k), selection in selections.items()
        for name, reason in selection.failures.items()
    )
    return ProductRun(model, problem, ratios, errors, gradient, chosen, first_batch)


def bench_products(config: Config, targets: Targets) -> str:
    """Sections 1 and 2: products per operator and kernel, blocks, the auto kernel."""
    runs = []
    for name in config.models:
        began = time.perf_counter()
        runs.append(measure_products(name, config))
        _log(f"products on {name}: {time.perf_counter() - began:.0f} s")
    _check_products(runs, config, targets)
    return (
        section("1. One product (k = 1), in gradients", _SINGLE_INTRO, _single_table(runs))
        + section("1b. The finite-difference Hessian, in gradients", _FD_INTRO, _fd_table(runs))
        + section(
            f"1c. Blocks of k = {max(config.forced_blocks)}, per column, in gradients",
            _BLOCK_INTRO.format(k=max(config.forced_blocks)),
            _block_table(runs, max(config.forced_blocks)),
        )
        + section(
            "2. Block efficiency: per-column cost of a k-block / one single product",
            _EFFICIENCY_INTRO,
            _efficiency_table(runs, config.blocks),
        )
        + section(
            "2b. The auto kernel against the forced ones", _AUTO_INTRO, _auto_table(runs, config)
        )
    )


_SINGLE_INTRO = (
    "`op.apply(v)` on a torch vector, float32, each operator built with the kernel of its column "
    '(`kernel="auto"` and each forced one; "auto chose" is what it measured fastest on the '
    'first batch of its first product). "bare" (MLP only) is the same double-backward loop '
    "written without curvop (forward, `autograd.grad(create_graph=True)`, one backward, "
    "sample-weighted sum in float32; no fingerprints, finiteness check or float64 "
    'accumulation). hessian-eigenthings\' GGN is its `GGNOperator`; a forced "looped" kernel '
    'equals "batched" at k = 1 (one column, one backward).'
)
_FD_INTRO = (
    '`FiniteDifferenceHessianOperator`, k = 1: the default `precision="float64"` (gradients '
    'in float64, with the kink check) and `precision="native"` (float32 gradients, the way '
    "it worked before), next to the exact Hessian (auto)."
)
_BLOCK_INTRO = (
    "`op.apply(V)` with `V` of shape (n, {k}), one pass over the data, divided by {k}. "
    "curvlinops multiplies its (n, {k}) block with `@`; hessian-eigenthings has no block "
    "product (its `matvec` takes one vector), so its {k} columns cost {k} single products."
)
_EFFICIENCY_INTRO = (
    "Medians of section 1's interleaved run: (time of a k-column block / k) / (time of one "
    'single product) of the same library (curvop: `kernel="auto"`, whose choice at each width '
    "is in brackets). Below 1 a block pays; 1/k would make the extra columns free."
)
_AUTO_INTRO = (
    "Per column, in gradients, from section 1's run. \"auto / best\" divides auto's median by "
    'the best forced kernel\'s median; "first-batch timings" are the seconds `op.kernel_selections` '
    "recorded for each candidate (one batch, one call each, the first run of all timed twice)."
)


def _single_table(runs: list[ProductRun]) -> str:
    libraries = _peer_names(runs)
    rows = []
    for run in runs:
        problem = run.problem
        for kind in KINDS:
            row = [
                problem.name,
                f"{problem.size:,}",
                problem.layout,
                f"{run.gradient_seconds * 1e3:.0f}",
            ]
            row += [LABELS[kind], run.chosen.get((kind, 1), "–")]
            row += [run.cell(who, kind) for who in (*KERNELS, "bare", *libraries)]
            rows.append(row)
    headers = ["model", "n", "batches", "gradient (ms)", "operator", "auto chose", *KERNELS]
    return table([*headers, "bare", *libraries], rows)


def _fd_table(runs: list[ProductRun]) -> str:
    rows = []
    for run in runs:
        fd = [run.get(f"FD {precision}", "fd_hessian", 1) for precision in FD_PRECISIONS]
        slower = f"{fd[0].median / fd[1].median:.2f}x" if all(fd) else "–"
        cells = [run.cell(f"FD {precision}", "fd_hessian") for precision in FD_PRECISIONS]
        rows.append([run.problem.name, run.cell("auto", "hessian"), *cells, slower])
    headers = ["model", "Hessian (auto)", "FD float64 (default)", "FD native", "float64 / native"]
    return table(headers, rows)


def _block_table(runs: list[ProductRun], k: int) -> str:
    libraries = [name for name in _peer_names(runs) if name == "curvlinops"]
    rows = []
    for run in runs:
        for kind in KINDS:
            row = [run.problem.name, LABELS[kind], run.chosen.get((kind, k), "–")]
            row += [run.cell(who, kind, k) for who in (*KERNELS, "bare", *libraries)]
            rows.append(row)
    return table(["model", "operator", "auto chose", *KERNELS, "bare", *libraries], rows)


def _efficiency_table(runs: list[ProductRun], widths: Sequence[int]) -> str:
    rows = []
    for run in runs:
        for kind in KINDS:
            for who in ("auto", *[name for name in _peer_names(runs) if name == "curvlinops"]):
                cells = []
                for k in widths:
                    value = run.efficiency(who, kind, k)
                    choice = (
                        f" ({run.chosen[(kind, k)]})"
                        if who == "auto" and (kind, k) in run.chosen
                        else ""
                    )
                    cells.append("–" if value is None else f"{value:.2f}{choice}")
                rows.append(
                    [run.problem.name, LABELS[kind], "curvop" if who == "auto" else who, *cells]
                )
    return table(["model", "operator", "library", *[f"k = {k}" for k in widths]], rows)


def _best_forced(run: ProductRun, kind: str, k: int) -> tuple[str, Ratio] | None:
    timed = [(who, run.per_column(who, kind, k)) for who in KERNELS[1:]]
    timed = [(who, ratio) for who, ratio in timed if ratio is not None]
    return min(timed, key=lambda item: item[1].median) if timed else None


def _auto_table(runs: list[ProductRun], config: Config) -> str:
    rows = []
    for run in runs:
        for kind in KINDS:
            for k in (1, *config.forced_blocks):
                auto, best = run.per_column("auto", kind, k), _best_forced(run, kind, k)
                ratio = f"{auto.median / best[1].median:.2f}" if auto and best else "–"
                rows.append(
                    [
                        run.problem.name,
                        LABELS[kind],
                        k,
                        run.chosen.get((kind, k), "–"),
                        run.cell("auto", kind, k),
                        f"{best[0]}: {best[1]}" if best else "–",
                        ratio,
                        _first_batch(run, kind, k),
                    ]
                )
    headers = [
        "model",
        "operator",
        "k",
        "auto chose",
        "auto",
        "best forced",
        "auto / best",
        "first-batch timings",
    ]
    return table(headers, rows)


def _first_batch(run: ProductRun, kind: str, k: int) -> str:
    """What the auto operator measured on its first batch at width ``k``, in milliseconds."""
    seconds = run.first_batch.get((kind, k), {})
    return ", ".join(f"{name} {value * 1e3:.0f} ms" for name, value in seconds.items()) or "–"


def _peer_names(runs: list[ProductRun]) -> list[str]:
    names = {who for run in runs for who, _, _ in [*run.ratios, *run.errors]}
    return [library for library in peers.MODULES if library in names]


def _figures(run: ProductRun, kind: str, names: Sequence[str], k: int = 1) -> str:
    """``name median`` for each of ``names`` that was measured, per column at ``k``."""
    parts = [(name, run.per_column(name, kind, k)) for name in names]
    return ", ".join(f"{name} {fmt(ratio.median)}" for name, ratio in parts if ratio is not None)


def _check_products(runs: list[ProductRun], config: Config, targets: Targets) -> None:
    """Register the product targets of the issue (see the README's targets table)."""
    k = max(config.forced_blocks)
    for run in runs:
        _check_against_peers(run, targets)
        name = run.problem.name
        if run.model == "mlp":
            hessian = run.get("auto", "hessian", 1)
            if hessian is not None:
                targets.check(
                    "Hessian product ≤ 3.0x a gradient",
                    name,
                    f"{fmt(hessian.median)}",
                    hessian.median <= 3.0,
                )
            for kind in KINDS:
                efficiency = run.efficiency("auto", kind, k)
                if efficiency is not None:
                    targets.check(
                        f"{k}-column block per column ≤ 0.5x a single product",
                        f"{name}, {LABELS[kind]}",
                        f"{efficiency:.2f}",
                        efficiency <= 0.5,
                    )
            for width in (1, k):
                curvop_time, bare = (
                    run.per_column("batched", "hessian", width),
                    run.per_column("bare", "hessian", width),
                )
                if curvop_time and bare:
                    overhead = curvop_time.median / bare.median - 1
                    targets.check(
                        "bookkeeping ≤ 5% of a product (Hessian, batched kernel vs bare loop)",
                        f"{name}, k = {width}",
                        f"{overhead:+.1%}",
                        overhead <= 0.05,
                    )
        for kind in KINDS:
            _check_blocks(run, kind, config.blocks, targets)
            _check_auto(run, kind, (1, k), targets)


def _check_against_peers(run: ProductRun, targets: Targets) -> None:
    """Hessian ≤ the faster peer (MLP, CNN, GPT), GGN ≤ curvlinops (every model)."""
    cases = [("hessian", list(peers.MODULES))] if run.model in ("mlp", "cnn", "gpt") else []
    for kind, libraries in [*cases, ("ggn", ["curvlinops"])]:
        own = run.get("auto", kind, 1)
        theirs = [run.get(library, kind, 1) for library in libraries]
        theirs = [ratio for ratio in theirs if ratio is not None]
        if own is None or not theirs:
            continue
        best = min(ratio.median for ratio in theirs)
        label = (
            "the faster of curvlinops and hessian-eigenthings"
            if len(libraries) > 1
            else "curvlinops"
        )
        figures = f"{_figures(run, kind, ['auto', *libraries])}: {own.median / best:.2f}x"
        targets.check(
            f"{LABELS[kind]} product ≤ 1.0x {label}", run.problem.name, figures, own.median <= best
        )


def _check_blocks(run: ProductRun, kind: str, widths: Sequence[int], targets: Targets) -> None:
    """A block is never worse than k single products: the worst efficiency over ``widths``."""
    measured = [(run.efficiency("auto", kind, k), k) for k in widths]
    measured = [(value, k) for value, k in measured if value is not None]
    if measured:
        worst, k = max(measured)
        figures = f"worst {worst:.2f} (k = {k})"
        targets.check(
            "block never worse than k single products",
            f"{run.problem.name}, {LABELS[kind]}",
            figures,
            worst <= 1.0,
        )


def _check_auto(run: ProductRun, kind: str, widths: Sequence[int], targets: Targets) -> None:
    """auto within 5% of the best forced kernel, at each width timed with every kernel."""
    for k in widths:
        auto, best = run.per_column("auto", kind, k), _best_forced(run, kind, k)
        if auto is None or best is None:
            continue
        ratio = auto.median / best[1].median
        figures = f"auto ({run.chosen.get((kind, k), '?')}) {fmt(auto.median)}, {best[0]} {fmt(best[1].median)}: {ratio:.2f}x"
        targets.check(
            "auto ≤ 1.05x the best forced kernel",
            f"{run.problem.name}, {LABELS[kind]}, k = {k}",
            figures,
            ratio <= 1.05,
        )


# ----------------------------------------------------------------------------- 3. eigensolvers
@dataclass(frozen=True)
class SolverRun:
    """One eigensolver on one operator: time, products, the eigenvalues."""

    ratio: Ratio
    passes: int
    columns: int
    values: np.ndarray


def _warm_up(
    operator: curvop.CurvatureOperator, problem: Problem, widths: Sequence[int], seed: int
) -> None:
    """One product of each width, so that ``kernel="auto"``'s choice is not timed."""
    for width in widths:
        operator.apply(problem.vectors(width, seed))


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

    def counted(name: str, call: Callable[[], np.ndarray]) -> Task:
        def task() -> None:
            with counted_products(operator) as count:
                values = np.sort(np.asarray(call(), dtype=np.float64))[::-1]
            results[name] = (count, values)

        return task

    return {name: counted(name, call) for name, call in calls.items()}


def measure_solvers(model: str, config: Config) -> tuple[Problem, dict[str, SolverRun], float]:
    """Both solvers on the warmed-up Hessian of ``model``, interleaved (ABBA for two repeats)."""
    problem = _problem(model, config)
    operator = make_operator(problem, "hessian")
    _warm_up(operator, problem, (1, config.eig_k + 1), config.seed)
    results: dict[str, object] = {}
    tasks = _solver_tasks(operator, config, results)
    ratios, gradient = ratios_to_gradient(
        tasks, problem.gradient, config.long_repeats, calibrated=False
    )
    runs = {
        name: SolverRun(
            ratio,
            results[name][0].passes,
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
        _log(f"eigensolvers on {model}: {time.perf_counter() - began:.0f} s")
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
                    run.passes,
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
        "passes",
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
    'The Hessian (`kernel="auto"`, float32), warmed up with a product of 1 and of {k} + 1 '
    "columns; then `curvop.top_eigenvalues(H, k={k}, tol={tol:g}, seed=0)` and "
    '`scipy.sparse.linalg.eigsh(H, k={k}, which="LA", tol={tol:g}, v0=...)` on the same '
    "operator, interleaved with gradients, {repeats} run(s) each (alternating which goes first). "
    "The tolerances are not the same criterion: curvop stops when every wanted Ritz pair has "
    "‖Az − θz‖ ≤ tol·‖A‖ (‖A‖ estimated by the largest Ritz value and product column seen), "
    "ARPACK when ‖Az − θz‖ ≤ tol·|θ| for each one (here in float32 ARPACK, since the operator is "
    "float32), so eigsh's is the stricter of the two by ‖A‖/|θ| for eigenvalues below the top. "
    "Products are columns multiplied, passes the calls of `apply` (one pass over the data "
    "each): curvop multiplies k + 1 columns per pass where a column in that block costs at most "
    "0.4 of one alone, else one; the last column compares the two results."
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


def _spec(model: str, library: str, call: str, options: dict, config: Config) -> memory.Spec:
    return memory.Spec(model, library, call, options, config.quick, config.seed, config.threads)


def _slq_runs(model: str, probes: int, steps: int, config: Config) -> dict[str, list[dict]]:
    """curvop's and hessian-eigenthings' SLQ, each in fresh processes, alternating first."""
    libraries = ["curvop", *[name for name in _libraries(config) if name == "hessian-eigenthings"]]
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


def _budget(results: list[dict]) -> str:
    """The memory_gb curvop ran with, and the default's error if it needed the fallback."""
    failed = next((r["default_error"] for r in results if "default_error" in r), None)
    return f"{FALLBACK_MEMORY_GB:g} (default 1.0 raised: {failed})" if failed else "1.0 (default)"


def _memory_cells(results: list[dict]) -> list[str]:
    """Time (s), time in gradients, products, passes, baseline and peak MiB (medians)."""
    errors = [str(r["error"]) for r in results if "error" in r]
    if errors and not any("seconds" in r for r in results):
        return [f"fails: {errors[0]}", "", "", "", "", ""]
    seconds, gradients = _median(results, "seconds"), _in_gradients(results)
    return [
        f"{seconds:.1f}",
        fmt(gradients),
        f"{_median(results, 'columns'):.0f}",
        f"{_median(results, 'passes'):.0f}",
        f"{_median(results, 'baseline_mib'):.0f}",
        f"{_median(results, 'peak_mib'):.0f}",
    ]


def bench_slq(config: Config, targets: Targets) -> str:
    """Section 4: SLQ of curvop and of hessian-eigenthings, wall time and peak memory."""
    rows = []
    for model in config.models:
        name = _problem(model, config).name
        for probes, steps in config.slq:
            began = time.perf_counter()
            results = _slq_runs(model, probes, steps, config)
            _log(f"SLQ {probes}x{steps} on {model}: {time.perf_counter() - began:.0f} s")
            for library, runs in results.items():
                budget = _budget(runs) if library == "curvop" else "–"
                rows.append([name, f"{probes} x {steps}", library, budget, *_memory_cells(runs)])
            _check_slq(model, name, probes, steps, results, targets)
    headers = [
        "model",
        "probes x steps",
        "library",
        "curvop memory_gb",
        "time (s)",
        "time (gradients)",
        "products",
        "passes",
        "baseline (MiB)",
        "peak (MiB)",
    ]
    return section(
        "4. Spectral density (SLQ): curvop against hessian-eigenthings",
        _SLQ_INTRO.format(repeats=config.long_repeats),
        table(headers, rows),
    )


_SLQ_INTRO = (
    "`curvop.spectral_density(H, num_probes=p, num_steps=m, seed=0)` (Rademacher probes, full "
    "reorthogonalization with the basis in the operator's dtype, float32; as many probes side "
    "by side as `memory_gb` holds, at least one, their products as one block per step) against "
    "hessian-eigenthings' own SLQ, `hessian_eigenthings.spectral_density(op, num_runs=p, "
    "lanczos_steps=m)` (one probe after the other, single products, full reorthogonalization "
    "in the operator's dtype, float32), both on the Hessian of the same model and data. Each "
    "call runs in a fresh process ({repeats} process(es) each, alternating which goes first, "
    "one each where a call took over a minute; medians), after a warm-up product; time in seconds and in gradients of the same process "
    "(timed right before and after the call). Baseline: the process' resident set after "
    "importing the library and building the model and data; peak: its `ru_maxrss` at the end "
    "(nothing subtracted)."
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
    peak_ours, peak_theirs = _median(ours, "peak_mib"), _median(theirs, "peak_mib")
    if peak_ours is not None and peak_theirs is not None and "seconds" in ours[0]:
        ratio = peak_ours / peak_theirs
        figures = f"{peak_ours:.0f} vs {peak_theirs:.0f} MiB: {ratio:.2f}x ({_budget(ours)})"
        targets.check("SLQ peak memory ≤ 1.5x hessian-eigenthings'", case, figures, ratio <= 1.5)


# ----------------------------------------------------------------------------- 5. memory
def memory_calls(config: Config) -> list[tuple[str, dict[str, object]]]:
    """The calls of section 5 and their options (seeded)."""
    probes, steps = config.slq[0]
    seed = config.seed
    return [
        ("top_eigenvalues", {"k": config.eig_k, "tol": config.eig_tol, "seed": seed}),
        ("spectral_density", {"num_probes": probes, "num_steps": steps, "seed": seed}),
        ("xtrace", {"num_matvecs": config.trace_matvecs, "seed": seed}),
    ]


def bench_memory(config: Config, targets: Targets) -> str:
    """Section 5: peak resident memory of curvop's spectral calls on ResNet-18."""
    if config.memory_model is None:
        return section("5. Peak memory on ResNet-18", "skipped (--quick or --no-memory).", "")
    model = config.memory_model
    problem = _problem(model, config)
    rows = []
    for call, options in memory_calls(config):
        began = time.perf_counter()
        spec = _spec(model, "curvop", call, options, config)
        result = _child(spec, config)
        _log(f"memory of {call} on {model}: {time.perf_counter() - began:.0f} s")
        shown = ", ".join(f"{key}={value}" for key, value in options.items() if key != "seed")
        rows.append([f"`{call}`", shown, _budget([result]), *_memory_cells([result])])
        peak = result.get("peak_mib") if "seconds" in result else None
        figures = "fails" if peak is None else f"{peak / MIB_PER_GIB:.2f} GiB ({_budget([result])})"
        targets.check(
            "11M parameters: peak resident memory ≤ 6 GiB",
            f"{problem.name}, {call}",
            figures,
            None if peak is None else peak <= 6 * MIB_PER_GIB,
        )
    headers = [
        "call",
        "options",
        "memory_gb",
        "time (s)",
        "time (gradients)",
        "products",
        "passes",
        "baseline (MiB)",
        "peak (MiB)",
    ]
    return section(
        f"5. Peak memory on {problem.name} (n = {problem.size:,})",
        _MEMORY_INTRO.format(name=problem.name, layout=problem.layout),
        table(headers, rows),
    )


_MEMORY_INTRO = (
    "Each call on the Hessian of {name} (float32, {layout} images, BatchNorm in eval mode) in a "
    "fresh process, as in section 4: baseline = resident set after importing curvop and "
    "building the model and data, peak = `ru_maxrss` of the process at the end (nothing "
    "subtracted; it includes the warm-up products). One run each."
)


# ----------------------------------------------------------------------------- main
def header(config: Config, args: argparse.Namespace) -> str:
    mode = "quick" if config.quick else "full"
    return (
        f"## curvop benchmark ({mode})\n\n"
        f"- torch {torch.__version__} (torch threads: {torch.get_num_threads()}); numpy {np.__version__}, "
        f"scipy {scipy.__version__}; Python {platform.python_version()}; "
        f"{platform.machine()}, {_cpu_count()} CPUs visible\n"
        f"- run {time.strftime('%Y-%m-%d %H:%M %Z')}; curvop {_revision()}; "
        f"load average (1 min) at start: {os.getloadavg()[0]:.1f}\n"
        f"- {', '.join(f'{lib} {peers.peer_version(lib)}' for lib in _libraries(config)) or 'no peers'}\n"
        f"- product figures: median of {config.repeats} repeats, interquartile range in brackets; "
        "ratio = time / time of one gradient over the same data, interleaved\n"
    )


def _revision() -> str:
    """The checkout's commit, marked when curvop's sources differ from it (read-only git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "curvop"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "(no git)"
    if not commit:
        return "(not a git checkout)"
    return f"{commit} with uncommitted changes to curvop/" if changed else commit


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _log(message: str) -> None:
    """Progress on stderr (the report is stdout)."""
    print(f"<!-- {message} -->", file=sys.stderr, flush=True)


BENCHES: dict[str, Callable[[Config, Targets], str]] = {
    "products": bench_products,
    "eigen": bench_eigen,
    "slq": bench_slq,
    "memory": bench_memory,
    "outputs": lambda config, _: agreement.bench_outputs(config),
    "passes": lambda config, _: agreement.bench_passes(config),
    "peers": lambda config, _: agreement.bench_peers(config),
    "accuracy": lambda config, _: agreement.bench_accuracy(config),
}


def main(argv: Sequence[str] | None = None) -> None:
    config, args = parse_args(argv)
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    targets = Targets()
    parts = [header(config, args)]
    print(parts[0], flush=True)
    for name in SECTIONS:
        if name not in config.sections:
            continue
        began = time.perf_counter()
        parts.append(BENCHES[name](config, targets))
        print(parts[-1], flush=True)
        _log(f"section {name}: {time.perf_counter() - began:.0f} s")
    parts.append(targets.report())
    parts.append(
        f"_Total wall time {time.perf_counter() - start:.0f} s; "
        f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}._\n"
    )
    report = "\n".join(parts)
    print("\n".join(parts[-2:]))
    if args.output:
        with open(args.output, "w") as file:
            file.write(report)


if __name__ == "__main__":
    main()
