"""Benchmark: cluster utilization on a synthetic trace, through the real scheduler
policy (raybatch.scheduler.policy.plan) driven by a simulated clock.

A fixed-seed mix of 1-, 2- and 4-node jobs, with durations and max_wall_clock
limits (users over-estimate: limit = duration x 1.0-2.0), all queued at t=0 on
a simulated cluster of 8 identical nodes. Compared: raybatch's policy (EASY
backfill) against strict FIFO (the same policy with backfill off), and both
against the lower bound on makespan, total work / capacity.

    python benchmarks/bench_scheduler_trace.py [--jobs 300] [--seeds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from common import ROOT  # noqa: F401 - puts the repo on sys.path

from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.policy import Job
from raybatch.spec.policy import SchedulerPolicy
from raybatch.scheduler.simulate import SimJob, simulate

NODES, CPUS = 8, 8


def trace(n: int, seed: int) -> list[SimJob]:
    rng = random.Random(seed)
    jobs = []
    for k in range(n):
        count = rng.choices([1, 2, 4], weights=[5, 3, 2])[0]
        duration = round(rng.lognormvariate(6.0, 0.9))  # median ~7 min, long tail
        duration = max(60, min(duration, 4 * 3600))
        limit = duration * rng.uniform(1.0, 2.0)
        prio = rng.choices([250, 500, 750], weights=[1, 3, 1])[0]
        jobs.append(SimJob(Job(f"j{k}", prio, k, {"CPU": float(CPUS)}, count=count, limit=limit),
                           duration))
    return jobs


def cluster() -> list[NodeView]:
    return [NodeView(f"n{i}", available={"CPU": float(CPUS)}, total={"CPU": float(CPUS)})
            for i in range(NODES)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    print(f"{args.jobs} jobs (1/2/4 nodes, 60 s-4 h) on {NODES} simulated nodes, seeds 1-{args.seeds}")
    print(f"  {'seed':>4}  {'bound':>8}  {'EASY':>8}  {'FIFO':>8}  {'EASY util':>9}  {'FIFO util':>9}"
          f"  {'EASY/FIFO':>9}  {'cycles':>6}  {'ms/cycle':>8}")
    utils, ratios = [], []
    for seed in range(1, args.seeds + 1):
        jobs = trace(args.jobs, seed)
        work = sum(j.duration * j.job.count for j in jobs)
        bound = work / NODES
        t0 = time.perf_counter()
        easy = simulate(cluster(), jobs, SchedulerPolicy())
        ms = (time.perf_counter() - t0) * 1000 / max(easy.cycles, 1)
        fifo = simulate(cluster(), jobs, SchedulerPolicy(backfill=False))
        assert not easy.never and not fifo.never and len(easy.ends) == len(fifo.ends) == len(jobs)
        u_easy, u_fifo = bound / easy.makespan(), bound / fifo.makespan()
        utils.append(u_easy)
        ratios.append(easy.makespan() / fifo.makespan())
        print(f"  {seed:>4}  {bound / 3600:7.2f}h  {easy.makespan() / 3600:7.2f}h  {fifo.makespan() / 3600:7.2f}h"
              f"  {u_easy:9.1%}  {u_fifo:9.1%}  {ratios[-1]:9.3f}  {easy.cycles:>6}  {ms:8.2f}")
    print(f"  median utilization (bound / makespan): EASY {statistics.median(utils):.1%}  target >= 90%")
    print(f"  median makespan EASY / FIFO: {statistics.median(ratios):.3f}x  target < 1")


if __name__ == "__main__":
    main()
