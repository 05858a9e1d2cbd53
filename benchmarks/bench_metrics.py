"""Benchmark: the cost of a Prometheus scrape (GET /metrics) at 10,000 queued jobs.

A real server on the embedded local default (1 Ray node). Jobs ask for a custom
resource no node has, so every one stays queued (10 experiments, 3 priorities: 30
queue-length series). Then, interleaved in the same run, each ``--scrapes`` times:

- GET /metrics with the bearer token (store counters, queue by priority and
  experiment, histograms, per-job metrics), client-side wall time;
- GET /api/v1/health, the HTTP stack's floor in the same server (baseline);
- ``generate_latest`` of an empty ``CollectorRegistry`` in this process (what the
  Prometheus client costs with nothing to say).

Printed: each one's median (min, max), the ratios, and the size of a scrape.
Goal: a scrape at 10,000 queued jobs <= 20 ms.

    python benchmarks/bench_metrics.py [--jobs 10000] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import time

import httpx
from common import figure, local_default
from prometheus_client import CollectorRegistry, generate_latest

from raybatch.config import API_PREFIX

SPEC = {"command": "true", "resources": {"cpus": 1, "custom": {"bench_slot": 1}}}
PRIORITIES = ("low", "normal", "high")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args()
    with local_default(nodes=1) as (info, client):
        url, token = info["url"], info["token"]
        specs = [{**SPEC, "name": f"q{k}", "experiment": f"exp{k % 10}", "priority": PRIORITIES[k % 3]}
                 for k in range(args.jobs)]
        for i in range(0, len(specs), 1000):
            client.submit_many(specs[i:i + 1000])
        deadline = time.monotonic() + 120
        while client.scheduler().queued < args.jobs and time.monotonic() < deadline:
            time.sleep(0.3)  # the scheduler's queue holds them all (the queue gauge reads it)
        empty = CollectorRegistry()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            body = http.get("/metrics")
            assert body.status_code == 200, body.text
            queued = sum(float(line.rsplit(" ", 1)[1]) for line in body.text.splitlines()
                         if line.startswith("raybatch_queue_length{"))
            for _ in range(3):  # warm-up: connection, page cache
                http.get("/metrics"), http.get(API_PREFIX + "/health")
            scrape, health, raw = [], [], []
            for _ in range(args.scrapes):
                scrape.append(timed(lambda: http.get("/metrics").raise_for_status()))
                health.append(timed(lambda: http.get(API_PREFIX + "/health").raise_for_status()))
                raw.append(timed(lambda: generate_latest(empty)))
        ratio_h = [a / b for a, b in zip(scrape, health)]
        print(f"metrics: GET /metrics at {int(queued)} queued jobs ({args.jobs} submitted), "
              f"{args.scrapes} interleaved scrapes; 1-node local default")
        print(f"  scrape size                  {len(body.content) / 1024:8.1f} KiB, "
              f"{sum(1 for line in body.text.splitlines() if line and not line.startswith('#'))} samples")
        print(figure("GET /metrics", scrape, "ms", width=28) + "   target <= 20 ms")
        print(figure("GET /health (baseline)", health, "ms", width=28))
        print(figure("empty registry, in process", raw, "ms", width=28))
        print(figure("ratio /metrics / /health", ratio_h, "x", width=28))
        print(f"  /metrics - /health           median {sorted(a - b for a, b in zip(scrape, health))[len(scrape) // 2]:.2f} ms "
              "(the scrape's own cost)")


if __name__ == "__main__":
    main()
