"""Benchmark: the MPI recipe (mpi4py data-parallel softmax regression, 2 processes)
under raybatch (2 local nodes x 1 process, framework: mpi, submit -> SUCCEEDED as the
user waits for it) against plain ``mpirun -np 2`` of the same script on the same
machine, in the same run, interleaved. Two baselines:

- ``mpirun -np 2``: Open MPI's defaults, so shared memory between the two processes;
- ``mpirun -np 2 --mca btl tcp,self``: the transport raybatch's two nodes use (they are
  separate hosts to Open MPI, as real nodes are), so the comparison is like for like.

    python benchmarks/bench_mpi.py [--runs 3] [--epochs 20000]

Also prints the fixed cost (the difference), which does not grow with the run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, figure, local_default, recipe_walltime

from raybatch import Client

RECIPE = ROOT / "recipes" / "mpi-allreduce"


def via_mpirun(epochs: int, *mca: str) -> float:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).with_name("mpirun")), "-np", "2", "--bind-to", "none", *mca,
         sys.executable, "allreduce.py", "--epochs", str(epochs)],
        cwd=RECIPE, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    return time.monotonic() - t0


def via_raybatch(client: Client, epochs: int) -> float:
    return recipe_walltime(client, RECIPE / "job.yaml", f"python allreduce.py --epochs {epochs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20000)
    args = ap.parse_args()
    tcp = ("--mca", "btl", "tcp,self")
    with local_default(nodes=2) as (_, client):
        via_raybatch(client, 10), via_mpirun(10), via_mpirun(10, *tcp)  # page cache, worker pools
        rb, shm, net = [], [], []
        for _ in range(args.runs):
            rb.append(via_raybatch(client, args.epochs))
            shm.append(via_mpirun(args.epochs))
            net.append(via_mpirun(args.epochs, *tcp))
    print(f"mpi-allreduce, {args.epochs} epochs, 2 MPI processes, {args.runs} interleaved runs")
    print(figure("raybatch (2 local nodes)", rb, width=34))
    print(figure("mpirun -np 2 (shared memory)", shm, width=34))
    print(figure("mpirun -np 2 --mca btl tcp,self", net, width=34))
    for label, base in (("shared memory", shm), ("tcp", net)):
        print(figure(f"ratio raybatch / mpirun ({label})", [a / b for a, b in zip(rb, base)], "x", width=34)
              + "  target <= 1.05x")
        print(figure(f"difference vs mpirun ({label})", [a - b for a, b in zip(rb, base)], width=34))


if __name__ == "__main__":
    main()
