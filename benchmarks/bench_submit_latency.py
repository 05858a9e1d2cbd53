"""Benchmark (a): submit -> first line of user code, for a no-op job.

raybatch (CLI/SDK -> server -> queue -> Ray Job -> driver -> placement group ->
rank actor -> user process) against the same command submitted straight to
Ray's JobSubmissionClient, on the same local 2-node cluster, in the same run,
interleaved. The user command prints its own clock, so polling does not count.

    python benchmarks/bench_submit_latency.py [--runs 7]
"""

from __future__ import annotations

import argparse
import re
import time

from common import figure, local_default

from raybatch import Client
from raybatch.config import ray_client_env

CMD = "date +%s.%N"


def first_line_time(read, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = read()
        if text and text.strip():
            return float(text.strip().splitlines()[0])
        time.sleep(0.05)
    raise TimeoutError("no output")


def via_raybatch(client: Client) -> float:
    t0 = time.time()
    job = client.submit({"name": "noop", "experiment": "bench", "command": CMD})
    t1 = first_line_time(lambda: client.logs(job.id))
    client.wait(job.id, timeout=60)
    return t1 - t0


def via_ray_jobs(jobs) -> float:
    t0 = time.time()
    sid = jobs.submit_job(entrypoint=CMD)
    t1 = first_line_time(lambda: "\n".join(
        l for l in jobs.get_job_logs(sid).splitlines() if re.fullmatch(r"\d+\.\d+", l.strip())))
    while not jobs.get_job_status(sid).is_terminal():
        time.sleep(0.05)
    return t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with local_default(nodes=2) as (info, client):
        ray_client_env()
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(info["dashboard_url"])
        via_raybatch(client), via_ray_jobs(jobs)  # warm-up: code paths, worker pools
        rb, ray_ = [], []
        for _ in range(args.runs):
            rb.append(via_raybatch(client))
            ray_.append(via_ray_jobs(jobs))
        ratios = [a / b for a, b in zip(rb, ray_)]
        print(f"submit -> first line of a no-op job, {args.runs} interleaved runs, 2-node local cluster")
        print(figure("raybatch", rb))
        print(figure("Ray Jobs (direct)", ray_))
        print(figure("ratio raybatch / Ray Jobs", ratios, "x") + "  target <= 1.5x")


if __name__ == "__main__":
    main()
