"""Benchmark: the MPI recipe (mpi4py data-parallel softmax regression, 2 processes)
under raybatch (2 local nodes x 1 process, framework: mpi, submit -> SUCCEEDED as the
user waits for it) against plain ``mpirun -np 2`` of the same script on the same
machine, in the same run, interleaved.

    python benchmarks/bench_mpi.py [--runs 3] [--epochs 20000]

Also prints the fixed cost (the difference), which does not grow with the run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, compare, local_default, recipe_walltime

from raybatch import Client

RECIPE = ROOT / "recipes" / "mpi-allreduce"


def via_mpirun(epochs: int) -> float:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).with_name("mpirun")), "-np", "2", "--bind-to", "none",
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
    with local_default(nodes=2) as (_, client):
        compare(f"mpi-allreduce, {args.epochs} epochs, 2 MPI processes", args.runs,
                lambda warmup: via_raybatch(client, 10 if warmup else args.epochs), "raybatch (2 local nodes)",
                lambda warmup: via_mpirun(10 if warmup else args.epochs), "mpirun -np 2")


if __name__ == "__main__":
    main()
