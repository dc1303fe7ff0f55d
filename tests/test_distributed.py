"""Data-parallel operators on torch.distributed: two gloo processes with uneven shards give the
single-process results on the union of the shards, identical on both ranks; a failing rank
makes every rank raise, quickly."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.sparse.linalg import cg, eigsh
from torch import nn

import curvop

F64 = torch.float64
WORLD = 2
TIMEOUT_S = 60  # the process group's timeout: a rank left waiting would hang this long


def problem() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 tanh MLP and 13 samples, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(13, 4, generator=generator, dtype=F64)
    y = torch.randint(0, 3, (13,), generator=generator)
    return model, nn.CrossEntropyLoss(), x, y


def shard(rank: int, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0: samples 0-6 in batches of 4 and 3; rank 1: samples 7-12 in one batch of 6."""
    if rank == 0:
        return [(x[:4], y[:4]), (x[4:7], y[4:7])]
    return [(x[7:], y[7:])]


def everything(H, G, seed: int = 0) -> dict[str, np.ndarray]:
    """What every rank computes: products, eigenvalues, a solve, estimates, SciPy's solvers."""
    n = H.shape[0]
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    b = np.linspace(-1.0, 1.0, n)
    v0 = np.random.default_rng(0).standard_normal(n)  # SciPy's start: the same on every rank
    return {
        "Hv": H.apply(V).numpy(),
        "Gv": G.apply(V).numpy(),
        "top": curvop.top_eigenvalues(H, k=3, seed=seed),
        "bottom": curvop.top_eigenvalues(G, k=2, which="SA", seed=seed),
        "solve": curvop.solve_damped(G, b, damping=0.1).x,
        "xtrace": np.array(curvop.xtrace(H, 20, seed=seed)[:2]),
        "hutchinson": np.array(curvop.hutchinson_trace(G, 8)[:2]),  # seed=None: broadcast
        "xdiag": curvop.xdiag(H, 20, seed=seed),
        "density": curvop.spectral_density(H, num_probes=3, num_steps=10, seed=seed).density,
        "lanczos": np.concatenate(curvop.lanczos(H, 8, seed=seed)),
        "eigsh": np.sort(eigsh(H, k=2, which="LA", v0=v0, return_eigenvectors=False)),
        "damped": cg(G + 0.1 * curvop.IdentityOperator(n), b, rtol=1e-12)[0],
    }


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)  # every rank the same threads: bitwise the same linear algebra
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=__import__("datetime").timedelta(seconds=TIMEOUT_S),
    )  # fmt: skip


def _finish() -> None:
    """Leave together: a rank that tears the group down while the other still reads its last
    messages makes gloo's I/O thread abort the other process."""
    dist.barrier()
    dist.destroy_process_group()


def _agreement_worker(rank: int, store: str, out: str) -> None:
    _init(rank, store)
    try:
        model, loss_fn, x, y = problem()
        group = dist.group.WORLD
        H = curvop.HessianOperator(model, loss_fn, shard(rank, x, y), process_group=group)
        G = curvop.GaussNewtonOperator(model, loss_fn, shard(rank, x, y), process_group=group)
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(everything(H, G)))
    finally:
        _finish()


def _raising_model(rank: int) -> nn.Module:
    model = problem()[0]
    if rank == 1:
        model.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyError("rank 1 broke")))
    return model


def _failure_worker(rank: int, store: str, out: str) -> None:
    _init(rank, store)
    outcomes = []
    try:
        _, loss_fn, x, y = problem()
        group = dist.group.WORLD
        data = shard(rank, x, y)

        def attempt(name, run):
            start = time.perf_counter()
            try:
                run()
                outcomes.append((name, None, None, time.perf_counter() - start))
            except Exception as error:  # what each rank saw
                kind = type(error).__name__
                outcomes.append((name, kind, str(error), time.perf_counter() - start))

        H = curvop.HessianOperator(_raising_model(rank), loss_fn, data, process_group=group)
        attempt("model raises", lambda: H.apply(torch.ones(H.shape[0], dtype=F64)))
        attempt("eigensolver", lambda: curvop.top_eigenvalues(H, k=1, seed=0))
        clean = curvop.HessianOperator(problem()[0], loss_fn, data, process_group=group)
        v = torch.ones(clean.shape[0], dtype=F64)
        clean.apply(v)  # records the data's fingerprints
        if rank == 0:
            data[0][0][0, 0] += 1.0  # rank 0's data change between products
        attempt("data changed", lambda: clean.apply(v))
        attempt("still usable", lambda: curvop.HessianOperator(
            problem()[0], loss_fn, shard(rank, x, y), process_group=group
        ).apply(v))  # fmt: skip
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(outcomes))
    finally:
        _finish()


def spawn(worker, tmp_path: Path) -> list:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> list[dict]:
    return spawn(_agreement_worker, tmp_path_factory.mktemp("agreement"))


@pytest.fixture(scope="module")
def single() -> dict:
    """The same computations in one process, on the union of the shards (in another batching)."""
    model, loss_fn, x, y = problem()
    union = [(x[:5], y[:5]), (x[5:], y[5:])]
    H = curvop.HessianOperator(model, loss_fn, union)
    G = curvop.GaussNewtonOperator(model, loss_fn, union)
    result = everything(H, G)
    result["hutchinson"] = None  # seed=None: a different draw in another run
    return result


def test_every_rank_gets_the_single_process_results(distributed, single):
    for name, expected in single.items():
        if expected is None:
            continue
        for rank, results in enumerate(distributed):
            np.testing.assert_allclose(
                results[name], expected, rtol=1e-9, atol=1e-12, err_msg=f"{name} on rank {rank}"
            )


def test_ranks_agree_bitwise(distributed):
    first, second = distributed
    for name in first:
        if first[name] is not None:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_a_failing_rank_makes_every_rank_raise_quickly(tmp_path):
    ranks = spawn(_failure_worker, tmp_path)
    by_name = [{name: rest for name, *rest in outcomes} for outcomes in ranks]
    for rank, outcomes in enumerate(by_name):
        for name in ("model raises", "eigensolver", "data changed"):
            kind, message, seconds = outcomes[name]
            assert kind is not None, f"{name}: rank {rank} did not raise"
            assert seconds < TIMEOUT_S / 4, f"{name}: rank {rank} waited {seconds:.1f} s"
        assert outcomes["still usable"][0] is None  # the group survives a failed product
    # the failing rank raises its own error; the other quotes it
    assert by_name[1]["model raises"][:2] == ["KeyError", "'rank 1 broke'"]
    kind, message, _ = by_name[0]["model raises"]
    assert kind == "DistributedError" and "rank 1" in message and "rank 1 broke" in message
    assert by_name[0]["data changed"][0] == "RuntimeError"
    assert "data changed between products" in by_name[0]["data changed"][1]
    kind, message, _ = by_name[1]["data changed"]
    assert kind == "DistributedError" and "rank 0" in message


def test_process_group_is_checked():
    model, loss_fn, x, y = problem()
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            curvop.HessianOperator(model, loss_fn, (x, y), process_group=object())
    assert os.environ.get("RANK") is None or dist.is_initialized()


def test_the_example_runs_under_torchrun_and_matches_one_process():
    """examples/distributed_top_eigenvalues.py with two gloo processes, as the README shows."""
    import re
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "distributed_top_eigenvalues.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, str(example), "--check", "--k", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 ranks, 1796 samples" in result.stdout
    assert "top-3 Hessian eigenvalues" in result.stdout and "SLQ density" in result.stdout
    difference = float(re.search(r"max \|difference\| (\S+)", result.stdout).group(1))
    assert difference < 1e-10  # float64: the same eigenvalues as one process on all the data
