"""Benchmark: the TensorFlow multi-worker recipe (Keras model, MultiWorkerMirroredStrategy,
2 workers) under raybatch (2 local nodes x 1 process, framework: tensorflow, submit ->
SUCCEEDED as the user waits for it) against the same script started directly as 2
processes with hand-made TF_CONFIG on localhost, on the same machine, in the same run,
interleaved. Both get the thread settings the adapter sets (TF_NUM_INTRAOP_THREADS=1,
TF_NUM_INTEROP_THREADS=2, OMP_NUM_THREADS=1).

    python benchmarks/bench_tensorflow.py [--runs 3] [--epochs 100]

Also prints the training time each run reports ("training took X s", chief only), the
fixed cost (the difference of the wall times), and, measured separately, the wall time
of a no-op tensorflow job (submit -> SUCCEEDED, 2 ranks running `true`): raybatch's own
per-job cost, which does not grow with the run."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from common import ROOT, figure, local_default

from raybatch import Client
from raybatch.local.embedded import free_port

RECIPE = ROOT / "recipes" / "tensorflow-digits-multiworker"
THREADS = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2", "OMP_NUM_THREADS": "1"}


def _train_seconds(log: str) -> float:
    return float(re.search(r"training took ([0-9.]+) s", log).group(1))


def direct(epochs: int) -> tuple[float, float]:
    """(wall time, training time) of 2 worker processes started by hand."""
    workers = [f"localhost:{free_port()}" for _ in range(2)]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        procs = []
        for i in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            procs.append(subprocess.Popen(
                [sys.executable, "train.py", "--epochs", str(epochs), "--model-dir", f"{d}/m{i}"],
                cwd=RECIPE, stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, **THREADS, "TF_CONFIG": json.dumps(tf_config)}, text=True,
            ))
        out = procs[0].communicate()[0]
        codes = [p.wait() for p in procs]
        elapsed = time.monotonic() - t0
    assert codes == [0, 0], codes
    return elapsed, _train_seconds(out)


def via_raybatch(client: Client, epochs: int) -> tuple[float, float]:
    t0 = time.monotonic()
    job = client.submit(RECIPE / "job.yaml", overrides=[f"command=python train.py --epochs {epochs}"])
    done = client.wait(job.id, poll=0.1)
    elapsed = time.monotonic() - t0
    assert done.state == "SUCCEEDED", done.reason
    return elapsed, _train_seconds(client.logs(job.id, rank=0))


def noop(client: Client) -> float:
    t0 = time.monotonic()
    job = client.submit({"name": "tf-noop", "experiment": "bench", "framework": "tensorflow", "nodes": 2,
                         "resources": {"cpus": 1}, "command": "true"})
    done = client.wait(job.id, poll=0.1)
    assert done.state == "SUCCEEDED", done.reason
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args()
    with local_default(nodes=2) as (_, client):
        via_raybatch(client, 1), direct(1)  # warm-up: page cache, worker pools
        rb, dr = [], []
        for _ in range(args.runs):
            rb.append(via_raybatch(client, args.epochs))
            dr.append(direct(args.epochs))
        noops = [noop(client) for _ in range(args.runs)]
        walls_rb, walls_dr = [w for w, _ in rb], [w for w, _ in dr]
        print(f"tensorflow-digits-multiworker, {args.epochs} epochs, 2 workers, {args.runs} interleaved runs")
        print(figure("raybatch (2 local nodes)", walls_rb, width=30))
        print(figure("direct (2 procs, TF_CONFIG)", walls_dr, width=30))
        print(figure("ratio raybatch / direct", [a / b for a, b in zip(walls_rb, walls_dr)], "x", width=30)
              + "  target <= 1.05x")
        print(figure("fixed cost (difference)", [a - b for a, b in zip(walls_rb, walls_dr)], width=30))
        print(figure("training, raybatch", [t for _, t in rb], width=30))
        print(figure("training, direct", [t for _, t in dr], width=30))
        print(figure("training ratio", [a[1] / b[1] for a, b in zip(rb, dr)], "x", width=30))
        print(figure("no-op tensorflow job", noops, width=30))


if __name__ == "__main__":
    main()
