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
- jobs lost: listed QUEUED jobs vs accepted submissions;
- roles on vs off, in the same run: the single submits alternate (rounds of
  --round jobs) between the server's owner token (roles off: one constant-time
  compare) and a contributor's API token of workspace 'bench' (roles on: the
  token's SHA-256 looked up in memory, the role checked against the job's
  workspace read from the body); the ratio's target is >= 0.9x. Plus each
  check's own cost, in process (ns per call).

    python benchmarks/bench_admission.py [--jobs 10000] [--clients 4] [--round 500]
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


def _client_loop(url: str, token: str, n: int, path: str, out: mp.Queue, workspace: str = "default") -> None:
    headers = {"Authorization": f"Bearer {token}"}
    ok = 0
    with httpx.Client(base_url=url + API_PREFIX, headers=headers, timeout=60) as c:
        for k in range(n):
            if path == "submit":
                r = c.post("/jobs", json={"spec": {**SPEC, "name": f"q{k}", "workspace": workspace}})
                ok += r.status_code == 201
            else:
                ok += c.get("/health").status_code == 200
    out.put(ok)


def rate(url: str, token: str, total: int, clients: int, path: str, workspace: str = "default") -> tuple[float, int]:
    out: mp.Queue = mp.Queue()
    per = total // clients
    procs = [mp.Process(target=_client_loop, args=(url, token, per, path, out, workspace)) for _ in range(clients)]
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


def roles_rates(url: str, owner: str, member: str, total: int, clients: int,
                rnd: int) -> tuple[float, float, int, float]:
    """Submits/s with the owner token (roles off) and with a contributor's API token (roles
    on), ``total`` jobs in all, in rounds of ``rnd`` ordered off, on, on, off, ... (ABBA: a
    queue that deepens or a machine that warms up favours neither); returns (off, on,
    accepted, seconds)."""
    spent = {"off": 0.0, "on": 0.0}
    done = {"off": 0, "on": 0}
    for k in range(max(4, total // rnd // 4 * 4)):
        mode = "off" if k % 4 in (0, 3) else "on"
        t0 = time.perf_counter()
        _, n = rate(url, owner if mode == "off" else member, rnd, clients, "submit",
                    "default" if mode == "off" else "bench")
        spent[mode] += time.perf_counter() - t0
        done[mode] += n
    return (done["off"] / spent["off"], done["on"] / spent["on"], done["off"] + done["on"],
            spent["off"] + spent["on"])


def check_costs(n: int = 200_000) -> tuple[float, float]:
    """ns per authorization in process: the owner token's compare vs an API token's hash
    lookup and role check (what the access dependency adds per request)."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from raybatch.server.identity import Role, TokenRegistry  # noqa: PLC0415
    from raybatch.state.store import Store  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="rb-bench-auth-") as d:
        owner = "o" * 43
        reg = TokenRegistry(owner, Store(Path(d) / "db.sqlite"))
        for i in range(1000):  # a registry with many tokens
            token, _ = reg.create(f"u{i}", f"w{i % 50}", Role.contributor, None, "bench")
        o, t = owner.encode(), token.encode()
        t0 = time.perf_counter()
        for _ in range(n):
            reg.check(o)[0].can(Role.contributor, "default")
        t1 = time.perf_counter()
        for _ in range(n):
            reg.check(t)[0].can(Role.contributor, "w49")
        t2 = time.perf_counter()
    return (t1 - t0) / n * 1e9, (t2 - t1) / n * 1e9


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
    ap.add_argument("--round", type=int, default=500, help="jobs per round of the roles on/off comparison")
    args = ap.parse_args()
    with local_default(nodes=1) as (info, client):
        url, token = info["url"], info["token"]
        server_pid = info["pids"]["server"]
        rss_idle = rss_mb(server_pid)
        health, _ = rate(url, token, 2000, args.clients, "health")
        member = client.create_token("bench-member", "contributor", "bench")["token"]
        cpu0 = cpu_s(server_pid)
        off, on, accepted, took = roles_rates(url, token, member, args.jobs // 2, args.clients, args.round)
        submits = accepted / took  # both halves together
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
        owner_ns, member_ns = check_costs()
        print(f"  roles off (owner token)  {off:8.0f} submits/s")
        print(f"  roles on (API token)     {on:8.0f} submits/s   on / off = {on / off:.2f}x   target >= 0.9x")
        print(f"  authorization, in process: owner token {owner_ns:.0f} ns, API token lookup + role check "
              f"{member_ns:.0f} ns")


if __name__ == "__main__":
    main()
