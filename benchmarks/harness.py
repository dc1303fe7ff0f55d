"""What every benchmark section shares: the run's settings, interleaved timing in units of one
gradient (clocks read after the device's queued work has finished), a counter of model forwards,
markdown, and the list of targets checked. Products are counted by ``curvop.count_products``."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import peers
import torch
from models import Problem, build
from peaks import Peak, measured_peak
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

import curvop

Task = Callable[[], object]

OPERATORS = {
    "hessian": curvop.HessianOperator,
    "ggn": curvop.GaussNewtonOperator,
    "fd_hessian": curvop.FiniteDifferenceHessianOperator,
}
LABELS = {"hessian": "Hessian", "ggn": "GGN", "fd_hessian": "FD-Hessian"}

MIN_TIME = 0.02  # seconds: a call shorter than this is repeated within one timing
SLOW_TASK = 0.1  # seconds: a warm-up call this long is timed once per repeat, uncalibrated


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Sizes and switches of one benchmark run (see ``bench.py --help``)."""

    scale: str  # of the data and models, one of models.SCALES
    device: str  # where models, data and vectors live: "cpu" or "cuda" (or "cuda:1", ...)
    repeats: int  # per figure of the product sections
    long_repeats: int  # per figure of eigensolvers and SLQ (calls of seconds to minutes)
    models: tuple[str, ...]  # keys of models.MODELS for sections 1, 2 and 4
    solver_models: tuple[str, ...]  # the same for section 3
    memory_models: tuple[str, ...]  # the same for section 5
    sections: tuple[str, ...]
    blocks: tuple[int, ...]  # block widths k of section 2
    forced_blocks: tuple[int, ...]  # block widths at which every forced kernel is timed too
    eig_k: int
    eig_tol: float
    slq: tuple[tuple[int, int], ...]  # (probes, steps)
    trace_matvecs: int
    outputs: tuple[int, ...]
    naive_outputs: tuple[int, ...]
    peers: bool
    seed: int
    timeout: float  # seconds, per child process of sections 4 and 5
    threads: int  # torch threads, here and in the child processes

    @property
    def quick(self) -> bool:
        return self.scale == "quick"


def problem_of(name: str, config: Config) -> Problem:
    """The problem ``name`` (a key of ``models.MODELS``) at the run's scale, seed and device."""
    return build(name, config.seed, config.scale, config.device)


def peer_libraries(config: Config) -> list[str]:
    """The peers this run compares with: those that import, unless ``--no-peers``."""
    return peers.available_peers() if config.peers else []


def log(message: str) -> None:
    """Progress on stderr (the report is stdout), as an HTML comment."""
    print(f"<!-- {message} -->", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- operators
def make_operator(problem: Any, kind: str, **options: Any) -> curvop.CurvatureOperator:
    """curvop's operator of ``kind`` (a key of :data:`OPERATORS`) on a ``models.Problem``."""
    return OPERATORS[kind](problem.model, problem.loss_fn, problem.batches, **options)


def apply_task(operator: curvop.CurvatureOperator, V: torch.Tensor) -> Task:
    """A task that multiplies ``V`` (a vector or a block) by ``operator``."""
    return lambda: operator.apply(V)


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Ratio:
    """Median and quartiles of (time of a task) / (time of one gradient) over repeats, and the
    median of the task's own time in seconds."""

    median: float
    low: float
    high: float
    seconds: float = math.nan

    def __str__(self) -> str:
        return f"{fmt(self.median)} ({fmt(self.low)}–{fmt(self.high)})"

    def scaled(self, factor: float) -> Ratio:
        return Ratio(
            self.median * factor, self.low * factor, self.high * factor, self.seconds * factor
        )


def fmt(value: float) -> str:
    """Two or three significant digits, compact."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def now() -> float:
    """A wall-clock reading (seconds) after all work queued on CUDA devices has finished (CPU
    work is synchronous): CUDA kernels run asynchronously, so a clock read without waiting
    would time their launch, not their work."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def elapsed(task: Task, number: int = 1) -> float:
    """Seconds per call of ``task``, over ``number`` back-to-back calls."""
    start = now()
    for _ in range(number):
        task()
    return (now() - start) / number


def error_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:160]}"


@dataclass(frozen=True)
class Prepared:
    """Tasks after their warm-up call: those that ran (how long the call took, and the peak
    memory of a second call where asked), and the errors of those that raised."""

    tasks: dict[Hashable, Task]
    seconds: dict[Hashable, float]
    errors: dict[Hashable, str]
    peaks: dict[Hashable, Peak] = field(default_factory=dict)


def prepare(tasks: dict[Hashable, Task], device: str | None = None) -> Prepared:
    """Call every task once: the warm-up (``kernel="auto"`` chooses on its first product of
    each width), which also tells which tasks fail (a model a kernel cannot handle, or memory
    running out: reported, not fatal). With a ``device``, a second call per task measures its
    peak memory there (see ``peaks.py``)."""
    working, seconds, errors, peaks = {}, {}, {}, {}
    for name, task in tasks.items():
        start = now()
        try:
            task()
            seconds[name] = now() - start
            if device is not None:
                with measured_peak(device) as peaks[name]:
                    task()
        except Exception as error:
            errors[name] = error_line(error)
            seconds.pop(name, None)
            peaks.pop(name, None)
            _release_cuda_cache(device)
        else:
            working[name] = task
    return Prepared(working, seconds, errors, peaks)


def _release_cuda_cache(device: str | None) -> None:
    """After a failure (memory running out, typically), give the allocator's cache back so that
    the next task starts from what is really held."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def calibrate(task: Task, first: float | None = None) -> int:
    """Calls per timing so that one timing lasts at least :data:`MIN_TIME` (timeit-style). A
    task whose warm-up call (``first`` seconds, or one more call) took :data:`SLOW_TASK` or more
    is timed once per timing."""
    first = elapsed(task) if first is None else first
    if first >= SLOW_TASK:
        return 1
    return max(1, math.ceil(MIN_TIME / max(elapsed(task), 1e-7)))


def ratios_to_gradient(
    tasks: dict[Hashable, Task] | Prepared,
    gradient: Task,
    repeats: int,
    *,
    calibrated: bool = True,
) -> tuple[dict[Hashable, Ratio], float]:
    """Time each task against the gradient, interleaved; also return the median gradient time.

    Repeats run the tasks in a random order, then in its reverse, then in a new random order
    and so on (seeded: the same orders in every run; no task always follows the same one, and
    two tasks alternate which goes first), with a gradient timed between consecutive tasks; a
    task's ratio divides its time by the mean of the gradients right before and after it.
    Tasks must be warmed up (:func:`prepare`, whose timings say which are slow);
    ``calibrated`` repeats calls shorter than :data:`MIN_TIME` within one timing, otherwise
    every timing is one call.
    """
    warm = tasks.seconds if isinstance(tasks, Prepared) else {}
    tasks = tasks.tasks if isinstance(tasks, Prepared) else tasks
    numbers = {
        name: calibrate(task, warm.get(name)) if calibrated else 1 for name, task in tasks.items()
    }
    gradient_number = calibrate(gradient)
    names = list(tasks)
    samples: dict[Hashable, list[float]] = {name: [] for name in names}
    seconds: dict[Hashable, list[float]] = {name: [] for name in names}
    gradient_times = [elapsed(gradient, gradient_number)]
    generator, order = np.random.default_rng(0), np.arange(len(names))
    for r in range(repeats):
        order = generator.permutation(len(names)) if r % 2 == 0 else order[::-1]
        for index in order:
            name = names[index]
            spent = elapsed(tasks[name], numbers[name])
            gradient_times.append(elapsed(gradient, gradient_number))
            samples[name].append(spent / statistics.fmean(gradient_times[-2:]))
            seconds[name].append(spent)
    median_gradient = statistics.median(gradient_times)
    ratios = {name: summarize(samples[name], seconds[name]) for name in names}
    return ratios, median_gradient


def summarize(values: list[float], seconds: list[float] | None = None) -> Ratio:
    low, median, high = np.percentile(values, [25, 50, 75])
    spent = float(np.median(seconds)) if seconds else math.nan
    return Ratio(float(median), float(low), float(high), spent)


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


def top_eigenvalue(operator: LinearOperator, tol: float, seed: int) -> float:
    """The largest algebraic eigenvalue by ARPACK, from a fixed start vector."""
    v0 = np.random.default_rng(seed).standard_normal(operator.shape[0]).astype(operator.dtype)
    return float(eigsh(operator, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)[0])


def relative_difference(a: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|a - reference| / max|reference|``, in float64."""
    a, reference = a.detach().double().cpu(), reference.detach().double().cpu()
    return float((a - reference).abs().max() / reference.abs().max())


# ----------------------------------------------------------------------------- markdown
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, intro: str, body: str) -> str:
    return f"### {title}\n\n{intro}\n\n{body}\n\n"


# ----------------------------------------------------------------------------- targets
@dataclass
class Targets:
    """The issue's targets as the sections check them: one row per target and case."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def check(self, target: str, case: str, figures: str, met: bool | None) -> None:
        """Record ``target`` on ``case``: ``figures`` measured, ``met`` (``None``: not measured,
        e.g. a call failed)."""
        verdict = "–" if met is None else ("met" if met else "**not met**")
        self.rows.append((target, case, figures, verdict))

    def report(self) -> str:
        if not self.rows:
            return ""
        return section(
            "Targets",
            "Each target of the issue on each case this run measured (medians; the figures "
            "are in the sections above).",
            table(["target", "case", "figures", "verdict"], self.rows),
        )
