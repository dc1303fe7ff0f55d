"""The GPU tasks of the benchmark in one run of under 8 minutes on one H200: a markdown report.

Per model (ResNet-18 on 2 x 128 images, the 29.5M-parameter GPT on 2 x 8 x 256 tokens, the
124M-parameter GPT on 2 x 4 x 512 tokens): one gradient, one Hessian product and one GGN product,
then curvop's top-5 (``tol`` 1e-3, 1e-2 on the 124M GPT) with its products; on the 124M GPT
also ARPACK's ``eigsh`` on curvop's operator at the same ``tol``; on ResNet-18, SLQ 4 x 30
against hessian-eigenthings', Hutchinson, Hutch++, XTrace and XDiag at 30 products, and
``eigsh`` on curvlinops' operator for the top 5. Time and peak device memory each.

Every task runs in its own process (``memory.py``) with a timeout, cheap tasks first, and the
suite stops starting tasks when its time budget is spent: a crash, an out-of-memory or a
timeout costs one line of the report (its error instead of the figures), not the rest. The
report is rewritten after every task, to ``--output`` or ``$OUT/gpu_report.md`` when ``OUT`` is
set (with the raw results beside it as ``gpu_results.json``), and printed at the end.

``--tiny`` runs the same tasks on the same code path with the models shrunk to a few ten
thousand parameters, on the CPU unless ``--device`` says otherwise: a check of the suite that
needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402
import report  # noqa: E402
from harness import fmt, log, table  # noqa: E402
from peers import available_peers, peer_version  # noqa: E402

MODELS = ("resnet18", "gpt30m", "gpt124m")
TOP_TOL = {"resnet18": 1e-3, "gpt30m": 1e-3, "gpt124m": 1e-2}
ESTIMATORS = ("hutchinson_trace", "hutchpp_trace", "xtrace", "xdiag")
MATVECS = 30
SLQ = {"num_probes": 4, "num_steps": 30}
K = 5
BUDGET = 450.0  # seconds for the whole suite: 7.5 minutes
MIN_START = 15.0  # seconds: a task is not started with less of the budget left
TIMEOUTS = {"product": 90.0, "solver": 180.0, "slq": 150.0, "estimator": 90.0}
GROUPS = {
    "product": "Products and gradients",
    "solver": f"Top-{K} eigenvalues",
    "slq": "SLQ 4 x 30 on ResNet-18",
    "estimator": f"Trace and diagonal estimators ({MATVECS} products) on ResNet-18",
}


@dataclass(frozen=True)
class Task:
    """One line of the report: what it measures, in which table, with which timeout."""

    group: str  # a key of GROUPS and TIMEOUTS
    label: str
    spec: memory.Spec


def plan(scale: str, device: str, threads: int) -> list[Task]:
    """Every task of the suite, in the order they run: cheap ones first, so that a budget that
    runs out costs the longest."""

    def task(group: str, label: str, model: str, library: str, call: str, **options) -> Task:
        kind = options.pop("kind", "hessian")
        spec = memory.Spec(
            model, library, call, options, kind=kind, scale=scale, device=device, threads=threads
        )
        return Task(group, label, spec)

    def top(model: str) -> dict:
        return {"k": K, "tol": TOP_TOL[model], "seed": 0}

    tasks = []
    for model in MODELS:
        tasks += [
            task("product", "gradient", model, "torch", "gradient"),
            task("product", "Hessian product", model, "curvop", "apply"),
            task("product", "GGN product", model, "curvop", "apply", kind="ggn"),
        ]
    for model in MODELS:
        tasks.append(task("solver", "curvop", model, "curvop", "top_eigenvalues", **top(model)))
    for library in ("curvop", "hessian-eigenthings"):
        tasks.append(task("slq", library, "resnet18", library, "spectral_density", **SLQ, seed=0))
    for name in ESTIMATORS:
        tasks.append(
            task("estimator", name, "resnet18", "curvop", name, num_matvecs=MATVECS, seed=0)
        )
    return [
        *tasks,
        task(
            "solver", "eigsh on curvlinops'", "resnet18", "curvlinops", "eigsh", **top("resnet18")
        ),
        task("solver", "eigsh on curvop's", "gpt124m", "curvop", "eigsh", **top("gpt124m")),
    ]


# ----------------------------------------------------------------------------- running
def run(tasks: Sequence[Task], budget: float, save: Callable[[list[dict]], None]) -> list[dict]:
    """Run the tasks in order, each in a child with the smaller of its timeout and what is left
    of ``budget``; ``save(results)`` after each. A task that cannot start gets an error."""
    start, results = time.perf_counter(), []
    for task in tasks:
        left = budget - (time.perf_counter() - start)
        if left < MIN_START:
            results.append({"error": f"not run: the suite's budget of {budget:.0f} s was spent"})
        else:
            began = time.perf_counter()
            results.append(memory.run_child(task.spec, min(TIMEOUTS[task.group], left)))
            log(f"{task.spec.model} {task.label}: {time.perf_counter() - began:.0f} s")
        save(results)
    return results


# ----------------------------------------------------------------------------- the report
def _figures(result: dict) -> str:
    """What the call returned, briefly: eigenvalues, a trace with its error, SLQ's extremes."""
    if "eigenvalues" in result:
        return ", ".join(f"{value:.4g}" for value in sorted(result["eigenvalues"], reverse=True))
    if "trace" in result:
        return f"{result['trace']:.4g} ± {result['std_error']:.2g}"
    if "largest_node" in result:
        return f"nodes {result['smallest_node']:.3g} … {result['largest_node']:.3g}"
    return f"norm {result['norm']:.4g}" if "norm" in result else ""


def _row(task: Task, result: dict) -> list[str]:
    head = [str(result.get("name", task.spec.model)), task.label, _options(task.spec.options)]
    if "seconds" not in result:
        return [*head, f"fails: {result.get('error', 'no result')}", *[""] * 7]
    gradients = result["seconds"] / result["gradient_seconds"]
    return [
        *head,
        f"{result['seconds']:.3g}",
        fmt(gradients),
        str(result["columns"]),
        str(result["calls"]),
        f"{result['peak_mib']:.0f}",
        f"{result['peak_mib'] - result['before_mib']:.0f}",
        _figures(result),
    ]


def _options(options: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items() if key != "seed")


HEADERS = [
    "model",
    "task",
    "options",
    "time (s)",
    "time (gradients)",
    "products",
    "calls",
    "peak (MiB)",
    "above before (MiB)",
    "result",
]


def render(tasks: Sequence[Task], results: Sequence[dict], heading: str) -> str:
    """The report: the heading, then one table per group of the tasks that have a result."""
    parts = [heading]
    for group, title in GROUPS.items():
        rows = [
            _row(task, result)
            for task, result in zip(tasks, results, strict=False)
            if task.group == group
        ]
        if rows:
            parts.append(f"## {title}\n\n{table(HEADERS, rows)}\n")
    sources = sorted({str(r["peak_source"]) for r in results if "peak_source" in r})
    parts.append(_NOTES.format(sources=", ".join(sources) or "none reported"))
    return "\n".join(parts)


_NOTES = (
    "Each task ran in a fresh process after a warm-up (products and the gradient: one call; "
    "curvop's algorithms: the call up to its first product of a width it already multiplied; "
    "ARPACK and hessian-eigenthings: one product). Time in seconds (clocks read after "
    "`torch.cuda.synchronize()`) and in gradients timed in the same process; products are the "
    "columns multiplied, calls the product calls (passes over the data; hessian-eigenthings' "
    "counted as model forwards per batch), both by `curvop.count_products`. Memory: {sources}; "
    "peak is absolute, above before subtracts what was allocated right before the call "
    "(model, data, operator). A failed task shows the first line of its error.\n"
)


def heading(args: argparse.Namespace, scale: str) -> str:
    """The facts of the run."""
    peers = ", ".join(f"{name} {peer_version(name)}" for name in available_peers()) or "none"
    device = report.device_name(args.device) if _usable(args.device) else args.device
    return (
        "# curvop GPU suite\n\n"
        f"- commit measured: `{report.revision()}`; run {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
        f"- device: {device}; scale `{scale}`; budget {args.budget:.0f} s\n"
        f"- torch {torch.__version__}, {args.threads} CPU threads; peers: {peers}\n"
    )


def _usable(device: str) -> bool:
    return torch.device(device).type != "cuda" or torch.cuda.is_available()


# ----------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models (on the CPU unless --device says)"
    )
    parser.add_argument("--device", help="cuda (default), or cpu (the default with --tiny)")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for the suite")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: all cores up to 16 with a GPU; 1 on the CPU, where "
        "threads that outnumber free cores stall each other)",
    )
    parser.add_argument(
        "--output", help="the report's path (default $OUT/gpu_report.md if OUT is set)"
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    on_cpu = torch.device(args.device).type == "cpu"
    args.threads = args.threads or (1 if on_cpu else min(os.cpu_count() or 1, 16))
    if args.output is None and os.environ.get("OUT"):
        args.output = str(Path(os.environ["OUT"]) / "gpu_report.md")
    if not _usable(args.device):
        parser.error("no CUDA device here: run with --tiny to check the suite on the CPU")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    scale = "tiny" if args.tiny else "gpu"
    tasks = plan(scale, args.device, args.threads)
    head = heading(args, scale)

    def save(results: list[dict]) -> None:
        if args.output is not None:
            output = Path(args.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(render(tasks, results, head))
            labelled = [
                {"model": task.spec.model, "task": task.label, **result}
                for task, result in zip(tasks, results, strict=False)
            ]
            output.with_name("gpu_results.json").write_text(json.dumps(labelled, indent=1))

    print(render(tasks, run(tasks, args.budget, save), head), flush=True)


if __name__ == "__main__":
    main()
