"""Benchmark: job arrays on warm slots.

(a) Throughput of N items of about S seconds of CPU each (a Python busy loop, one
    process per item): a raybatch array job on the embedded local default's 2 nodes
    (2 slots of 1 CPU; submit -> SUCCEEDED), against plain Ray tasks on the same
    cluster in the same run (``@ray.remote(num_cpus=1)`` running the same command with
    ``subprocess.run``; first submit -> last result). Target: raybatch >= 0.9x.
(b) No-op items: an array job of N no-op items against N separate no-op jobs
    (``Client.submit_many``), items (jobs) per second. Target: >= 10x.

    python benchmarks/bench_array.py [--items 200] [--seconds 1] [--noop 60] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import figure, local_default

from raybatch import Client
from raybatch.config import ray_client_env

BUSY = ("{py} -c \"import time; t = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
        "print('done')\"")


def via_array(client: Client, command: str, items: int, slots: int) -> float:
    t0 = time.monotonic()
    job = client.submit({"name": "bench-array", "experiment": "bench", "command": command,
                         "resources": {"cpus": 1}, "array": {"count": items, "max_concurrent": slots}})
    done = client.wait(job.id, poll=0.1)
    elapsed = time.monotonic() - t0
    assert done.state == "SUCCEEDED", done.reason
    return elapsed


def via_ray_tasks(address: str, command: str, items: int) -> float:
    import subprocess

    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)

    @ray.remote(num_cpus=1)
    def run(cmd: str) -> int:
        return subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL).returncode

    t0 = time.monotonic()
    codes = ray.get([run.remote(command) for _ in range(items)])
    elapsed = time.monotonic() - t0
    assert codes == [0] * items
    return elapsed


def via_jobs(client: Client, command: str, items: int) -> float:
    t0 = time.monotonic()
    jobs = client.submit_many([{"name": f"bench-noop-{i}", "experiment": "bench", "command": command,
                                "resources": {"cpus": 1}} for i in range(items)])
    for j in jobs:
        assert client.wait(j.id, poll=0.2).state == "SUCCEEDED"
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--noop", type=int, default=60, help="no-op items (and separate jobs) in (b)")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    busy = BUSY.format(py=sys.executable, s=args.seconds)
    with local_default(nodes=2) as (info, client):
        ray_client_env()
        os.environ.setdefault("RAY_ADDRESS", info["ray_address"])
        via_array(client, "true", 4, 2)  # warm-up: worker pools, the code paths
        via_ray_tasks(info["ray_address"], "true", 4)
        rb, ray_ = [], []
        for _ in range(args.runs):
            rb.append(via_array(client, busy, args.items, 2))
            ray_.append(via_ray_tasks(info["ray_address"], busy, args.items))
        print(f"(a) {args.items} items of {args.seconds:g} s CPU, 2 slots / 2 CPUs, {args.runs} interleaved run(s)")
        print(figure("raybatch array", rb))
        print(figure("plain Ray tasks", ray_))
        print(figure("items/s raybatch", [args.items / t for t in rb], "/s"))
        print(figure("items/s Ray tasks", [args.items / t for t in ray_], "/s"))
        print(figure("throughput ratio", [b / a for a, b in zip(rb, ray_)], "x") + "  target >= 0.9x")
        print(figure("ideal (items x s / 2)", [args.items * args.seconds / 2]))
        arr, jobs = [], []
        for _ in range(args.runs):
            arr.append(via_array(client, "true", args.noop, 2))
            jobs.append(via_jobs(client, "true", args.noop))
        print(f"(b) {args.noop} no-op items vs {args.noop} separate no-op jobs, 2 nodes")
        print(figure("array items/s", [args.noop / t for t in arr], "/s"))
        print(figure("separate jobs/s", [args.noop / t for t in jobs], "/s"))
        print(figure("ratio", [b / a for a, b in zip(arr, jobs)], "x") + "  target >= 10x")


if __name__ == "__main__":
    main()
