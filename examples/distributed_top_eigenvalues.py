"""Top eigenvalues and the spectral density of a Hessian whose data is sharded over processes.

Run with two CPU processes (gloo) on one machine:

    torchrun --nproc_per_node=2 examples/distributed_top_eigenvalues.py

(or ``python -m torch.distributed.run --nproc_per_node=2 ...``). Each rank loads only its shard
of the data through a ``DistributedSampler``; every product of the operators is the curvature of
the loss over all the data, completed by one all-reduce; every rank runs the same algorithms in
lockstep and gets the same numbers, which rank 0 prints. On GPUs, pass ``--backend nccl``: the
model, the data and the products then stay on each rank's device.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from scipy.integrate import trapezoid
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import curvop
from curvop.problems import load_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--check", action="store_true", help="compare with one process on rank 0")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # the same threads on every rank: bitwise the same linear algebra
    device = torch.device("cpu")
    if args.backend == "nccl":  # one GPU per rank, set before any collective
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    problem = load_problem()  # a 64-32-10 tanh MLP trained on digits; the same on every rank
    model = problem.model.to(device)
    inputs = torch.cat([x for x, _ in problem.data])
    targets = torch.cat([y for _, y in problem.data])
    # DistributedSampler pads the last shard with repeated samples (or drops some, drop_last=True)
    # unless the data divides evenly: keep a multiple of the world size so the union is exact.
    usable = len(targets) - len(targets) % world
    dataset = TensorDataset(inputs[:usable], targets[:usable])
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    shard = [
        (x.to(device), y.to(device))
        for x, y in DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    ]

    group = dist.group.WORLD
    H = curvop.HessianOperator(model, problem.loss_fn, shard, process_group=group)
    start = time.perf_counter()
    top = curvop.top_eigenvalues(H, k=args.k, seed=0)
    density = curvop.spectral_density(H, num_probes=4, num_steps=30, seed=0)
    seconds = time.perf_counter() - start
    samples = torch.tensor([sum(len(y) for _, y in shard)], device=device)
    dist.all_reduce(samples)  # only for the report: the operator counts samples by itself

    if rank == 0:
        print(
            f"{world} ranks, {int(samples)} samples ({len(shard)} batches on rank 0), n = {H.shape[0]:,}"
        )
        print(f"top-{args.k} Hessian eigenvalues: {np.array2string(top, precision=6)}")
        mean = float(trapezoid(density.grid * density.density, density.grid))
        print(
            f"SLQ density (4 probes x 30 steps): support [{density.grid[0]:.4f}, "
            f"{density.grid[-1]:.4f}], mean eigenvalue {mean:.5f}"
        )
        print(f"{seconds:.1f} s on rank 0")
        if args.check:
            whole = [(inputs[:usable].to(device), targets[:usable].to(device))]
            single = curvop.HessianOperator(model, problem.loss_fn, whole)
            reference = curvop.top_eigenvalues(single, k=args.k, seed=0)
            print(
                f"one process, all the data: max |difference| {np.abs(top - reference).max():.1e}"
            )
    dist.barrier()  # leave together: gloo aborts a rank whose peer tears down mid-message
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
