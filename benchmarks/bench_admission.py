"""Benchmark: admission at scale — 10,000 queued jobs.

A real server on the embedded local default (1 Ray node). Jobs ask for a custom
resource no node has, so every one stays queued and each scheduling cycle walks
the whole queue (the worst case: nothing fits, every job needs a reason).

Printed:
- submissions accepted per second through the REST API: half the jobs one
  request each (several client processes), half through the batch endpoint
  (POST /jobs/batch, 500 per request, one client: how arrays and sweeps
  submit); and the same clients' rate on GET /health, the HTTP stack's
  ceiling in the same run, as the baseline;
- one scheduling cycle's time with 10,000 queued (the server's own timer:
  reconcile + store query + policy + recording reasons), median of 20 cycles;
- the server's resident memory (VmRSS) at 10,000 queued;
- jobs lost: listed QUEUED jobs vs accepted submissions.

    python benchmarks/bench_admission.py [--jobs 10000] [--clients 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import httpx
from common import local_default

from raybatch.config import API_PREFIX

SPEC = {"name": "queued", "experiment": "bench", "command": "true",
        "resources": {"cpus": 1, "custom": {"bench_slot": 1}}}


def _client_loop(url: str, token: str, n: int, path: str, out: mp.Queue) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    ok = 0
    with httpx.Client(base_url=url + API_PREFIX, headers=headers, timeout=60) as c:
        for k in range(n):
            if path == "submit":
                r = c.post("/jobs", json={"spec": {**SPEC, "name": f"q{k}"}})
                ok += r.status_code == 201
            else:
                ok += c.get("/health").status_code == 200
    out.put(ok)


def rate(url: str, token: str, total: int, clients: int, path: str) -> tuple[float, int]:
    out: mp.Queue = mp.Queue()
    per = total // clients
    procs = [mp.Process(target=_client_loop, args=(url, token, per, path, out)) for _ in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    accepted = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return accepted / (time.perf_counter() - t0), accepted


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    with local_default(nodes=1) as (info, client):
        url, token = info["url"], info["token"]
        server_pid = info["pids"]["server"]
        rss_idle = rss_mb(server_pid)
        health, _ = rate(url, token, 2000, args.clients, "health")
        cpu0 = cpu_s(server_pid)
        submits, accepted = rate(url, token, args.jobs // 2, args.clients, "submit")
        server_ms = (cpu_s(server_pid) - cpu0) * 1000 / max(accepted, 1)
        t0 = time.perf_counter()
        batch = client.submit_many([{**SPEC, "name": f"b{k}"} for k in range(args.jobs - args.jobs // 2)])
        batch_rate = len(batch) / (time.perf_counter() - t0)
        accepted += len(batch)
        # cycles at full depth: wait for cycles that saw every job
        samples: list[float] = []
        plans: list[float] = []
        last = -1
        deadline = time.monotonic() + 120
        while len(samples) < 20 and time.monotonic() < deadline:
            s = client.scheduler()
            if s.queued >= accepted and s.cycles != last:
                samples.append(s.last_cycle_ms)
                plans.append(s.last_plan_ms)
                last = s.cycles
            time.sleep(0.3)
        rss = rss_mb(server_pid)
        queued = client.list(state=["QUEUED"], limit=100_000)
        lost = accepted - len(queued)
        print(f"admission: {accepted} jobs submitted by {args.clients} client processes; 1-node local default")
        print(f"  submits accepted/s       {submits:8.0f}   one request per job; target >= 500/s")
        print(f"  batch submits/s          {batch_rate:8.0f}   POST /jobs/batch, 500 per request")
        print(f"  server CPU per submit    {server_ms:8.2f} ms (API and scheduler together)")
        print(f"  GET /health/s (ceiling)  {health:8.0f}   submit / ceiling = {submits / health:.2f}x")
        print(f"  cycle at {accepted} queued   median {statistics.median(samples):.1f} ms "
              f"(min {min(samples):.1f}, max {max(samples):.1f}; policy alone "
              f"{statistics.median(plans):.1f} ms)   target <= 50 ms")
        print(f"  server RSS               {rss:8.0f} MB (idle {rss_idle:.0f} MB)   target <= 300 MB")
        print(f"  jobs lost                {lost:8d}   target 0")


if __name__ == "__main__":
    main()
