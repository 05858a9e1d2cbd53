"""Benchmark (b): the PyTorch DDP recipe's wall time under raybatch (2 nodes x 1
process, submit -> SUCCEEDED as the user waits for it) against torchrun running
the same script with 2 processes on the same machine, in the same run,
interleaved.

    python benchmarks/bench_recipe_walltime.py [--runs 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compare, local_default, recipe_walltime

from raybatch import Client

RECIPE = ROOT / "recipes" / "pytorch-digits-ddp"


def via_torchrun(epochs: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        subprocess.run(
            [str(Path(sys.executable).with_name("torchrun")), "--nnodes", "1", "--nproc-per-node", "2",
             "train.py", "--epochs", str(epochs), "--checkpoint-dir", f"{d}/ck", "--model-dir", f"{d}/m"],
            cwd=RECIPE, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return time.monotonic() - t0


def via_raybatch(client: Client, epochs: int) -> float:
    return recipe_walltime(client, RECIPE / "job.yaml", f"python train.py --epochs {epochs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    with local_default(nodes=2) as (_, client):
        compare(f"pytorch-digits-ddp, {args.epochs} epochs, 2 ranks", args.runs,
                lambda warmup: via_raybatch(client, 1 if warmup else args.epochs), "raybatch (2 local nodes)",
                lambda warmup: via_torchrun(1 if warmup else args.epochs), "torchrun (2 processes)")


if __name__ == "__main__":
    main()
