"""Benchmark curvop's curvature products in units of one gradient evaluation.

Every figure is a ratio: the time of an operation divided by the time of one gradient of the
same loss over the same data, both measured interleaved in the same run (the gradient is timed
right before and right after each operation), reported as the median over repeats with the
interquartile range in brackets. Shared, noisy machines change absolute times by factors; the
ratios stay put.

The problems are curvop's built-in one (``curvop.problems.load_problem()``: a 64-32-10 MLP on
scikit-learn's digits, 1,797 samples in batches of 512, 512, 512 and 261), checked against a dense
float64 ground truth built with ``torch.func``, and sized synthetic ones (an MLP and a small CNN).

Run ``python benchmarks/bench.py`` (full, about 4.5 minutes on 2 cores) or ``--quick`` (about a
minute); ``--help`` lists the sizes. Torch runs on one thread unless ``--threads`` says otherwise
(on a shared machine two-thread timings swing far more). The output is a markdown report on stdout (``--output``
also writes it to a file). Everything measured is deterministic: fixed seeds for models, data
and vectors. The peers (curvlinops, hessian-eigenthings) are compared when they are installed,
and skipped otherwise.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

import curvop
from curvop.problems import load_problem

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (a sibling module of this script)

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Task = Callable[[], object]

OPERATORS = {
    "hessian": curvop.HessianOperator,
    "ggn": curvop.GaussNewtonOperator,
    "fd_hessian": curvop.FiniteDifferenceHessianOperator,
}
LABELS = {"hessian": "Hessian", "ggn": "GGN", "fd_hessian": "FD-Hessian"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Sizes and switches of one benchmark run."""

    repeats: int
    samples: int
    batches: int
    in_features: int
    width: int
    depth: int
    classes: int
    outputs: tuple[int, ...]
    blocks: tuple[int, ...]
    naive_outputs: tuple[int, ...]
    eig_tol: float
    trace_matvecs: int
    slq_probes: int
    slq_steps: int
    cnn: bool
    peers: bool
    seed: int


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The run's :class:`Config` from the command line (``--quick`` shrinks the defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller model, fewer repeats, no CNN (~1 min)"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per figure (default 7, quick 3)")
    parser.add_argument("--samples", type=int, default=1024, help="data points (default 1024)")
    parser.add_argument("--batches", type=int, default=8, help="batches the data is split into")
    parser.add_argument("--in-features", type=int, default=64, help="MLP input size")
    parser.add_argument("--width", type=int, help="MLP hidden width (default 256, quick 128)")
    parser.add_argument("--depth", type=int, default=2, help="MLP hidden layers")
    parser.add_argument("--classes", type=int, default=10, help="classes of the main problems")
    parser.add_argument("--outputs", type=int, nargs="+", default=[1, 10, 100], help="GGN sweep")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16], help="block sizes k")
    parser.add_argument("--naive-outputs", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--eig-tol", type=float, default=1e-3, help="eigsh tolerance")
    parser.add_argument("--trace-matvecs", type=int, default=30, help="Hutch++ products")
    parser.add_argument("--slq-probes", type=int, help="SLQ probes (default 10, quick 4)")
    parser.add_argument("--slq-steps", type=int, help="SLQ Lanczos steps (default 80, quick 20)")
    parser.add_argument("--no-cnn", action="store_true", help="skip the small CNN (quick does)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier ratios on a shared machine, see the README)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    config = Config(
        repeats=args.repeats or (3 if args.quick else 7),
        samples=args.samples,
        batches=args.batches,
        in_features=args.in_features,
        width=args.width or (128 if args.quick else 256),
        depth=args.depth,
        classes=args.classes,
        outputs=tuple(args.outputs),
        blocks=tuple(args.blocks),
        naive_outputs=tuple(args.naive_outputs),
        eig_tol=args.eig_tol,
        trace_matvecs=args.trace_matvecs,
        slq_probes=args.slq_probes or (4 if args.quick else 10),
        slq_steps=args.slq_steps or (20 if args.quick else 80),
        cnn=not (args.no_cnn or args.quick),
        peers=not args.no_peers,
        seed=args.seed,
    )
    return config, args


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """A model, a loss and fixed batches: everything an operator is built from."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    batches: Batches

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def num_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.batches)

    @property
    def layout(self) -> str:
        """The batch sizes, compactly: ``8 × 128``, or ``3 × 512 + 261`` for a short last one."""
        sizes = [int(x.shape[0]) for x, _ in self.batches]
        head = sizes[:-1]
        if len(set(sizes)) == 1:
            return f"{len(sizes)} × {sizes[0]}"
        if len(set(head)) == 1:
            return f"{len(head)} × {head[0]} + {sizes[-1]}"
        return " + ".join(map(str, sizes))

    def to(self, dtype: torch.dtype) -> Problem:
        """The same weights and data in ``dtype`` (a copy; the original is untouched)."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        model = copy.deepcopy(self.model).to(dtype)
        batches = [(cast(x), cast(y)) for x, y in self.batches]
        return replace(self, model=model, batches=batches)

    def operator(self, kind: str) -> curvop.CurvatureOperator:
        return OPERATORS[kind](self.model, self.loss_fn, self.batches)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss over all batches, as a user would write it."""
        params, total = self.params, self.num_samples
        flat = torch.zeros(self.size, dtype=self.dtype)
        for x, y in self.batches:
            loss = self.loss_fn(self.model(x), y) * (x.shape[0] / total)
            grads = torch.autograd.grad(loss, params)
            flat += torch.cat([g.reshape(-1) for g in grads])
        return flat

    def vectors(self, k: int, seed: int) -> torch.Tensor:
        """A fixed ``(n, k)`` block of standard normal columns."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.size, k, generator=generator, dtype=self.dtype)


def split(x: torch.Tensor, y: torch.Tensor, batches: int) -> Batches:
    size = math.ceil(x.shape[0] / batches)
    return list(zip(x.split(size), y.split(size), strict=True))


def mlp_problem(
    config: Config,
    *,
    outputs: int | None = None,
    loss: str = "ce",
    samples: int | None = None,
    batch_size: int | None = None,
    in_features: int | None = None,
    width: int | None = None,
    depth: int | None = None,
) -> Problem:
    """A tanh MLP with cross-entropy (``loss="ce"``) or MSE (``"mse"``) loss, float32."""
    outputs = outputs or config.classes
    samples = samples or config.samples
    in_features, width = in_features or config.in_features, width or config.width
    depth = config.depth if depth is None else depth
    torch.manual_seed(config.seed)
    sizes = [in_features] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(sizes[-1], outputs))
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(samples, in_features, generator=generator)
    if loss == "ce":
        y = torch.randint(0, outputs, (samples,), generator=generator)
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    else:
        y = torch.randn(samples, outputs, generator=generator)
        loss_fn = nn.MSELoss()
    batches = (
        split(x, y, config.batches)
        if batch_size is None
        else list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    )
    name = f"MLP {in_features}-{'-'.join(map(str, sizes[1:]))}-{outputs}"
    return Problem(name, model, loss_fn, batches)


def cnn_problem(config: Config) -> Problem:
    """A small tanh CNN on 1x16x16 images with cross-entropy loss, float32."""
    torch.manual_seed(config.seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, config.classes),
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.samples, 1, 16, 16, generator=generator)
    y = torch.randint(0, config.classes, (config.samples,), generator=generator)
    return Problem("CNN 1x16x16 c16-c32", model, nn.CrossEntropyLoss(), split(x, y, config.batches))


@cache
def _load_builtin() -> Problem:
    loaded = load_problem()  # trains for about a second: once per run
    linears = [m for m in loaded.model if isinstance(m, nn.Linear)]
    sizes = [m.in_features for m in linears] + [linears[-1].out_features]
    name = f"built-in: {loaded.name} MLP {'-'.join(map(str, sizes))}"
    return Problem(name, loaded.model, loaded.loss_fn, loaded.data)


def builtin_problem(dtype: torch.dtype = torch.float64) -> Problem:
    """curvop's built-in problem, ``curvop.problems.load_problem()``, as a fresh copy in ``dtype``.

    A 64-32-10 tanh MLP trained on scikit-learn's digits (synthetic data of the same shape without
    scikit-learn), 2,410 parameters, 1,797 samples in batches of 512, 512, 512 and 261: the short
    last batch is part of the point. Loaded in float64 (its default); float32 casts those weights.
    """
    return _load_builtin().to(dtype)


def synthetic_problems(config: Config) -> list[Problem]:
    """The sized synthetic problems, float32: the MLP, and the CNN unless ``--no-cnn``."""
    problems = [mlp_problem(config)]
    return problems + [cnn_problem(config)] if config.cnn else problems


def main_problems(config: Config) -> list[Problem]:
    """The built-in problem (cast to float32, like the others) and the synthetic problems."""
    return [builtin_problem(torch.float32), *synthetic_problems(config)]


# ----------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class Truth:
    """Dense float64 Hessian and GGN of a problem, built independently of curvop and the peers."""

    hessian: torch.Tensor
    ggn: torch.Tensor
    seconds: float

    def matrix(self, kind: str) -> torch.Tensor:
        """The exact matrix an operator of ``kind`` approximates (the Hessian for the FD one)."""
        return self.ggn if kind == "ggn" else self.hessian

    def top_eigenvalues(self, kind: str, k: int) -> np.ndarray:
        """The ``k`` largest eigenvalues, decreasing (ARPACK at machine precision, on the matrix)."""
        matrix = self.matrix(kind).numpy()
        v0 = np.ones(matrix.shape[0])
        values = eigsh(matrix, k=k, which="LA", tol=0, v0=v0, return_eigenvectors=False)
        return np.sort(values)[::-1]


def dense_truth(problem: Problem, chunk: int = 128) -> Truth:
    """The dense Hessian and GGN of the mean loss in float64, with ``torch.func`` alone.

    All samples form one batch (so no batch weighting enters at all). Hessian columns are
    forward-over-reverse products (``jvp`` of ``grad``); GGN columns push ``jvp`` through the
    model, the loss's Hessian in the output (``jvp`` of ``grad``) and a ``vjp`` back. ``chunk``
    unit vectors at a time under ``vmap``.
    """
    start = time.perf_counter()
    problem = problem.to(torch.float64)
    named = [(name, p) for name, p in problem.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    x = torch.cat([x for x, _ in problem.batches])
    y = torch.cat([y for _, y in problem.batches])

    def output(flat: torch.Tensor) -> torch.Tensor:
        pieces = flat.split([shape.numel() for shape in shapes])
        weights = {n: t.view(s) for (n, _), t, s in zip(named, pieces, shapes, strict=True)}
        return functional_call(problem.model, weights, (x,))

    def loss_of_output(out: torch.Tensor) -> torch.Tensor:
        return problem.loss_fn(out, y)

    out, pullback = vjp(output, theta)

    def hessian_column(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(lambda t: loss_of_output(output(t))), (theta,), (v,))[1]

    def ggn_column(v: torch.Tensor) -> torch.Tensor:
        jv = jvp(output, (theta,), (v,))[1]
        return pullback(jvp(grad(loss_of_output), (out,), (jv,))[1])[0]

    eye = torch.eye(theta.numel(), dtype=torch.float64)

    def dense(column: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return torch.cat([vmap(column)(block) for block in eye.split(chunk)])

    hessian, ggn = dense(hessian_column), dense(ggn_column)
    return Truth(hessian, ggn, time.perf_counter() - start)


@cache
def builtin_truth() -> Truth:
    """:func:`dense_truth` of the built-in problem (about 15 s at n = 2,410): once per run."""
    return dense_truth(builtin_problem())


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Ratio:
    """Median and quartiles of (time of a task) / (time of one gradient) over repeats."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{fmt(self.median)} ({fmt(self.low)}–{fmt(self.high)})"

    def scaled(self, factor: float) -> Ratio:
        return Ratio(self.median * factor, self.low * factor, self.high * factor)


def fmt(value: float) -> str:
    """Two or three significant digits, compact."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


MIN_TIME = 0.02  # seconds: a call shorter than this is repeated within one timing


def elapsed(task: Task, number: int = 1) -> float:
    """Seconds per call of ``task``, over ``number`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(number):
        task()
    return (time.perf_counter() - start) / number


def calibrate(task: Task) -> int:
    """Calls per timing so that one timing lasts at least :data:`MIN_TIME` (timeit-style).

    The first call is the warm-up; a fast task is timed once more to choose the count.
    """
    if elapsed(task) >= MIN_TIME:
        return 1
    return max(1, math.ceil(MIN_TIME / max(elapsed(task), 1e-7)))


def ratios_to_gradient(
    tasks: dict[str, Task], gradient: Task, repeats: int, *, warm_up: bool = True
) -> tuple[dict[str, Ratio], float]:
    """Time each task against the gradient, interleaved; also return the median gradient time.

    Each repeat runs the tasks in a rotated order and times a gradient between consecutive
    tasks; a task's ratio divides its time by the mean of the gradients right before and after
    it. Every task is first called untimed (skipped when ``warm_up`` is false: the caller has
    warmed them up) and calls shorter than :data:`MIN_TIME` are repeated within a timing.
    """
    numbers = {name: calibrate(task) if warm_up else 1 for name, task in tasks.items()}
    gradient_number = calibrate(gradient)
    names = list(tasks)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gradient_times = [elapsed(gradient, gradient_number)]
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            spent = elapsed(tasks[name], numbers[name])
            gradient_times.append(elapsed(gradient, gradient_number))
            samples[name].append(spent / statistics.fmean(gradient_times[-2:]))
    median_gradient = statistics.median(gradient_times)
    return {name: summarize(values) for name, values in samples.items()}, median_gradient


def summarize(values: list[float]) -> Ratio:
    low, median, high = np.percentile(values, [25, 50, 75])
    return Ratio(float(median), float(low), float(high))


# ----------------------------------------------------------------------------- counting
class ForwardCounter:
    """Counts calls of a model's forward (a forward hook), as a context manager."""

    def __init__(self, model: nn.Module):
        self.model, self.count = model, 0

    def _hook(self, *_: object) -> None:
        self.count += 1

    def __enter__(self) -> ForwardCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.remove()


@contextmanager
def counted_matvecs(operator: LinearOperator) -> Iterator[list[int]]:
    """Count the products SciPy asks of ``operator`` (``matvec`` and ``matmat`` columns)."""
    calls = [0]
    matvec, matmat = operator.matvec, operator.matmat

    def counting_matvec(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return matvec(x)

    def counting_matmat(X: np.ndarray) -> np.ndarray:
        calls[0] += X.shape[1]
        return matmat(X)

    operator.matvec, operator.matmat = counting_matvec, counting_matmat
    try:
        yield calls
    finally:
        del operator.matvec, operator.matmat


def top_eigenvalue(operator: LinearOperator, tol: float, seed: int) -> float:
    """The largest algebraic eigenvalue by ARPACK, from a fixed start vector."""
    v0 = np.random.default_rng(seed).standard_normal(operator.shape[0]).astype(operator.dtype)
    return float(eigsh(operator, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)[0])


def relative_difference(a: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|a - reference| / max|reference|``, in float64."""
    a, reference = a.double(), reference.double()
    return float((a - reference).abs().max() / reference.abs().max())


# ----------------------------------------------------------------------------- markdown
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, intro: str, body: str) -> str:
    return f"### {title}\n\n{intro}\n\n{body}\n\n"


# ----------------------------------------------------------------------------- 1. products
def bench_products(config: Config) -> str:
    """One product (k = 1) of each operator, per model and dtype."""
    rows = []
    for base in main_problems(config):
        for dtype_name, dtype in DTYPES.items():
            problem = base.to(dtype)
            v = problem.vectors(1, config.seed)[:, 0]
            tasks = {kind: _apply_task(problem.operator(kind), v) for kind in OPERATORS}
            ratios, grad_time = ratios_to_gradient(tasks, problem.gradient, config.repeats)
            rows.append(
                [problem.name, dtype_name, f"{problem.size:,}", problem.layout]
                + [f"{grad_time * 1e3:.1f}"]
                + [ratios[kind] for kind in OPERATORS]
            )
    headers = ["model", "dtype", "n", "batches", "gradient (ms)"] + [LABELS[k] for k in OPERATORS]
    return section(
        "1. One product (k = 1), in gradients",
        "`op.apply(v)` on a torch vector. The built-in problem is `curvop.problems.load_problem()` "
        "(trained in float64, its default; the float32 row casts those weights and data).",
        table(headers, rows),
    )


def _apply_task(operator: curvop.CurvatureOperator, V: torch.Tensor) -> Task:
    return lambda: operator.apply(V)


def _loop_task(operator: curvop.CurvatureOperator, columns: list[torch.Tensor]) -> Task:
    return lambda: [operator.apply(c) for c in columns]


# ----------------------------------------------------------------------------- 2. blocks
def bench_blocks(config: Config) -> str:
    """``apply`` on an ``(n, k)`` block versus ``k`` separate products, per column."""
    problem = mlp_problem(config)
    rows = []
    for kind in OPERATORS:
        operator = problem.operator(kind)
        tasks: dict[str, Task] = {}
        for k in config.blocks:
            V = problem.vectors(k, config.seed)
            tasks[f"block {k}"] = _apply_task(operator, V)
            if k > 1:
                tasks[f"loop {k}"] = _loop_task(operator, [c.contiguous() for c in V.T])
        ratios, _ = ratios_to_gradient(tasks, problem.gradient, config.repeats)
        for k in config.blocks:
            block = ratios[f"block {k}"].scaled(1 / k)
            loop = ratios[f"loop {k}"].scaled(1 / k) if k > 1 else block
            rows.append([LABELS[kind], k, block, loop, f"{loop.median / block.median:.2f}x"])
    headers = ["operator", "k", "block, per column", "k matvecs, per column", "speed-up"]
    return section(
        "2. Block products, per column, in gradients",
        f"{problem.name}, float32, n = {problem.size:,}. `op.apply(V)` with `V` of shape (n, k) "
        "(one pass over the data) versus k calls `op.apply(v)` (k passes).",
        table(headers, rows),
    )


# ----------------------------------------------------------------------------- 3. outputs
def bench_outputs(config: Config) -> str:
    """GGN cost against the number of model outputs, and the reference's per-output loop."""
    rows = []
    for outputs in config.outputs:
        row: list[object] = [outputs]
        for loss in ("mse", "ce"):
            if loss == "ce" and outputs < 2:
                row.append("–")
                continue
            problem = mlp_problem(config, outputs=outputs, loss=loss)
            v = problem.vectors(1, config.seed)[:, 0]
            tasks = {"ggn": _apply_task(problem.operator("ggn"), v)}
            ratios, _ = ratios_to_gradient(tasks, problem.gradient, config.repeats)
            row.append(ratios["ggn"])
        rows.append(row)
    sweep = table(["outputs", "GGN, MSE loss", "GGN, cross-entropy"], rows)

    naive_rows = []
    for outputs in config.naive_outputs:
        problem = mlp_problem(
            config,
            outputs=outputs,
            loss="mse",
            samples=32,
            batch_size=32,
            in_features=16,
            width=32,
            depth=1,
        )
        v = problem.vectors(1, config.seed)[:, 0]
        operator = problem.operator("ggn")
        tasks = {
            "curvop": _apply_task(operator, v),
            "naive": lambda p=problem, v=v: naive_ggn(p, v),
        }
        ratios, _ = ratios_to_gradient(tasks, problem.gradient, config.repeats)
        gap = relative_difference(naive_ggn(problem, v), operator.apply(v))
        naive_rows.append([outputs, 32 * outputs, ratios["curvop"], ratios["naive"], f"{gap:.1e}"])
    naive = table(
        ["outputs", "backward passes (naive)", "curvop GGN", "per-output loop", "max rel. diff"],
        naive_rows,
    )
    return section(
        "3. GGN product against the number of outputs, in gradients",
        f"{mlp_problem(config).name.rsplit('-', 1)[0]}-C, float32, {config.samples} samples in "
        f"{config.batches} batches, k = 1:",
        sweep,
    ) + section(
        "3b. The reference's per-output loop, on a tiny case",
        "MLP 16-32-C, one batch of 32 samples, MSE, float32. The loop takes one backward pass per "
        "output element to build Jv (as the reference `gauss_newton_product` did, here without "
        "its `create_graph`), then the same loss-Hessian and vjp steps.",
        naive,
    )


def naive_ggn(problem: Problem, v: torch.Tensor) -> torch.Tensor:
    """The GGN product with Jv built one output element at a time (batch x outputs passes)."""
    params, total = problem.params, problem.num_samples
    pieces = [
        t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)
    ]
    result = torch.zeros(problem.size, dtype=torch.float64)
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


# ----------------------------------------------------------------------------- 4. passes
def bench_passes(config: Config) -> str:
    """Forward passes at construction, per product, and during ``eigsh``."""
    problem = mlp_problem(config)
    num_batches = len(problem.batches)
    rows = []
    for kind in OPERATORS:
        with ForwardCounter(problem.model) as built:
            operator = problem.operator(kind)
        with ForwardCounter(problem.model) as one:
            operator.apply(problem.vectors(1, config.seed)[:, 0])
        with ForwardCounter(problem.model) as during, counted_matvecs(operator) as asked:
            top_eigenvalue(operator, config.eig_tol, config.seed)
        passes = during.count / one.count
        rows.append(
            [
                f"curvop {LABELS[kind]}",
                built.count,
                f"{one.count / num_batches:g}",
                asked[0],
                f"{passes:g}",
                f"{passes - asked[0]:+g}",
            ]
        )
    # The pitfall, for contrast: a LinearOperator built without dtype runs a trial product.
    hessian = problem.operator("hessian")
    with ForwardCounter(problem.model) as built:
        LinearOperator(hessian.shape, matvec=hessian.matvec)
    rows.append(["`LinearOperator(shape, matvec=H.matvec)`, no dtype", built.count, "", "", "", ""])
    for library in peers.available_peers() if config.peers else []:
        for kind in ("hessian", "ggn"):
            with ForwardCounter(problem.model) as built:
                peer = peers.build_peer(
                    library, kind, problem.model, problem.loss_fn, problem.batches, defaults=True
                )
            if peer is not None:
                rows.append(
                    [f"{library} {LABELS[kind]}, default options", built.count, "", "", "", ""]
                )
    headers = [
        "operator",
        "forwards at construction",
        "forwards per product per batch",
        "eigsh: products asked",
        "eigsh: data passes",
        "extra passes",
    ]
    return section(
        "4. No wasted passes",
        f"{problem.name}, float32, {num_batches} batches; forwards counted by a forward hook. "
        f"eigsh(k=1, which='LA', tol={config.eig_tol:g}); data passes = forwards during eigsh / "
        "forwards of one product.",
        table(headers, rows),
    )


# ----------------------------------------------------------------------------- 5. peers
def bench_peers(config: Config) -> str:
    """Product cost, agreement and top eigenvalue: curvop against the installed peers."""
    libraries = peers.available_peers() if config.peers else []
    if not libraries:
        return section(
            "5. Peers",
            "skipped: --no-peers, or neither curvlinops nor hessian-eigenthings imports here.",
            "",
        )
    versions = ", ".join(f"{lib} {peers.peer_version(lib)}" for lib in libraries)
    return (
        section(
            "5. Peers: one product, in gradients",
            f"float32, k = 1 unless noted; {versions}.",
            _peer_costs(config, libraries),
        )
        + section(
            "5b. Peers: agreement of the products",
            _AGREEMENT_INTRO,
            _peer_agreement(config, libraries),
        )
        + section(
            "5c. Peers: top eigenvalue by eigsh",
            _EIGSH_INTRO.format(tol=config.eig_tol),
            _peer_eigsh(config, libraries),
        )
        + section(
            "5d. Peers on the built-in problem: products against a dense ground truth",
            _BUILTIN_INTRO.format(seconds=builtin_truth().seconds),
            _peer_builtin(config, libraries),
        )
    )


_AGREEMENT_INTRO = (
    "max |product − reference| / max |reference| for one fixed random vector. Reference: curvop's "
    "exact product (Hessian, or GGN for the GGN row) in float64 on the same weights and data, so "
    "the float64 rows compare implementations and the float32 rows add rounding. FD rows compare "
    "finite differences with the exact Hessian. The last MLP splits 1000 samples into batches of "
    "128, the last holding 104; the built-in problem, which also has a short last batch, is in 5d."
)
_EIGSH_INTRO = (
    "`scipy.sparse.linalg.eigsh(k=1, which='LA', tol={tol:g})` from the same start vector on each "
    "library's operator as a SciPy LinearOperator (curvlinops: `to_scipy()`; hessian-eigenthings: "
    "wrapped with an explicit dtype): the sized MLP in float32, the built-in problem in float64 "
    "(its default), where the error is relative to the top eigenvalue of the dense ground truth "
    "of 5d. Time in gradients, products counted."
)
_BUILTIN_INTRO = (
    "`curvop.problems.load_problem()`: 2,410 parameters, 1,797 samples in batches of 512, 512, "
    "512 and 261. Ground truth: the dense Hessian and GGN in float64 built with `torch.func` alone "
    "(all samples as one batch, so no batch weighting enters; forward-over-reverse columns under "
    "`vmap`; {seconds:.0f} s), independent of curvop and of both peers. Figures are "
    "max |product − reference| / max |reference| for one fixed random vector; FD rows are "
    "compared with the exact Hessian. Last column: the reference is the *plain* mean of the four "
    "per-batch exact products (curvop, float64, one batch at a time), i.e. batches weighted by "
    "count instead of by samples."
)


def _peer_costs(config: Config, libraries: list[str]) -> str:
    rows = []
    k = max(config.blocks)
    for problem in main_problems(config):
        tasks: dict[str, Task] = {}
        v = problem.vectors(1, config.seed)[:, 0]
        V = problem.vectors(k, config.seed)
        for kind in OPERATORS:
            operator = problem.operator(kind)
            tasks[f"curvop {kind}"] = _apply_task(operator, v)
            if kind != "fd_hessian":
                tasks[f"curvop {kind} block"] = _apply_task(operator, V)
            for library in libraries:
                peer = peers.build_peer(
                    library, kind, problem.model, problem.loss_fn, problem.batches
                )
                if peer is None:
                    continue
                tasks[f"{library} {kind}"] = lambda m=peer.matvec, v=v: m(v)
                if library == "curvlinops":
                    tasks[f"{library} {kind} block"] = lambda m=peer.matvec, V=V: m(V)
        ratios, _ = ratios_to_gradient(tasks, problem.gradient, config.repeats)
        for kind in OPERATORS:
            row: list[object] = [problem.name, LABELS[kind]]
            for name in ["curvop", *libraries]:
                row.append(ratios.get(f"{name} {kind}", "–"))
            for name in ("curvop", "curvlinops"):
                block = ratios.get(f"{name} {kind} block")
                row.append(block.scaled(1 / k) if block else "–")
            rows.append(row)
    headers = (
        ["model", "operator", "curvop"]
        + libraries
        + [f"curvop, k={k} per column", f"curvlinops, k={k} per column"]
    )
    return table(headers, rows)


def _peer_agreement(config: Config, libraries: list[str]) -> str:
    rows = []
    cases = [*synthetic_problems(config), mlp_problem(config, samples=1000, batch_size=128)]
    for base in cases:
        reference_problem = base.to(torch.float64)
        v64 = reference_problem.vectors(1, config.seed)[:, 0]
        references = {
            "hessian": reference_problem.operator("hessian").apply(v64),
            "ggn": reference_problem.operator("ggn").apply(v64),
        }
        references["fd_hessian"] = references["hessian"]
        for dtype_name, dtype in DTYPES.items():
            problem = reference_problem if dtype == torch.float64 else base.to(dtype)
            v = v64.to(dtype)
            for kind in OPERATORS:
                row: list[object] = [problem.name, dtype_name, problem.layout, LABELS[kind]]
                products = {"curvop": problem.operator(kind).apply(v)}
                for library in libraries:
                    peer = peers.build_peer(
                        library, kind, problem.model, problem.loss_fn, problem.batches
                    )
                    if peer is not None:
                        products[library] = peer.matvec(v)
                for name in ["curvop", *libraries]:
                    if name not in products:
                        row.append("–")
                    elif name == "curvop" and dtype == torch.float64 and kind != "fd_hessian":
                        row.append("(reference)")
                    else:
                        row.append(f"{relative_difference(products[name], references[kind]):.1e}")
                rows.append(row)
    return table(["model", "dtype", "batches", "operator", "curvop", *libraries], rows)


def _peer_eigsh(config: Config, libraries: list[str]) -> str:
    cases = [(mlp_problem(config), None), (builtin_problem(), builtin_truth())]
    rows = []
    for problem, truth in cases:
        dtype_name = str(problem.dtype).removeprefix("torch.")
        for kind in ("hessian", "ggn"):
            operators: dict[str, LinearOperator] = {"curvop": problem.operator(kind)}
            for library in libraries:
                peer = peers.build_peer(
                    library, kind, problem.model, problem.loss_fn, problem.batches
                )
                if peer is not None:
                    operators[library] = peer.scipy()
            eigenvalues, counts = {}, {}
            for name, operator in operators.items():
                with counted_matvecs(operator) as asked:
                    eigenvalues[name] = top_eigenvalue(operator, config.eig_tol, config.seed)
                counts[name] = asked[0]
            tasks = {
                name: lambda op=op: top_eigenvalue(op, config.eig_tol, config.seed)
                for name, op in operators.items()
            }
            # the counted run above was the warm-up; eigsh runs are long, so fewer repeats
            ratios, _ = ratios_to_gradient(
                tasks, problem.gradient, max(1, config.repeats // 2), warm_up=False
            )
            exact = None if truth is None else float(truth.top_eigenvalues(kind, 1)[0])
            for name in operators:
                error = "–" if exact is None else f"{abs(eigenvalues[name] - exact) / exact:.1e}"
                rows.append(
                    [
                        problem.name,
                        dtype_name,
                        LABELS[kind],
                        name,
                        f"{eigenvalues[name]:.6g}",
                        error,
                        counts[name],
                        ratios[name],
                    ]
                )
    headers = [
        "model",
        "dtype",
        "operator",
        "library",
        "top eigenvalue",
        "rel. error vs dense",
        "products",
        "time (gradients)",
    ]
    return table(headers, rows)


def _peer_builtin(config: Config, libraries: list[str]) -> str:
    truth = builtin_truth()
    reference_problem = builtin_problem()
    v64 = reference_problem.vectors(1, config.seed)[:, 0]
    exact = {kind: truth.matrix(kind) @ v64 for kind in OPERATORS}
    # batches weighted by count: the mean of the exact per-batch products
    plain_mean = {
        kind: torch.stack(
            [
                OPERATORS["ggn" if kind == "ggn" else "hessian"](
                    reference_problem.model, reference_problem.loss_fn, [batch]
                ).apply(v64)
                for batch in reference_problem.batches
            ]
        ).mean(0)
        for kind in OPERATORS
    }
    rows = []
    for dtype_name, dtype in DTYPES.items():
        problem = reference_problem if dtype == torch.float64 else reference_problem.to(dtype)
        v = v64.to(dtype)
        for kind in OPERATORS:
            products = {"curvop": problem.operator(kind).apply(v)}
            for library in libraries:
                peer = peers.build_peer(
                    library, kind, problem.model, problem.loss_fn, problem.batches
                )
                if peer is not None:
                    products[library] = peer.matvec(v)
            for name, product in products.items():
                rows.append(
                    [
                        dtype_name,
                        LABELS[kind],
                        name,
                        f"{relative_difference(product, exact[kind]):.1e}",
                        "–"
                        if name == "curvop"
                        else f"{relative_difference(product, products['curvop']):.1e}",
                        f"{relative_difference(product, plain_mean[kind]):.1e}",
                    ]
                )
    headers = [
        "dtype",
        "operator",
        "library",
        "vs dense truth",
        "vs curvop (same dtype)",
        "vs plain mean of batches",
    ]
    return table(headers, rows)


# ----------------------------------------------------------------------------- 6. linalg
def linalg_calls(config: Config) -> list[tuple[str, dict[str, object]]]:
    """The curvop.linalg calls timed in section 6, with their options (seeded)."""
    seed = config.seed
    return [
        ("top_eigenvalues", {"k": 1, "tol": config.eig_tol, "seed": seed}),
        ("top_eigenvalues", {"k": 5, "tol": config.eig_tol, "seed": seed}),
        ("hutchpp_trace", {"num_matvecs": config.trace_matvecs, "seed": seed}),
        ("xtrace", {"num_matvecs": config.trace_matvecs, "seed": seed}),
        (
            "spectral_density",
            {"num_probes": config.slq_probes, "num_steps": config.slq_steps, "seed": seed},
        ),
    ]


def bench_linalg(config: Config) -> str:
    """curvop's own estimators, when they exist, timed in gradients and checked where possible."""
    calls = linalg_calls(config)
    present = [(name, options) for name, options in calls if hasattr(curvop, name)]
    if not present:
        names = sorted({name for name, _ in calls})
        return section(
            "6. curvop.linalg estimators",
            f"skipped: curvop has none of {', '.join(names)} yet.",
            "",
        )
    rows = []
    for problem, truth in ((mlp_problem(config), None), (builtin_problem(), builtin_truth())):
        operator = problem.operator("hessian")
        for name, options in present:
            call = _call_task(getattr(curvop, name), operator, options)
            shown = ", ".join(f"{key}={value}" for key, value in options.items() if key != "seed")
            row: list[object] = [problem.name, f"`{name}`", shown]
            try:
                with ForwardCounter(problem.model) as counter:
                    result = call()  # also the warm-up
            except Exception as error:  # a signature this script does not know: report, go on
                rows.append(row + [f"skipped: {type(error).__name__}: {error}", "", "", ""])
                continue
            ratios, _ = ratios_to_gradient(
                {name: call}, problem.gradient, max(1, config.repeats // 4), warm_up=False
            )
            passes = counter.count / len(problem.batches)
            error = "–" if truth is None else _error_vs_truth(name, result, truth)
            rows.append(row + [ratios[name], f"{passes:g}", _per_pass(ratios[name], passes), error])
    headers = [
        "model",
        "function",
        "options",
        "time (gradients)",
        "data passes",
        "gradients per pass",
        "error vs dense",
    ]
    return section(
        "6. curvop.linalg estimators on the Hessian, in gradients",
        "The sized MLP in float32; the built-in problem in float64 (its default), checked against "
        "the dense ground truth of 5d (no dense truth at the MLP's size). Data passes counted by "
        "the forward hook (one forward per batch per product, whatever the block width). Errors "
        "are relative: eigenvalues, the largest over the k returned; traces, |estimate − trace| "
        "with the estimator's own standard error in brackets; SLQ, the trace n·mean(Σ w·θ) its "
        "quadrature implies and its largest Ritz value θ against λ_max.",
        table(headers, rows),
    )


def _error_vs_truth(name: str, result: object, truth: Truth) -> str:
    """Relative error of an estimator's result against the dense Hessian (see section 6)."""
    trace = float(truth.hessian.trace())
    if name == "top_eigenvalues":
        values = np.sort(np.asarray(result))[::-1]
        exact = truth.top_eigenvalues("hessian", len(values))
        return f"{float(np.max(np.abs(values - exact) / np.abs(exact))):.1e}"
    if isinstance(result, curvop.Estimate):
        error, spread = abs(result.value - trace) / abs(trace), result.std_error / abs(trace)
        return f"{error:.1e} (± {spread:.1e})"
    if isinstance(result, curvop.SpectralDensity) and result.nodes is not None:
        n = truth.hessian.shape[0]
        implied = n * float(np.mean(np.sum(result.weights * result.nodes, axis=1)))
        top = float(truth.top_eigenvalues("hessian", 1)[0])
        return (
            f"trace {abs(implied - trace) / abs(trace):.1e}, "
            f"λ_max {abs(float(np.max(result.nodes)) - top) / top:.1e}"
        )
    return "–"


def _call_task(function: Callable, operator: LinearOperator, options: dict[str, object]) -> Task:
    return lambda: function(operator, **options)


def _per_pass(ratio: Ratio, passes: float) -> str:
    return fmt(ratio.median / passes) if passes else "–"


# ----------------------------------------------------------------------------- main
def header(config: Config, args: argparse.Namespace) -> str:
    mode = "quick" if args.quick else "full"
    return (
        f"## curvop benchmark ({mode})\n\n"
        f"- torch {torch.__version__} (torch threads: {torch.get_num_threads()}); numpy {np.__version__}, "
        f"scipy {scipy.__version__}; Python {platform.python_version()}; "
        f"{platform.machine()}, {_cpu_count()} CPUs visible\n"
        f"- run {time.strftime('%Y-%m-%d %H:%M %Z')}; curvop {_revision()}; "
        f"load average (1 min) at start: {os.getloadavg()[0]:.1f}\n"
        f"- median of {config.repeats} repeats, interquartile range in brackets; "
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


def main(argv: Sequence[str] | None = None) -> None:
    config, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = [header(config, args)]
    print(parts[0], flush=True)
    for bench in (
        bench_products,
        bench_blocks,
        bench_outputs,
        bench_passes,
        bench_peers,
        bench_linalg,
    ):
        began = time.perf_counter()
        parts.append(bench(config))
        print(parts[-1], flush=True)
        print(f"<!-- {bench.__name__}: {time.perf_counter() - began:.0f} s -->\n", file=sys.stderr)
    parts.append(
        f"_Total wall time {time.perf_counter() - start:.0f} s; "
        f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}._\n"
    )
    report = "\n".join(parts)
    print(parts[-1])
    if args.output:
        with open(args.output, "w") as file:
            file.write(report)


if __name__ == "__main__":
    main()
