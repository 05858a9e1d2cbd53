"""Benchmark (clusters issue): `raybatch cluster up` to a first running job, and how long
a queued 2-node job waits for the autoscaler's nodes, on cluster_configs/local-fake.yaml
(Ray's fake_multinode provider: worker "nodes" are raylets on this machine, so launch
time is Ray start-up, not VM provisioning). Under a throw-away RAYBATCH_HOME.

Printed:

- ``cluster up`` (the CLI: render, Ray head with its autoscaler, raybatch server) and then
  a 1-node job from submit to RUNNING (it needs a new node), next to the floor measured in
  the same run: a bare ``ray start --head`` (no autoscaler, no server) until its GCS answers;
- a queued 2-node job (2 CPUs per node, spread) from submit until it is RUNNING: the
  scheduler plans the nodes, asks the autoscaler, the nodes join, the gang is placed and
  its ranks start; split into submit -> both nodes alive -> RUNNING. The raw baseline,
  alternated with it on the same cluster: a Ray placement group of the same two bundles
  (STRICT_SPREAD) created by a Ray driver, until ``ready()``, which Ray's autoscaler alone
  serves. Before each run the workers are left to idle out (idle_timeout_minutes: 0.5).

    python benchmarks/bench_cluster.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, figure

from raybatch.config import ray_client_env

RAYBATCH = str(Path(sys.executable).with_name("raybatch"))
RAY = str(Path(sys.executable).with_name("ray"))
CONFIG = ROOT / "cluster_configs" / "local-fake.yaml"


def cli(home: Path, *args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAYBATCH_ADDRESS", "RAYBATCH_TOKEN")}
    p = subprocess.run([RAYBATCH, *args], capture_output=True, text=True, timeout=timeout,
                       env={**env, "RAYBATCH_HOME": str(home)})
    if p.returncode != 0:
        raise SystemExit(f"raybatch {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def workers_alive(gcs_address: str) -> int:
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(GcsClient(address=gcs_address))
    # the head started by `ray start --head` has no node type name in the GCS: tell it by its marker
    return sum(1 for n in state.node_states
               if n.status in (1, 3) and "node:__internal_head__" not in n.total_resources)


def wait(check, timeout: float, what: str, interval: float = 0.1) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic()
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def bare_head_start() -> float:
    """`ray start --head` alone, until its GCS answers: the floor of any start here."""
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    from raybatch.local.embedded import free_port

    temp = tempfile.mkdtemp(prefix="rbbh_", dir="/tmp")
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(port), "--temp-dir", temp,
                             "--node-ip-address", "127.0.0.1", "--num-cpus", "0", "--disable-usage-stats",
                             "--include-dashboard", "true", "--dashboard-port", str(free_port()),
                             "--ray-client-server-port", str(free_port()),
                             "--dashboard-agent-listen-port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "token"})

    def up() -> bool:
        try:
            return any(n.status in (1, 3) for n in
                       get_cluster_resource_state(GcsClient(address=f"127.0.0.1:{port}")).node_states)
        except Exception:  # noqa: BLE001 - not up yet
            return False
    try:
        return wait(up, 60, "a bare Ray head") - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def job_file(tmp: Path, nodes: int, sleep: float) -> Path:
    f = tmp / f"job{nodes}.yaml"
    f.write_text(yaml.safe_dump({"name": f"bench-{nodes}", "nodes": nodes, "resources": {"cpus": 2},
                                 "command": f"sleep {sleep}"}))
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    ray_client_env()
    home = Path(tempfile.mkdtemp(prefix="raybatch-bench-cluster-"))
    tmp = home / "jobs"
    tmp.mkdir()

    floor = bare_head_start()
    t0 = time.monotonic()
    cli(home, "cluster", "up", str(CONFIG))
    up_s = time.monotonic() - t0
    state = json.loads((home / "clusters" / "local-fake" / "state.json").read_text())
    gcs = state["ray_address"]
    try:
        t1 = time.monotonic()
        job = cli(home, "--cluster", "local-fake", "submit", str(job_file(tmp, 1, 1))).strip()

        def state_of(job_id: str) -> str:
            return json.loads(cli(home, "--cluster", "local-fake", "show", job_id, "-o", "json"))["state"]
        wait(lambda: state_of(job) in ("RUNNING", "SUCCEEDED"), 120, "the first job", 0.2)
        first_s = time.monotonic() - t1
        wait(lambda: state_of(job) == "SUCCEEDED", 60, "the first job to end", 0.5)

        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        rb, rb_nodes, raw = [], [], []
        for _ in range(args.runs):
            wait(lambda: workers_alive(gcs) == 0, 180, "idle workers to be removed", 1)
            t = time.monotonic()
            job = cli(home, "--cluster", "local-fake", "submit", str(job_file(tmp, 2, 3))).strip()
            nodes_at = wait(lambda: workers_alive(gcs) >= 2, 120, "2 nodes for the job")
            wait(lambda: state_of(job) in ("RUNNING", "SUCCEEDED"), 120, "the 2-node job", 0.1)
            rb.append(time.monotonic() - t)
            rb_nodes.append(nodes_at - t)
            wait(lambda: state_of(job) == "SUCCEEDED", 60, "the 2-node job to end", 0.5)

            wait(lambda: workers_alive(gcs) == 0, 180, "idle workers to be removed", 1)
            ray.init(address=gcs, logging_level="ERROR", log_to_driver=False)
            try:
                t = time.monotonic()
                pg = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_SPREAD")
                ray.get(pg.ready(), timeout=120)
                raw.append(time.monotonic() - t)
                remove_placement_group(pg)
            finally:
                ray.shutdown()
    finally:
        cli(home, "cluster", "down", "local-fake", "--yes")
        shutil.rmtree(home, ignore_errors=True)

    print("raybatch cluster up on cluster_configs/local-fake.yaml (fake_multinode)")
    print(figure("cluster up (CLI)", [up_s]))
    print(figure("then 1-node job RUNNING", [first_s]))
    print(figure("up -> first job RUNNING", [up_s + first_s]))
    print(figure("bare ray start --head", [floor]) + "  (the floor: no autoscaler, no server)")
    print(figure("ratio up / bare head", [up_s / floor], "x"))
    print(f"a queued 2-node job getting its nodes, {args.runs} alternated runs (workers idled out before each)")
    print(figure("raybatch submit -> nodes", rb_nodes))
    print(figure("raybatch submit -> RUNNING", rb))
    print(figure("Ray PG alone -> ready", raw) + "  (raw baseline: Ray's autoscaler serving a placement group)")
    print(figure("ratio raybatch / raw PG", [a / b for a, b in zip(rb, raw)], "x"))


if __name__ == "__main__":
    main()
