"""Benchmark curvop's curvature products and spectral tools, in units of one gradient evaluation.

Timed figures are ratios: the time of an operation divided by the time of one gradient of the
same loss over the same data, measured interleaved in the same run (a gradient is timed right
before and right after each operation; the compared items rotate through one loop), reported as
the median over repeats with the interquartile range in brackets. Shared, noisy machines change
absolute times by factors; the ratios stay put. Peak memory is measured per call (``peaks.py``),
in a fresh process where the call is long (``memory.py``).

Sections (``--sections`` picks some): ``products`` (1-2, ``products.py``), ``eigen``, ``slq``
and ``memory`` (3-5, ``spectral.py``), ``outputs`` and ``passes`` (6-7, ``products.py``),
``peers`` and ``accuracy`` (8-9, ``agreement.py``); ``benchmarks/README.template.md`` says what
each measures. The report ends with the issue's targets, met or not.

The output is markdown: on stdout as the sections finish, and as a whole in a README (see
``report.py``): the static text of ``README.template.md`` followed by the run's facts and
tables. Only a complete CPU run replaces ``benchmarks/README.md`` by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# sibling modules of this script
import agreement  # noqa: E402
import products  # noqa: E402
import report  # noqa: E402
import spectral  # noqa: E402
from harness import Config, Targets, log, peer_libraries  # noqa: E402
from models import GPU_MODELS, MODELS  # noqa: E402
from peers import peer_version  # noqa: E402

CPU_MODELS = ("mlp", "cnn", "resnet20", "gpt")
QUICK_MODELS = ("mlp", "cnn")
QUICK_SOLVER_MODELS = ("cnn",)  # curvop's top-5 on the MLP alone takes a minute
MEMORY_MODELS = ("convnet", "resnet18")
SECTIONS = ("products", "eigen", "slq", "memory", "outputs", "passes", "peers", "accuracy")
QUICK_SECTIONS = ("products", "eigen", "slq", "outputs", "passes")  # no dense ground truth

BENCHES: dict[str, Callable[[Config, Targets], str]] = {
    "products": products.bench_products,
    "eigen": spectral.bench_eigen,
    "slq": spectral.bench_slq,
    "memory": spectral.bench_memory,
    "outputs": lambda config, _: products.bench_outputs(config),
    "passes": lambda config, _: products.bench_passes(config),
    "peers": lambda config, _: agreement.bench_peers(config),
    "accuracy": lambda config, _: agreement.bench_accuracy(config),
}


# ----------------------------------------------------------------------------- configuration
def parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of a few minutes: MLP and CNN on small data (top-5 on the CNN only), "
        f"sections {' '.join(QUICK_SECTIONS)}",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where models, data and vectors live: cpu (default) or cuda (then the default "
        f"models are {' '.join(GPU_MODELS)}, on GPU-sized data)",
    )
    parser.add_argument("--repeats", type=int, help="repeats per product figure (5, quick 3)")
    parser.add_argument(
        "--long-repeats", type=int, help="repeats per eigensolver / SLQ figure (2, quick 1)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=tuple(MODELS),
        help=f"models of sections 1-4 (CPU: {' '.join(CPU_MODELS)}; cuda: {' '.join(GPU_MODELS)})",
    )
    parser.add_argument(
        "--memory-models",
        nargs="+",
        choices=tuple(MODELS),
        help=f"models of section 5 ({' '.join(MEMORY_MODELS)})",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], help="block widths")
    parser.add_argument("--eig-k", type=int, default=5, help="eigenvalues in section 3")
    parser.add_argument("--eig-tol", type=float, default=1e-3, help="eigensolver tolerance")
    parser.add_argument(
        "--slq", nargs="+", help="SLQ probes x steps, e.g. 4x30 10x80 (default; quick 4x30)"
    )
    parser.add_argument(
        "--trace-matvecs", type=int, default=30, help="products of the trace estimators"
    )
    parser.add_argument("--outputs", type=int, nargs="+", help="GGN sweep (1 10 100; quick 1 10)")
    parser.add_argument("--naive-outputs", type=int, nargs="+", help="per-output loop sweep")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier ratios)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        help="write the README-style report here ('-': stdout only); default "
        "benchmarks/README.md for a complete CPU run, else README.quick.md, README.cuda.md or "
        "README.partial.md next to it",
    )
    return parser


def _scale(quick: bool, device: str) -> str:
    if quick:
        return "quick"
    return "gpu" if torch.device(device).type == "cuda" else "full"


def _default_models(quick: bool, device: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The models of sections 1, 2, 4 and of section 3, when ``--models`` does not say."""
    if quick:
        return QUICK_MODELS, QUICK_SOLVER_MODELS
    models = GPU_MODELS if torch.device(device).type == "cuda" else CPU_MODELS
    return models, models


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The run's :class:`Config` from the command line (``--quick`` shrinks the defaults)."""
    args = parser().parse_args(argv)
    quick = args.quick
    slq = args.slq or (["4x30"] if quick else ["4x30", "10x80"])
    small_sweep = [1, 10] if quick else [1, 10, 100]
    models, solver_models = _default_models(quick, args.device)
    config = Config(
        scale=_scale(quick, args.device),
        device=args.device,
        repeats=args.repeats or (3 if quick else 5),
        long_repeats=args.long_repeats or (1 if quick else 2),
        models=tuple(args.models or models),
        solver_models=tuple(args.models or solver_models),
        memory_models=tuple(args.memory_models or MEMORY_MODELS),
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


def complete(args: argparse.Namespace) -> bool:
    """Whether the run measures everything a README holds: every section, default models."""
    chosen = (args.sections, args.models, args.memory_models, args.slq, args.outputs)
    return not args.quick and not args.no_peers and all(option is None for option in chosen)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    config, args = parse_args(argv)
    torch.set_num_threads(config.threads)
    output = args.output or report.default_output(complete(args), config.quick, config.device)
    start = time.perf_counter()
    targets = Targets()
    peers = [f"{library} {peer_version(library)}" for library in peer_libraries(config)]
    skipped = [name for name in SECTIONS if name not in config.sections]
    command = sys.argv[1:] if argv is None else list(argv)
    facts = report.facts(command, config.device, config.sections, skipped, peers) + (
        f"- scale `{config.scale}`; {config.repeats} repeats per product figure, "
        f"{config.long_repeats} per eigensolver and SLQ figure\n"
    )
    print(facts, flush=True)
    parts = []
    for name in SECTIONS:
        if name not in config.sections:
            continue
        began = time.perf_counter()
        parts.append(BENCHES[name](config, targets))
        print(parts[-1], flush=True)
        log(f"section {name}: {time.perf_counter() - began:.0f} s")
    parts.append(targets.report())
    footer = (
        f"_Total wall time {time.perf_counter() - start:.0f} s; "
        f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}._\n"
    )
    print(parts[-1] + footer, flush=True)
    written = report.write(output, report.render(facts, parts, footer))
    if written is not None:
        log(f"report written to {written}")


if __name__ == "__main__":
    main()
