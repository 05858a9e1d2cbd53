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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raybatch import Client  # noqa: E402
from raybatch.config import ray_client_env  # noqa: E402
from raybatch.local.embedded import LocalCluster  # noqa: E402

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
    home = Path(tempfile.mkdtemp(prefix="raybatch-bench-"))
    local = LocalCluster(home)
    info = local.up(nodes=2)
    try:
        ray_client_env()
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(info["dashboard_url"])
        client = Client(info["url"], local.token())
        via_raybatch(client), via_ray_jobs(jobs)  # warm-up: code paths, worker pools
        rb, ray_ = [], []
        for _ in range(args.runs):
            rb.append(via_raybatch(client))
            ray_.append(via_ray_jobs(jobs))
        ratios = [a / b for a, b in zip(rb, ray_)]
        print(f"submit -> first line of a no-op job, {args.runs} interleaved runs, 2-node local cluster")
        print(f"  raybatch          median {statistics.median(rb):.3f} s  (min {min(rb):.3f}, max {max(rb):.3f})")
        print(f"  Ray Jobs (direct) median {statistics.median(ray_):.3f} s  (min {min(ray_):.3f}, max {max(ray_):.3f})")
        print(f"  ratio raybatch / Ray Jobs: median {statistics.median(ratios):.2f}x  (target <= 1.5x)")
    finally:
        local.down()


if __name__ == "__main__":
    main()
