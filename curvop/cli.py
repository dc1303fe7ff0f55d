"""The ``curvop`` command: the main curvature report from a shell, without writing code.

``curvop`` runs it on the built-in digits problem (:mod:`curvop.problems`), comparing the
Hessian with the Gauss-Newton matrix; ``curvop analyze FILE.py:FUNCTION`` runs it on the user's
``FUNCTION() -> (model, loss_fn, data)`` for one operator. The report is the top-k eigenvalues,
a trace estimate with its standard error, the SLQ spectral density (a plot, log scale) and a JSON
summary of all of it, with the settings used; flags choose what to compute and how many products
to spend. Bad arguments give a one-line error and exit code 2, before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import runpy
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import curvop
from curvop.data import Batch, is_single_batch, map_tensors
from curvop.problems import load_problem

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional (pip install 'curvop[demo]')
    tqdm = None

__all__ = ["main"]

OPERATORS: dict[str, tuple[str, type[curvop.CurvatureOperator]]] = {
    "hessian": ("Hessian", curvop.HessianOperator),
    "ggn": ("GGN", curvop.GaussNewtonOperator),
    "fd": ("FD Hessian", curvop.FiniteDifferenceHessianOperator),
}
DEFAULT_DENSITY, DEFAULT_JSON = "spectral_density.png", "curvop_summary.json"
TRACE_NAME, TRACE_MATVECS = "XTrace", 60
DENSITY_PROBES, DENSITY_STEPS = 10, 80
FD_NOTE = (
    "note: the finite-difference Hessian is for models without double backward; where "
    "--operator hessian works it is exact and cheaper. Across ReLU-like kinks differences measure "
    "jumps, not curvature: curvop checks every difference and stops (KinkError) rather than "
    "report them"
)


class UsageError(Exception):
    """A problem with the user's arguments or problem: one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _trace_matvecs(text: str) -> int:
    value = _positive_int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(
            f"{TRACE_NAME} needs at least 4 products (two probes) for a standard error, got {value}"
        )
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0: the default), got {text!r}")
    return value


def _device(text: str) -> torch.device:
    """A device that works here: a tensor can be made on it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"not a device: {text!r} (e.g. cpu, cuda, cuda:1)"
        ) from None
    try:
        torch.zeros(1, device=device)
    except Exception as error:  # AssertionError without CUDA, RuntimeError for a missing index, ...
        raise argparse.ArgumentTypeError(
            f"{text} is not available here: {_first_sentence(error)}"
        ) from None
    return device


def _output_key(text: str) -> str | int:
    """``--output``: an integer selects an index of a tuple, anything else a key or attribute."""
    try:
        return int(text)
    except ValueError:
        return text


def _first_sentence(error: BaseException) -> str:
    """``Type: sentence``: the first sentence of an error that may run to many lines."""
    first_line = next(iter(str(error).strip().splitlines()), "")
    return f"{type(error).__name__}: {first_line.split('. ')[0]}"


def _add_common_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    """Options of both the main job and ``analyze``; only one parser may hold the defaults, or
    ``curvop --k 3 analyze ...`` would lose the 3 to the subcommand's default."""

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    _add_computation_options(parser, default)
    _add_output_options(parser, default)


def _add_computation_options(parser: argparse.ArgumentParser, default: Callable) -> None:
    """What to compute and how many products to spend on it."""
    parser.add_argument(
        "--k",
        type=_positive_int,
        default=default(5),
        help="number of top eigenvalues (5; up to n, the number of parameters: all of them)",
    )
    parser.add_argument(
        "--tol",
        type=_tolerance,
        default=default(0.0),
        help="eigenvalue tolerance relative to the norm (0: 100 eps of the dtype, or the "
        "operator's stated accuracy where larger)",
    )
    parser.add_argument(
        "--trace-matvecs",
        type=_trace_matvecs,
        metavar="N",
        default=default(TRACE_MATVECS),
        help=f"products of the {TRACE_NAME} trace estimate ({TRACE_MATVECS}, at least 4)",
    )
    parser.add_argument(
        "--no-trace", action="store_true", default=default(False), help="skip the trace"
    )
    parser.add_argument(
        "--density-probes",
        type=_positive_int,
        metavar="N",
        default=default(DENSITY_PROBES),
        help=f"SLQ probes of the spectral density ({DENSITY_PROBES})",
    )
    parser.add_argument(
        "--density-steps",
        type=_positive_int,
        metavar="N",
        default=default(DENSITY_STEPS),
        help=f"Lanczos steps per SLQ probe ({DENSITY_STEPS}); the density costs probes x steps",
    )
    parser.add_argument(
        "--no-density",
        action="store_true",
        default=default(False),
        help="skip the spectral density and its plot",
    )
    parser.add_argument(
        "--seed", type=int, default=default(0), help="seed of every random start and probe (0)"
    )
    parser.add_argument(
        "--device",
        type=_device,
        default=default(None),
        help="move the model and data there first, e.g. cpu, cuda, cuda:1 (default: leave them)",
    )


def _add_output_options(parser: argparse.ArgumentParser, default: Callable) -> None:
    """Where the report goes."""
    parser.add_argument(
        "--density",
        metavar="PATH",
        default=default(DEFAULT_DENSITY),
        help=(
            f"where to write the spectral density plot ({DEFAULT_DENSITY}; .png if no suffix; "
            "missing directories are created)"
        ),
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=default(DEFAULT_JSON),
        help=f"where to write the JSON summary ({DEFAULT_JSON}; missing directories are created)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="curvop",
        description=(
            "Top eigenvalues, trace and spectral density of a PyTorch model's curvature. Without "
            "a command: the Hessian and the Gauss-Newton matrix of a small MLP trained on digits."
        ),
    )
    parser.add_argument("--version", action="version", version=f"curvop {curvop.__version__}")
    _add_common_options(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    analyze = commands.add_parser(
        "analyze",
        help="analyze your own problem",
        description=(
            "Analyze the problem returned by FUNCTION() in FILE.py: a tuple (model, loss_fn, "
            "data) as for curvop.HessianOperator(model, loss_fn, data)."
        ),
    )
    analyze.add_argument("problem", metavar="FILE.py:FUNCTION")
    analyze.add_argument(
        "--operator",
        choices=tuple(OPERATORS),
        default="hessian",
        help="hessian (exact, default), ggn (Gauss-Newton) or fd (finite-difference Hessian)",
    )
    analyze.add_argument(
        "--output",
        type=_output_key,
        metavar="KEY",
        default=None,
        help=(
            "when the model returns more than a tensor, the one the loss is computed from: a key "
            "of a dict (logits), an attribute (Hugging Face's logits) or, as an integer, an index "
            "of a tuple (default: the whole output)"
        ),
    )
    _add_common_options(analyze, with_defaults=False)
    parser.set_defaults(output=None)  # the main job's built-in model returns a tensor
    return parser


def _check_output_path(option: str, path: str) -> Path:
    """``path``, checked before any work: not a directory, and in a directory that exists or
    can be created (its missing parents are created when the file is written, by
    :func:`_with_parents`)."""
    if Path(path).is_dir():
        raise UsageError(f"{option}: {path!r} is a directory; give a file name")
    existing = next(parent for parent in Path(path).resolve().parents if parent.exists())
    if not existing.is_dir():
        raise UsageError(
            f"{option}: {str(existing)!r} is a file, not a directory, so {path!r} cannot be "
            "written; give a path in a directory"
        )
    return Path(path)


def _with_parents(path: Path) -> Path:
    """``path``, once its missing parent directories are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _density_path(path: str) -> Path:
    """The file that ``--density PATH`` will write, checked before any work.

    Parameters
    ----------
    path
        The argument. Without a suffix, ``.png`` is appended (matplotlib would write a PNG under
        the bare name); a suffix must name a format that matplotlib writes (png, pdf, svg, ...).
        Without matplotlib the plot is skipped later, so any suffix passes.

    Returns
    -------
    pathlib.Path
        The file to write.
    """
    checked = _check_output_path("--density", path)
    if not checked.suffix:
        return _check_output_path("--density", f"{checked}.png")
    formats = _plot_formats()
    if formats is not None and checked.suffix[1:].lower() not in formats:
        raise UsageError(
            f"--density: matplotlib cannot write {checked.suffix!r} files; give one of "
            f"{', '.join('.' + f for f in sorted(formats))} (or no suffix for .png)"
        )
    return checked


def _plot_formats() -> set[str] | None:
    """The file suffixes that matplotlib writes, without the dot; ``None`` without matplotlib."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    return set(FigureCanvasBase.get_supported_filetypes())


# ---------------------------------------------------------------------------------- the problem
def _one_line(error: BaseException, source: Path | None = None) -> str:
    """``Type: message`` on one line, with the line of ``source`` where it was raised, if any."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    frames = (
        []
        if source is None
        else [
            frame for frame in _traceback_frames(error) if Path(frame.f_code.co_filename) == source
        ]
    )
    return f"{text} ({source.name}, line {frames[-1].f_lineno})" if frames else text


def _traceback_frames(error: BaseException) -> Iterator[Any]:
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def load_user_problem(spec: str) -> tuple[nn.Module, Callable, Any]:
    """Import ``FILE.py`` and call ``FUNCTION()``; check that it returns ``(model, loss_fn, data)``."""
    filename, colon, function_name = spec.rpartition(":")
    if not colon or not filename or not function_name:
        raise UsageError(f"expected FILE.py:FUNCTION, got {spec!r}")
    path = Path(filename).resolve()
    if not path.is_file():
        raise UsageError(f"no such file: {filename!r}")
    with _importable_from(path.parent):
        try:
            namespace = runpy.run_path(str(path), run_name="curvop_user_problem")
        except Exception as error:
            raise UsageError(f"importing {filename} failed: {_one_line(error, path)}") from None
        function = namespace.get(function_name)
        if function is not None and not callable(function):
            kind = type(function).__name__
            raise UsageError(f"{function_name!r} in {filename} is a {kind}, not a function")
        if function is None:
            found = sorted(
                name
                for name, value in namespace.items()
                if callable(value) and getattr(value, "__module__", None) == "curvop_user_problem"
            )
            raise UsageError(
                f"{filename} has no function {function_name!r}"
                + (f" (functions: {', '.join(found)})" if found else "")
            )
        try:
            returned = function()
        except Exception as error:
            raise UsageError(f"{function_name}() raised {_one_line(error, path)}") from None
    return _check_returned(returned, function_name)


@contextmanager
def _importable_from(directory: Path) -> Iterator[None]:
    """Let the user's file import its neighbours, as ``python FILE.py`` would."""
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))


def _check_returned(returned: Any, function_name: str) -> tuple[nn.Module, Callable, Any]:
    expected = f"{function_name}() must return (model, loss_fn, data)"
    if not isinstance(returned, tuple | list) or len(returned) != 3:
        got = (
            f"{len(returned)} values"
            if isinstance(returned, tuple | list)
            else type(returned).__name__
        )
        raise UsageError(f"{expected}, got {got}")
    model, loss_fn, data = returned
    if _has_trainable_parameters(loss_fn) and not _has_trainable_parameters(model):
        raise UsageError(
            f"{expected}, but it looks like (loss_fn, model, data): the first value, a "
            f"{type(model).__name__}, has no parameters to differentiate and the second, a "
            f"{type(loss_fn).__name__}, has; swap them"
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"{expected}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise UsageError(f"{expected}: loss_fn must be callable, got {type(loss_fn).__name__}")
    return model, loss_fn, data


def _has_trainable_parameters(value: Any) -> bool:
    return isinstance(value, nn.Module) and any(p.requires_grad for p in value.parameters())


def build_operator(
    kind: str,
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    source: Path | None = None,
    output: str | int | None = None,
) -> curvop.CurvatureOperator:
    """The operator (``output`` picks the tensor the loss sees, as the operators' ``output=``),
    checked by two products with the same vector (``check_deterministic``) and by
    ``check_symmetric``, so that errors in the problem, data that change between passes and an
    asymmetric operator (finite differences across ReLU kinks) surface here in one line
    (pointing into ``source``, the user's file, when they were raised there) instead of after a
    long eigensolver run."""
    label, cls = OPERATORS[kind]
    try:
        operator = cls(model, loss_fn, data, output=output)
        operator.check_deterministic()
        operator.check_symmetric()
    except Exception as error:
        reason = _one_line(error, source)
        raise UsageError(f"the {label} of the problem cannot be computed: {reason}") from None
    return operator


# ---------------------------------------------------------------------------------- the analysis
@dataclass(frozen=True)
class Settings:
    """What the analysis computes and how many products it may spend.

    Attributes
    ----------
    k
        Number of top eigenvalues.
    tol
        Tolerance of :func:`curvop.top_eigenvalues` (0: its default).
    seed
        Seed of every random start and probe.
    trace_matvecs
        Products of the XTrace estimate; ``None`` skips the trace.
    density_probes, density_steps
        SLQ probes and Lanczos steps per probe; ``None`` skips the density.
    device
        Where ``--device`` moved the model and data; ``None``: they stayed where they were.
    output
        ``--output``: the key, attribute or index of the tensor the loss is computed from;
        ``None``: the model's whole output.
    """

    k: int
    tol: float
    seed: int
    trace_matvecs: int | None
    density_probes: int | None
    density_steps: int | None
    device: torch.device | None
    output: str | int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            k=args.k,
            tol=args.tol,
            seed=args.seed,
            trace_matvecs=None if args.no_trace else args.trace_matvecs,
            density_probes=None if args.no_density else args.density_probes,
            density_steps=None if args.no_density else args.density_steps,
            device=args.device,
            output=args.output,
        )

    def summary(self) -> dict[str, Any]:
        """The settings of the JSON summary (``null`` for a skipped phase); the seed is apart."""
        return {
            "k": self.k,
            "tol": self.tol,
            "trace_matvecs": self.trace_matvecs,
            "density_probes": self.density_probes,
            "density_steps": self.density_steps,
            "device": None if self.device is None else str(self.device),
            "output": self.output,
        }

    @property
    def skipped(self) -> list[str]:
        """The phases that the flags turned off."""
        phases = {"trace": self.trace_matvecs, "density": self.density_probes}
        return [phase for phase, budget in phases.items() if budget is None]


@dataclass
class Analysis:
    """Everything the report says about one operator; ``None`` for a phase that was skipped."""

    name: str
    eigenvalues: np.ndarray
    trace: curvop.Estimate | None
    density: curvop.SpectralDensity | None
    products: dict[str, int]
    seconds: float

    def summary(self, settings: Settings) -> dict[str, Any]:
        """The JSON summary of this operator: only the phases that were computed."""
        summary: dict[str, Any] = {"top_eigenvalues": self.eigenvalues.tolist()}
        if self.trace is not None:
            summary["trace"] = {
                "method": TRACE_NAME.lower(),
                "value": float(self.trace.value),
                "std_error": float(self.trace.std_error),
                "num_matvecs": int(self.trace.num_matvecs),
            }
        if self.density is not None:
            summary["density"] = {
                "method": "slq",
                "num_probes": settings.density_probes,
                "num_steps": settings.density_steps,
                "support": [float(self.density.grid[0]), float(self.density.grid[-1])],
            }
        return {**summary, "products": self.products, "seconds": round(self.seconds, 3)}


def analyze(name: str, operator: curvop.CurvatureOperator, settings: Settings) -> Analysis:
    """Top-k eigenvalues, and unless ``settings`` skip them the trace estimate and the SLQ
    density, of one operator, with the products spent on each."""
    start, k, seed = time.perf_counter(), settings.k, settings.seed
    products: dict[str, int] = {}
    eigenvalues, products["eigenvalues"] = _counted(
        operator,
        f"{name}: top-{k} eigenvalues",
        None,
        lambda: curvop.top_eigenvalues(operator, k, tol=settings.tol, seed=seed),
    )
    trace = density = None
    if settings.trace_matvecs is not None:
        matvecs = settings.trace_matvecs
        trace, products["trace"] = _counted(
            operator, f"{name}: trace", matvecs, lambda: curvop.xtrace(operator, matvecs, seed=seed)
        )
    if settings.density_probes is not None and settings.density_steps is not None:
        probes, steps = settings.density_probes, settings.density_steps
        density, products["density"] = _counted(
            operator,
            f"{name}: spectral density",
            probes * steps,
            lambda: curvop.spectral_density(
                operator, method="slq", num_probes=probes, num_steps=steps, seed=seed
            ),
        )
    elapsed = time.perf_counter() - start
    return Analysis(name, np.asarray(eigenvalues), trace, density, products, elapsed)


def _counted(
    operator: curvop.CurvatureOperator,
    description: str,
    total: int | None,
    compute: Callable[[], Any],
) -> tuple[Any, int]:
    """``compute()`` and the number of column products of ``operator`` it spent, counted by
    :func:`curvop.count_products` (with a progress bar on a terminal when tqdm is installed)."""
    with (
        _progress_bar(description, total) as advance,
        curvop.count_products(operator, advance) as count,
    ):
        result = compute()
    return result, count.columns


@contextmanager
def _progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], Any] | None]:
    """A tqdm bar's ``update`` (the bar shows on a terminal only), or ``None`` without tqdm."""
    if tqdm is None:
        yield None
        return
    bar = tqdm(total=total, desc=description, unit=" products", leave=False, disable=None)
    try:
        yield bar.update
    finally:
        bar.close()


# ---------------------------------------------------------------------------------- the report
Cell = tuple[str, str]  # a value, and its standard error part (" +/- ...") or ""


def format_table(analyses: Sequence[Analysis], k: int) -> str:
    """The eigenvalues, the trace and the cost, one column per operator.

    Numbers have six significant digits (``9.72293e-01``: every one is as wide as the next, so
    right-aligned they line up digit for digit); a standard error follows its value as
    ``+/- 6.4e-02``, the ``+/-`` of one column below each other.
    """
    rows: list[tuple[str, list[Cell]]] = [
        (f"top-{k} eigenvalues", [(a.name, "") for a in analyses])
    ]
    rows += [(f"  {i + 1}", [(_number(a.eigenvalues[i]), "") for a in analyses]) for i in range(k)]
    traces = [a.trace for a in analyses if a.trace is not None]
    if traces:
        cells = [(_number(t.value), f" +/- {t.std_error:.1e}") for t in traces]
        rows.append((f"trace ({TRACE_NAME})", cells))
    rows.append(("products", [(f"{sum(a.products.values()):,}", "") for a in analyses]))
    rows.append(("time", [(f"{a.seconds:.1f} s", "") for a in analyses]))
    return _align(rows)


def _number(value: float) -> str:
    return f"{value:.5e}"


def _align(rows: Sequence[tuple[str, Sequence[Cell]]]) -> str:
    """Labels left-aligned; in each column, values right-aligned and error parts left-aligned."""
    label_width = max(len(label) for label, _ in rows)
    columns = list(zip(*(cells for _, cells in rows), strict=True))
    widths = [
        (max(len(v) for v, _ in column), max(len(e) for _, e in column)) for column in columns
    ]
    lines = [
        label.ljust(label_width)
        + "".join(
            f"   {value.rjust(value_width)}{error.ljust(error_width)}"
            for (value, error), (value_width, error_width) in zip(cells, widths, strict=True)
        )
        for label, cells in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def plot_densities(analyses: Sequence[Analysis], path: Path, settings: Settings) -> str:
    """Write the SLQ densities on a log scale; return the line of the report that says so."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "skipped the density plot: matplotlib is not installed (pip install 'curvop[demo]')"
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    for analysis in analyses:
        if analysis.density is not None:
            analysis.density.plot(ax=ax, log=True, label=analysis.name)
    probes, steps = settings.density_probes, settings.density_steps
    ax.set_title(f"spectral density (SLQ, {probes} probes x {steps} steps)")
    ax.legend()
    try:
        figure.savefig(_with_parents(path), dpi=120)
    except Exception as error:  # after all the work, still one line, not matplotlib's traceback
        raise UsageError(f"--density: writing {path} failed: {_one_line(error)}") from None
    return f"wrote {path}"


def write_summary(
    path: Path, problem: dict[str, Any], analyses: Sequence[Analysis], settings: Settings
) -> str:
    """Write the JSON summary: the problem, the settings used, what was skipped, and per operator
    what was computed; return the line of the report that says so."""
    summary = {
        "curvop_version": curvop.__version__,
        "problem": problem,
        "seed": settings.seed,
        "settings": settings.summary(),
        "skipped": settings.skipped,
        "operators": {a.name: a.summary(settings) for a in analyses},
    }
    _with_parents(path).write_text(json.dumps(summary, indent=2) + "\n")
    return f"wrote {path}"


# ---------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvop`` command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or an argument error already reported in one line
        return int(done.code or 0)
    try:
        return _run(args)
    except UsageError as error:
        print(f"curvop: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvop: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    plot_path = None if args.no_density else _density_path(args.density)
    json_path = _check_output_path("--json", args.json)
    operators, problem = _operators_and_problem(args)
    n = problem["num_params"]
    if args.k > n:
        raise UsageError(f"--k {args.k} is too large for n={n} parameters; use --k {n} or less")
    print("\n".join([problem["description"], *_notes(operators.values()), ""]))
    analyses = [analyze(label, op, settings) for label, op in operators.items()]
    print(format_table(analyses, args.k) + "\n")
    print(write_summary(json_path, problem, analyses, settings))  # first: the plot may fail
    if plot_path is not None:
        print(plot_densities(analyses, plot_path, settings))
    return 0


def _notes(operators: Iterable[curvop.CurvatureOperator]) -> list[str]:
    """What the reader must know before the table: when the finite-difference Hessian is the
    wrong tool."""
    return [FD_NOTE for op in operators if isinstance(op, curvop.FiniteDifferenceHessianOperator)]


def _operators_and_problem(
    args: argparse.Namespace,
) -> tuple[dict[str, curvop.CurvatureOperator], dict[str, Any]]:
    """The operators to analyze, by label, and the description of the problem for the report;
    the model and data are moved to ``--device`` first, if given."""
    if args.command == "analyze":
        model, loss_fn, data = load_user_problem(args.problem)
        kinds, name, description = [args.operator], args.problem, None
        source = Path(args.problem.rpartition(":")[0]).resolve()
    else:
        builtin = load_problem()
        model, loss_fn, data = builtin.model, builtin.loss_fn, builtin.data
        kinds, name, description = ["hessian", "ggn"], builtin.name, builtin.describe()
        source = None
    if args.device is not None:
        model, data = move_to(args.device, model, data)
    operators = {
        OPERATORS[kind][0]: build_operator(kind, model, loss_fn, data, source, args.output)
        for kind in kinds
    }
    return operators, _describe(name, description, next(iter(operators.values())), data)


def _describe(
    name: str, description: str | None, operator: curvop.CurvatureOperator, data: Any
) -> dict[str, Any]:
    """The problem for the report and the JSON; ``description`` (the header line) defaults to
    ``NAME: N parameters, DTYPE, S samples in B batches``."""
    n, dtype = operator.shape[0], str(operator.dtype)
    num_samples, num_batches = count_samples(data)
    batches = f"{num_batches:,} batch" + ("" if num_batches == 1 else "es")
    header = f"{name}: {n:,} parameters, {dtype}, {num_samples:,} samples in {batches}"
    return {
        "name": name,
        "description": description or header,
        "num_params": n,
        "dtype": dtype,
        "num_samples": num_samples,
        "num_batches": num_batches,
        "device": str(operator.layout.device),
    }


def count_samples(data: Any) -> tuple[int, int]:
    """The number of samples (the targets' first dimension, summed) and of batches in ``data``,
    one ``(inputs, targets)`` batch or a re-iterable collection of them (a list, a DataLoader)."""
    batches = [data] if is_single_batch(data) else data
    sizes = [Batch(i, inputs, targets).num_samples for i, (inputs, targets) in enumerate(batches)]
    return sum(sizes), len(sizes)


def move_to(device: torch.device, model: nn.Module, data: Any) -> tuple[nn.Module, Any]:
    """The model and the data on ``device``, for ``--device``.

    The model moves in place. One ``(inputs, targets)`` batch, or a list or tuple of batches, is
    copied there once; any other collection (a ``DataLoader``) is left as it is, and the
    operators move each of its batches to the parameters' device as they pass over the data.
    """
    model.to(device)
    if is_single_batch(data) or isinstance(data, list | tuple):
        return model, map_tensors(data, lambda tensor: tensor.to(device))
    return model, data
