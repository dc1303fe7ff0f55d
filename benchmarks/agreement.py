"""Sections 8 and 9 of ``bench.py``: do the results agree?

The peers' products and top eigenvalues against curvop's (8, 8b), and on curvop's built-in
problem, the three libraries' products (8c) and curvop's estimators (9) against a dense float64
ground truth built with ``torch.func`` alone, independently of curvop and of the peers. They
compare more than they time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import peers
import torch
from harness import (
    LABELS,
    OPERATORS,
    Config,
    Task,
    make_operator,
    peer_libraries,
    problem_of,
    ratios_to_gradient,
    relative_difference,
    section,
    table,
    top_eigenvalue,
)
from models import Problem, mlp_variant
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

import curvop
from curvop.problems import load_problem

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- problems
@cache
def _load_builtin() -> Problem:
    loaded = load_problem()  # trains for about a second: once per run
    linears = [m for m in loaded.model if isinstance(m, nn.Linear)]
    sizes = [m.in_features for m in linears] + [linears[-1].out_features]
    name = f"built-in: {loaded.name} MLP {'-'.join(map(str, sizes))}"
    return Problem(name, loaded.model, loaded.loss_fn, loaded.data)


def builtin_problem(dtype: torch.dtype = torch.float64, device: str = "cpu") -> Problem:
    """curvop's built-in problem, ``curvop.problems.load_problem()``, as a fresh copy in ``dtype``
    on ``device``.

    A 64-32-10 tanh MLP trained on scikit-learn's digits (synthetic data of the same shape without
    scikit-learn), 2,410 parameters, 1,797 samples in batches of 512, 512, 512 and 261: the short
    last batch is part of the point. Loaded in float64 (its default); float32 casts those weights.
    """
    return _load_builtin().to(dtype, device)


def synthetic_problems(config: Config) -> list[Problem]:
    """The MLP and the CNN of the benchmark (``models.py``), float32."""
    return [problem_of(name, config) for name in ("mlp", "cnn")]


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

    All samples form one batch (so no batch weighting enters at all); on the CPU. Hessian columns are
    forward-over-reverse products (``jvp`` of ``grad``); GGN columns push ``jvp`` through the
    model, the loss's Hessian in the output (``jvp`` of ``grad``) and a ``vjp`` back. ``chunk``
    unit vectors at a time under ``vmap``.
    """
    start = time.perf_counter()
    problem = problem.to(torch.float64, "cpu")
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


# ----------------------------------------------------------------------------- 8. peers
def bench_peers(config: Config) -> str:
    """Agreement and top eigenvalue: curvop against the installed peers (their costs are in
    sections 1-2)."""
    libraries = peer_libraries(config)
    if not libraries:
        return section(
            "8. Peers",
            "skipped: --no-peers, or neither curvlinops nor hessian-eigenthings imports here.",
            "",
        )
    versions = ", ".join(f"{lib} {peers.peer_version(lib)}" for lib in libraries)
    return (
        section(
            "8. Peers: agreement of the products",
            f"{versions}. " + _AGREEMENT_INTRO,
            _peer_agreement(config, libraries),
        )
        + section(
            "8b. Peers: top eigenvalue by eigsh",
            _EIGSH_INTRO.format(tol=config.eig_tol),
            _peer_eigsh(config, libraries),
        )
        + section(
            "8c. Peers on the built-in problem: products against a dense ground truth",
            _BUILTIN_INTRO.format(seconds=builtin_truth().seconds),
            _peer_builtin(config, libraries),
        )
    )


_AGREEMENT_INTRO = (
    "max |product − reference| / max |reference| for one fixed random vector. Reference: curvop's "
    "exact product (Hessian, or GGN for the GGN row) in float64 on the same weights and data, so "
    "the float64 rows compare implementations and the float32 rows add rounding. FD rows compare "
    "finite differences with the exact Hessian. The last MLP splits 1000 samples into batches of "
    "128, the last holding 104; the built-in problem, which also has a short last batch, is in 8c."
)
_EIGSH_INTRO = (
    "`scipy.sparse.linalg.eigsh(k=1, which='LA', tol={tol:g})` from the same start vector on each "
    "library's operator as a SciPy LinearOperator (curvlinops: `to_scipy()`; hessian-eigenthings: "
    "wrapped with an explicit dtype): the benchmark's MLP in float32, the built-in problem in float64 "
    "(its default), where the error is relative to the top eigenvalue of the dense ground truth "
    "of 8c. Time in gradients, products counted."
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


def _operators(problem: Problem, kind: str, libraries: list[str]) -> dict[str, Any]:
    """curvop's operator of ``kind`` and each peer's that has one (peers without it left out)."""
    operators: dict[str, Any] = {"curvop": make_operator(problem, kind)}
    for library in libraries:
        peer = peers.build_peer(library, kind, problem.model, problem.loss_fn, problem.batches)
        if peer is not None:
            operators[library] = peer
    return operators


def _products(problem: Problem, kind: str, v: torch.Tensor, libraries: list[str]) -> dict:
    """One product with ``v`` by curvop (``apply``) and by each peer (its ``matvec``)."""
    return {
        name: operator.apply(v) if name == "curvop" else operator.matvec(v)
        for name, operator in _operators(problem, kind, libraries).items()
    }


def _peer_agreement(config: Config, libraries: list[str]) -> str:
    rows = []
    variant = mlp_variant(config.seed, config.scale, config.device, samples=1000, batch_size=128)
    cases = [*synthetic_problems(config), variant]
    for base in cases:
        reference_problem = base.to(torch.float64)
        v64 = reference_problem.vectors(1, config.seed)[:, 0]
        references = {
            "hessian": make_operator(reference_problem, "hessian").apply(v64),
            "ggn": make_operator(reference_problem, "ggn").apply(v64),
        }
        references["fd_hessian"] = references["hessian"]
        for dtype_name, dtype in DTYPES.items():
            problem = reference_problem if dtype == torch.float64 else base.to(dtype)
            v = v64.to(dtype)
            for kind in OPERATORS:
                row: list[object] = [problem.name, dtype_name, problem.layout, LABELS[kind]]
                products = _products(problem, kind, v, libraries)
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
    cases = [
        (problem_of("mlp", config), None),
        (builtin_problem(device=config.device), builtin_truth()),
    ]
    rows = []
    for problem, truth in cases:
        dtype_name = str(problem.dtype).removeprefix("torch.")
        for kind in ("hessian", "ggn"):
            operators: dict[str, LinearOperator] = {
                name: operator if name == "curvop" else operator.scipy()
                for name, operator in _operators(problem, kind, libraries).items()
            }
            eigenvalues, counts = {}, {}
            for name, operator in operators.items():
                with curvop.count_products(operator) as asked:
                    eigenvalues[name] = top_eigenvalue(operator, config.eig_tol, config.seed)
                counts[name] = asked.columns
            tasks = {
                name: lambda op=op: top_eigenvalue(op, config.eig_tol, config.seed)
                for name, op in operators.items()
            }
            # the counted run above was the warm-up; eigsh runs are long, so fewer repeats
            ratios, _ = ratios_to_gradient(
                tasks, problem.gradient, config.long_repeats, calibrated=False
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
    reference_problem = builtin_problem(device=config.device)
    v64 = reference_problem.vectors(1, config.seed)[:, 0]
    exact = {kind: truth.matrix(kind) @ v64.cpu() for kind in OPERATORS}
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
            products = _products(problem, kind, v, libraries)
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


# ----------------------------------------------------------------------------- 9. accuracy
def linalg_calls(config: Config) -> list[tuple[str, dict[str, object]]]:
    """The curvop.linalg calls of section 9, with their options (seeded)."""
    seed = config.seed
    probes, steps = config.slq[-1]
    return [
        ("top_eigenvalues", {"k": 1, "tol": config.eig_tol, "seed": seed}),
        ("top_eigenvalues", {"k": config.eig_k, "tol": config.eig_tol, "seed": seed}),
        ("hutchpp_trace", {"num_matvecs": config.trace_matvecs, "seed": seed}),
        ("xtrace", {"num_matvecs": config.trace_matvecs, "seed": seed}),
        ("spectral_density", {"num_probes": probes, "num_steps": steps, "seed": seed}),
    ]


def bench_accuracy(config: Config) -> str:
    """curvop's estimators on the built-in problem against its dense ground truth."""
    problem, truth = builtin_problem(device=config.device), builtin_truth()
    operator = make_operator(problem, "hessian")
    rows = []
    for name, options in linalg_calls(config):
        call = _call_task(getattr(curvop, name), operator, options)
        shown = ", ".join(f"{key}={value}" for key, value in options.items() if key != "seed")
        with curvop.count_products(operator) as count:
            result = call()  # also the warm-up: the first product of each width chooses a kernel
        ratios, _ = ratios_to_gradient(
            {name: call}, problem.gradient, config.long_repeats, calibrated=False
        )
        error = _error_vs_truth(name, result, truth)
        rows.append([f"`{name}`", shown, ratios[name], count.columns, count.calls, error])
    headers = ["function", "options", "time (gradients)", "products", "calls", "error vs dense"]
    return section(
        "9. curvop.linalg estimators on the built-in problem, against the dense truth",
        f"{problem.name}, float64 (its default), Hessian; the dense ground truth of 8c. Products "
        "are the columns multiplied, calls the product calls (one pass over the data each, "
        "whatever the block width); times after a first, untimed call. Errors are relative: eigenvalues, the largest over the k returned; traces, "
        "|estimate − trace| with the estimator's own standard error in brackets; SLQ, the trace "
        "n·mean(Σ w·θ) its quadrature implies and its largest Ritz value θ against λ_max.",
        table(headers, rows),
    )


def _error_vs_truth(name: str, result: object, truth: Truth) -> str:
    """Relative error of an estimator's result against the dense Hessian (see section 9)."""
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
