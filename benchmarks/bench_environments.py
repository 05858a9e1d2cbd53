"""Benchmark: what a cached per-job environment (``packages``) adds to a job's start.

Submit -> first line of user code for the same no-op job with ``packages: {pip:
[numpy<2]}`` (its env already built on the node) and without packages, interleaved, in
the same run, on a fresh local default. The first (building) run is reported apart.
The user command prints its own clock, so polling does not count.

One node: the Ray nodes of a local default share a session directory, and two of
them building the same env there at once undo each other's work (separate machines
do not share it).

    python benchmarks/bench_environments.py [--runs 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from common import figure, local_default

from raybatch import Client

CMD = "date +%s.%N"
PACKAGES = {"pip": ["numpy<2"]}


def first_line_time(client: Client, job_id: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = client.logs(job_id)
        if text and text.strip():
            return float(text.strip().splitlines()[0])
        time.sleep(0.05)
    job = client.get(job_id)
    raise TimeoutError(f"no output from {job_id} ({job.state.value}, {job.phase}): {job.reason}")


def run(client: Client, packages: bool, command: str = CMD, timeout: float = 120) -> tuple[float, str]:
    fields = {"name": "env" if packages else "plain", "experiment": "bench", "command": command}
    if packages:
        fields["packages"] = PACKAGES
    t0 = time.time()
    job = client.submit(fields)
    t1 = first_line_time(client, job.id, timeout)
    done = client.wait(job.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    return t1 - t0, client.logs(job.id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    env_dir = None
    with local_default(nodes=1) as (_info, client):
        # the first job with this list builds its env; it prints its clock, then its python
        t0 = time.time()
        _, out = run(client, True, f"{CMD}; python -c 'import sys, numpy; print(sys.executable, numpy.__version__)'",
                     timeout=900)
        build = time.time() - t0
        exe, version = out.strip().splitlines()[-1].split()
        env_dir = Path(exe).parents[2]  # .../runtime_resources/pip/<hash>
        assert version.startswith("1."), version
        run(client, False)  # warm the plain path too
        cached, plain = [], []
        for _ in range(args.runs):
            cached.append(run(client, True)[0])
            plain.append(run(client, False)[0])
    print(f"per-job environment (packages: {PACKAGES}), submit -> first line, 1 node, {args.runs} runs each:")
    print(f"  first job (builds the env on the node): {build:.1f} s (submit -> end)")
    print(figure("cached env", cached))
    print(figure("no packages", plain))
    print(f"  cached env adds (median difference): {statistics.median(cached) - statistics.median(plain):+.2f} s")
    if env_dir is not None and env_dir.parent.name == "pip":
        shutil.rmtree(env_dir, ignore_errors=True)  # a copy of the node's virtualenv (GBs)


if __name__ == "__main__":
    main()
