"""Sections 1, 2, 6 and 7 of ``bench.py``: what one curvature product costs.

1. one product per operator and kernel (each forced kernel and ``"auto"``), against the same
double-backward loop written without curvop and against the peers, with its peak memory; 1b.
the finite-difference Hessian in float64 and in native precision; 1c and 2. blocks of k columns
and their efficiency per column; 2b. the auto kernel against the forced ones; 6. the GGN against
the number of the model's outputs, and the reference's per-output loop; 7. passes over the data
at construction, per product and in ``eigsh``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import peers
import torch
from harness import (
    LABELS,
    OPERATORS,
    Config,
    ForwardCounter,
    Ratio,
    Targets,
    Task,
    apply_task,
    fmt,
    log,
    make_operator,
    peer_libraries,
    prepare,
    problem_of,
    ratios_to_gradient,
    relative_difference,
    section,
    table,
    top_eigenvalue,
)
from models import Problem, mlp_variant
from peaks import Peak
from scipy.sparse.linalg import LinearOperator

import curvop

KERNELS = ("auto", "batched", "looped", "forward")
KINDS = ("hessian", "ggn")  # the operators with kernels (the FD Hessian has one)
FD_PRECISIONS = ("float64", "native")


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
    first_batch: dict[str, dict[str, dict[int, float]]]  # kind -> candidate -> width -> seconds
    peaks: dict[Key, Peak]  # of one call, after the warm-up

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
        return self._failure(who, kind, k)

    def peak_cell(self, who: str, kind: str, k: int = 1) -> str:
        """The peak memory of one call above what the process held before it (MiB), the error
        of a task that failed, or a dash."""
        peak = self.peaks.get((who, kind, k))
        return f"{peak.above_mib:.0f}" if peak is not None else self._failure(who, kind, k)

    def _failure(self, who: str, kind: str, k: int) -> str:
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
        peer_tasks, peer_errors = _peer_tasks(problem, kind, peer_libraries(config), columns)
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
    problem = problem_of(model, config)
    tasks, errors, autos = product_tasks(problem, config, bare=model == "mlp")
    prepared = prepare(tasks, config.device)
    ratios, gradient = ratios_to_gradient(prepared, problem.gradient, config.repeats)
    selections = {
        (kind, k): selection
        for kind, operator in autos.items()
        for k, selection in operator.kernel_selections.items()
    }
    chosen = {key: f"{s.kernel} ({s.chunk} per pass)" for key, s in selections.items()}
    measured = {kind: operator.kernel_measurements for kind, operator in autos.items()}
    first_batch = {
        kind: {
            name: {width: m.seconds for width, m in widths.items()}
            for name, widths in measurements.items()
            if name != "failures"
        }
        for kind, measurements in measured.items()
    }
    errors.update(prepared.errors)
    errors.update(
        ((name, kind, k), reason)
        for kind, measurements in measured.items()
        for name, reason in measurements["failures"].items()
        for k in (1, *config.forced_blocks)
    )
    return ProductRun(model, problem, ratios, errors, gradient, chosen, first_batch, prepared.peaks)


def bench_products(config: Config, targets: Targets) -> str:
    """Sections 1 and 2: products per operator and kernel, blocks, the auto kernel."""
    runs = []
    for name in config.models:
        began = time.perf_counter()
        runs.append(measure_products(name, config))
        log(f"products on {name}: {time.perf_counter() - began:.0f} s")
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
        + section(
            "2c. Peak memory of a product, MiB above what the process held before",
            _PEAK_INTRO.format(source=_peak_source(runs)),
            _peak_table(runs, config),
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
    'the best forced kernel\'s median; "first-batch timings" are the seconds `op.kernel_measurements` '
    "recorded for each candidate once per operator (the first batch, one column and a block)."
)


_PEAK_INTRO = (
    "One more call of each product of section 1 after its warm-up, measured on its own: "
    "{source}, minus what the process held right before the call (model, data, the vectors, "
    "what earlier tasks keep). A block of k columns that runs the batched kernel holds k "
    "columns of autograd graph at once; the looped kernel one at a time."
)


def _peak_source(runs: list[ProductRun]) -> str:
    """How the peaks were measured (see ``peaks.py``)."""
    sources = {peak.source for run in runs for peak in run.peaks.values()}
    return ", ".join(sorted(sources)) or "nothing measured"


def _peak_table(runs: list[ProductRun], config: Config) -> str:
    libraries = _peer_names(runs)
    whos = (*KERNELS, "bare", *libraries)
    rows = []
    for run in runs:
        for kind in KINDS:
            for k in (1, *config.forced_blocks):
                cells = [run.peak_cell(who, kind, k) for who in whos]
                rows.append([run.problem.name, LABELS[kind], k, *cells])
    return table(["model", "operator", "k", *whos], rows)


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
                        _first_batch(run, kind),
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


def _first_batch(run: ProductRun, kind: str) -> str:
    """What the auto operator measured of each candidate on its first batch (once per operator,
    at one column and at a block), in milliseconds."""
    measured = run.first_batch.get(kind, {})
    return (
        "; ".join(
            f"{name} " + ", ".join(f"k={w} {s * 1e3:.0f} ms" for w, s in sorted(widths.items()))
            for name, widths in measured.items()
        )
        or "–"
    )


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


# ----------------------------------------------------------------------------- 6. outputs
def bench_outputs(config: Config) -> str:
    """GGN cost against the number of model outputs, and the reference's per-output loop."""
    rows = []
    for outputs in config.outputs:
        row: list[object] = [outputs]
        for loss in ("mse", "ce"):
            if loss == "ce" and outputs < 2:
                row.append("–")
                continue
            problem = _variant(config, outputs=outputs, loss=loss)
            v = problem.vectors(1, config.seed)[:, 0]
            tasks = prepare({"ggn": apply_task(make_operator(problem, "ggn"), v)})
            ratios, _ = ratios_to_gradient(tasks, problem.gradient, config.repeats)
            row.append(ratios["ggn"])
        rows.append(row)
    sweep = table(["outputs", "GGN, MSE loss", "GGN, cross-entropy"], rows)

    naive_rows = []
    for outputs in config.naive_outputs:
        problem = _variant(config, sizes=[16, 32, outputs], loss="mse", samples=32, batch_size=32)
        v = problem.vectors(1, config.seed)[:, 0]
        operator = make_operator(problem, "ggn")
        tasks = prepare(
            {"curvop": apply_task(operator, v), "naive": lambda p=problem, v=v: naive_ggn(p, v)}
        )
        ratios, _ = ratios_to_gradient(tasks, problem.gradient, config.repeats)
        gap = relative_difference(naive_ggn(problem, v), operator.apply(v))
        naive_rows.append([outputs, 32 * outputs, ratios["curvop"], ratios["naive"], f"{gap:.1e}"])
    naive = table(
        ["outputs", "backward passes (naive)", "curvop GGN", "per-output loop", "max rel. diff"],
        naive_rows,
    )
    mlp = problem_of("mlp", config)
    return section(
        "6. GGN product against the number of outputs, in gradients",
        f"{mlp.name.rsplit('-', 1)[0]}-C, float32, {mlp.num_samples} samples in "
        f"{mlp.layout} batches, k = 1:",
        sweep,
    ) + section(
        "6b. The reference's per-output loop, on a tiny case",
        "MLP 16-32-C, one batch of 32 samples, MSE, float32. The loop takes one backward pass per "
        "output element to build Jv (as the reference `gauss_newton_product` did, here without "
        "its `create_graph`), then the same loss-Hessian and vjp steps.",
        naive,
    )


def _variant(config: Config, **options: object) -> Problem:
    """``models.mlp_variant`` at the run's seed, scale and device."""
    return mlp_variant(config.seed, config.scale, config.device, **options)


def naive_ggn(problem: Problem, v: torch.Tensor) -> torch.Tensor:
    """The GGN product with Jv built one output element at a time (batch x outputs passes)."""
    params, total = problem.params, problem.num_samples
    pieces = [
        t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)
    ]
    result = torch.zeros(problem.size, dtype=torch.float64, device=problem.device)
    for x, y in problem.batches:
        output = problem.model(x)
        flat = output.reshape(-1)
        jv = torch.stack(
            [
                sum(
                    (g * t).sum()
                    for g, t in zip(
                        torch.autograd.grad(flat[i], params, retain_graph=True), pieces, strict=True
                    )
                )
                for i in range(flat.numel())
            ]
        )
        detached = output.detach().requires_grad_()
        output_gradient = torch.autograd.grad(
            problem.loss_fn(detached, y), detached, create_graph=True
        )[0]
        hjv = torch.autograd.grad(output_gradient, detached, jv.view_as(output))[0]
        gv = torch.autograd.grad(output, params, hjv)
        result += (x.shape[0] / total) * torch.cat([g.reshape(-1) for g in gv]).double()
    return result.to(problem.dtype)


# ----------------------------------------------------------------------------- 7. passes
def bench_passes(config: Config) -> str:
    """Forward passes at construction, per product, and during ``eigsh``."""
    problem = problem_of("mlp", config)
    num_batches = len(problem.batches)
    rows = []
    for kind in OPERATORS:
        with ForwardCounter(problem.model) as built:
            operator = make_operator(problem, kind)
        v = problem.vectors(1, config.seed)[:, 0]
        with ForwardCounter(problem.model) as first:  # kernel="auto" times its candidates
            operator.apply(v)
        with ForwardCounter(problem.model) as one:
            operator.apply(v)
        with ForwardCounter(problem.model) as during, curvop.count_products(operator) as asked:
            top_eigenvalue(operator, config.eig_tol, config.seed)
        passes = during.count / one.count
        rows.append(
            [
                f"curvop {LABELS[kind]}",
                built.count,
                f"{first.count / num_batches:g}",
                f"{one.count / num_batches:g}",
                asked.columns,
                f"{passes:g}",
                f"{passes - asked.columns:+g}",
            ]
        )
    # The pitfall, for contrast: a LinearOperator built without dtype runs a trial product.
    hessian = make_operator(problem, "hessian")
    with ForwardCounter(problem.model) as built:
        LinearOperator(hessian.shape, matvec=hessian.matvec)
    rows.append(
        ["`LinearOperator(shape, matvec=H.matvec)`, no dtype", built.count, "", "", "", "", ""]
    )
    for library in peer_libraries(config):
        for kind in ("hessian", "ggn"):
            with ForwardCounter(problem.model) as built:
                peer = peers.build_peer(
                    library, kind, problem.model, problem.loss_fn, problem.batches, defaults=True
                )
            if peer is not None:
                rows.append(
                    [f"{library} {LABELS[kind]}, default options", built.count, "", "", "", "", ""]
                )
    headers = [
        "operator",
        "forwards at construction",
        "forwards per batch, first product",
        "forwards per batch, later products",
        "eigsh: products asked",
        "eigsh: data passes",
        "extra passes",
    ]
    return section(
        "7. No wasted passes",
        f"{problem.name}, float32, {num_batches} batches; forwards counted by a forward hook. "
        'The first product of an operator built with `kernel="auto"` (the default) also runs '
        "each candidate kernel on the first batch (the FD-Hessian has one kernel; the GGN's "
        '"forward" kernel evaluates the model twice per batch). '
        f"eigsh(k=1, which='LA', tol={config.eig_tol:g}) after those; data passes = forwards "
        "during eigsh / forwards of a later product.",
        table(headers, rows),
    )
