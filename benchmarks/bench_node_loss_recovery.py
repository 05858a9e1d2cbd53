"""Benchmark (issues 4 and 19): recovery from a lost node.

A 3-node local Ray cluster (tests.conftest.RayTestCluster, on ray.cluster_utils: each
node its own raylet, Ray's node health checks as raybatch sets them,
raybatch.node_health) and a raybatch server. The PyTorch recipe runs on 2 nodes,
checkpointing every epoch; once a few epochs are done, a node holding a rank is lost the
way machines are lost (``--kill``; all by default):

- ``raylet``: its raylet gets SIGKILL (a crashed raylet; the node's workers and ranks
  follow it);
- ``poweroff``: every process of the node gets SIGKILL at once (raylet, workers, agents,
  the ranks' processes);
- ``partition``: its raylet and every process under it get SIGSTOP (the node is cut off:
  nothing answers, nothing refuses); SIGKILL once the run is measured.

Nothing tells Ray: it must find out through its health checks (``cluster.remove_node``,
what this benchmark used before, tells the GCS at once). Printed per path, as medians:

- Ray: kill -> the GCS marked the node DEAD (its ``end_time_ms``): the raw baseline;
- NODE_LOST: kill -> the attempt ended NODE_LOST (its ``ended_at``, which the server
  records after the survivors were stopped and the last outputs uploaded), and the ratio
  to Ray's notice;
- running again: kill -> every rank of attempt 2 running on the remaining nodes (the
  spare node is already up);
- work lost: kill -> the last checkpoint before it, next to the checkpoint interval.

``--health ray-default`` runs with Ray's own health-check settings, for comparison.

``--path eviction`` compares a spot eviction with notice to a loss (``remove_node``): the
node is drained for preemption (``GcsClient.drain_node(DRAIN_NODE_REASON_PREEMPTION,
deadline = notice + 30 s)``, what ``raybatch spot-watch`` does on an Azure Preempt event);
the server SIGTERMs the gang at once, the recipe finishes its epoch, checkpoints and exits,
and the node is removed after the ranks stopped (the cloud takes the VM). Printed per path:

- back to RUNNING: notice (or loss) -> every rank of attempt 2 running;
- work lost: the training time not in a checkpoint when the ranks stopped (with notice:
  the partial epoch is finished and saved, so 0), and the epochs attempt 2 redid.

    python benchmarks/bench_node_loss_recovery.py [--runs 3] [--kill raylet,poweroff,partition]
    python benchmarks/bench_node_loss_recovery.py --path eviction [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, figure

from raybatch import Client
from raybatch.node_health import NODE_HEALTH, RAY_DEFAULTS, detection_bounds_s
from raybatch.config import API_PREFIX
from raybatch.scheduler.cluster import gcs_client, node_hex
from tests.conftest import RayTestCluster

RECIPE = ROOT / "recipes" / "pytorch-digits-ddp"
EPOCH_SLEEP = 1.0  # seconds added to each epoch, so the checkpoint interval is well defined
KILLS = ("raylet", "poweroff", "partition")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(what)


def start_and_pick(client: Client, cluster, rng: random.Random):
    """The recipe running past epoch 4 with a checkpoint; a node holding one of its ranks;
    then a wait until a random moment of an epoch. (job, checkpoint file, that node)"""
    job = client.submit(RECIPE / "job.yaml", overrides=[
        f"command=python train.py --epochs 20 --sleep-per-epoch {EPOCH_SLEEP}"])
    wait(lambda: re.search(r"epoch [4-9]/20", client.logs(job.id)), 180, "epoch 4")
    detail = client.get(job.id)
    ckpt = Path(detail.checkpoint_dir) / "checkpoint.pt"
    nodes = {r.node_id for r in detail.attempts[0].ranks}
    victim = next(n for n in cluster.worker_nodes if n.node_id in nodes)
    wait(lambda: ckpt.exists(), 30, "a checkpoint")
    time.sleep(rng.uniform(0, EPOCH_SLEEP))  # the loss (or the notice) comes at any moment of an epoch
    return job, ckpt, victim


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def ray_death_time(rc: RayTestCluster, node_id: str) -> float:
    """When the GCS marked the node DEAD (epoch s): Ray's own notice of the loss."""
    def dead():
        info = {node_hex(k): v for k, v in gcs_client(rc.address).get_all_node_info(timeout=10).items()}
        n = info.get(node_id)
        return n.end_time_ms / 1000 if n is not None and n.end_time_ms else None
    return wait(dead, 120, "Ray to mark the node dead", interval=0.2)


def lose(rc: RayTestCluster, victim, kill: str) -> tuple[float, list[int]]:
    """Lose the node the way ``kill`` says; when (epoch s), and the node's pids to clean up
    (Ray 2.60's workers outlive a SIGKILLed raylet)."""
    pids = rc.node_pids(victim)
    t = time.time()
    signal_all([rc.raylet_pid(victim)] if kill == "raylet" else pids,
               signal.SIGSTOP if kill == "partition" else signal.SIGKILL)
    return t, pids


def one_run(client: Client, rc: RayTestCluster, rng: random.Random, kill: str) -> dict[str, float]:
    job, ckpt, victim = start_and_pick(client, rc.cluster, rng)
    last_ckpt = ckpt.stat().st_mtime
    t_kill, pids = lose(rc, victim, kill)
    try:
        d = wait(lambda: (lambda j: j if len(j.attempts) == 2 and j.attempts[1].running_at else None)(
            client.get(job.id)), 120, "attempt 2 running")
        ray_dead = ray_death_time(rc, victim.node_id)
    finally:
        signal_all(pids, signal.SIGKILL)  # a partitioned node's processes, and whatever outlived the raylet
        try:
            rc.cluster.remove_node(victim, allow_graceful=False)  # cluster_utils' books
        except Exception:  # noqa: BLE001
            pass
    done = client.wait(job.id, timeout=180)
    assert done.state == "SUCCEEDED", done.reason
    assert done.attempts[0].outcome == "NODE_LOST", (done.attempts[0].outcome, done.attempts[0].reason)
    rc.add_node(1)  # spare for the next run
    return {
        "ray": ray_dead - t_kill,
        "detection": d.attempts[0].ended_at - t_kill,
        "ratio": (d.attempts[0].ended_at - t_kill) / max(ray_dead - t_kill, 1e-3),
        "recovery": d.attempts[1].running_at - t_kill,
        "work_lost": t_kill - last_ckpt,
        "redone": redone_epochs(client, job.id),
        "reason": d.attempts[0].reason,
    }


NOTICE_S = 30.0  # Azure gives a Spot VM at least 30 s between the Preempt event and the eviction


def eviction_run(client: Client, rc: RayTestCluster, rng: random.Random, notice: bool) -> dict[str, float]:
    """One eviction of a node holding a rank: with notice (drained for preemption, then
    removed once the ranks stopped), or without (removed at once)."""
    from ray.core.generated import autoscaler_pb2

    cluster = rc.cluster
    job, ckpt, victim = start_and_pick(client, cluster, rng)
    t0 = time.time()
    if notice:
        gcs = gcs_client(cluster.address)
        accepted, why = gcs.drain_node(victim.node_id, autoscaler_pb2.DrainNodeReason.Value(
            "DRAIN_NODE_REASON_PREEMPTION"), "benchmark: spot eviction", int((t0 + NOTICE_S) * 1000))
        assert accepted, why
        first = wait(lambda: (lambda j: j if j.attempts[0].ended_at else None)(client.get(job.id)), 120,
                     "attempt 1 to end")
        lost = 0.0  # it stopped right after its last checkpoint
        assert first.attempts[0].outcome == "EVICTED", first.attempts[0].reason
        assert "SIGTERM received: checkpoint saved" in client.logs(job.id, attempt=1)
    else:
        lost = t0 - ckpt.stat().st_mtime
    try:
        cluster.remove_node(victim)  # the cloud takes the VM (a drained idle raylet may have gone already)
    except Exception:  # noqa: BLE001
        pass
    d = wait(lambda: (lambda j: j if len(j.attempts) == 2 and j.attempts[1].running_at else None)(
        client.get(job.id)), 120, "attempt 2 running")
    done = client.wait(job.id, timeout=180)
    assert done.state == "SUCCEEDED", done.reason
    assert done.attempts[0].outcome == ("EVICTED" if notice else "NODE_LOST"), done.attempts[0].reason
    rc.add_node(1)  # spare for the next run
    return {"stopped": d.attempts[0].ended_at - t0, "recovery": d.attempts[1].running_at - t0, "work_lost": lost,
            "redone": redone_epochs(client, job.id)}


def redone_epochs(client: Client, job_id: str) -> float:
    """Epochs attempt 1 finished that attempt 2 ran again."""
    reached = [int(m) for m in re.findall(r"epoch (\d+)/20", client.logs(job_id, attempt=1))]
    resumed = re.search(r"resumed from checkpoint at epoch (\d+)", client.logs(job_id, attempt=2))
    return float(max(reached or [0]) - (int(resumed.group(1)) if resumed else 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--path", choices=("loss", "eviction"), default="loss",
                    help="loss: a node lost (the default); eviction: a spot eviction with notice vs without")
    ap.add_argument("--kill", default=",".join(KILLS),
                    help=f"how the node is lost, comma-separated: {', '.join(KILLS)} (default: all)")
    ap.add_argument("--health", choices=("raybatch", "ray-default"), default="raybatch",
                    help="Ray's node health checks: raybatch's settings (the default) or Ray's own")
    args = ap.parse_args()
    kills = [k.strip() for k in args.kill.split(",") if k.strip()]
    if bad := [k for k in kills if k not in KILLS]:
        ap.error(f"--kill: unknown {', '.join(bad)}; allowed: {', '.join(KILLS)}")
    health = NODE_HEALTH if args.health == "raybatch" else RAY_DEFAULTS
    rc = RayTestCluster(nodes=3, health=health)
    state = Path(tempfile.mkdtemp(prefix="raybatch-bench-"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "raybatch.server", "--state-dir", str(state), "--ray-address", rc.address,
         "--dashboard-url", rc.dashboard_url, "--port", str(port)],
        stdout=open(state / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: _healthy(url), 60, "server")
        client = Client(url, (state / "token").read_text().strip())
        rng = random.Random(7)
        if args.path == "eviction":
            report_evictions(client, rc, rng, args.runs)
            return
        refused, silent = detection_bounds_s(health)
        print(f"node loss during the PyTorch recipe (2 of 3 local nodes), {args.runs} run(s) per path; "
              f"health checks {health} (Ray declares a node dead within {refused:.1f} s when its raylet "
              f"is gone, {silent:.1f} s when it is silent); load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs")
        for kill in kills:
            results = [one_run(client, rc, rng, kill) for _ in range(args.runs)]
            print(f"{kill}:")
            for key, label, unit in (("ray", "kill -> Ray marked the node dead", "s"),
                                     ("detection", "kill -> attempt ended NODE_LOST", "s"),
                                     ("ratio", "NODE_LOST / Ray's notice", "x"),
                                     ("recovery", "kill -> all ranks running again", "s"),
                                     ("work_lost", "work lost (since the last checkpoint)", "s")):
                print(figure(f"  {label}", [r[key] for r in results], unit=unit, width=42))
            print(f"    reason: {results[-1]['reason']}")
        print(f"  targets: NODE_LOST <= 5 s, all ranks running again <= 10 s; work lost <= one checkpoint "
              f"interval (~{EPOCH_SLEEP + 0.1:.1f} s here)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        rc.shutdown()


def report_evictions(client: Client, rc: RayTestCluster, rng: random.Random, runs: int) -> None:
    results = {notice: [] for notice in (True, False)}
    for _ in range(runs):
        for notice in (True, False):
            results[notice].append(eviction_run(client, rc, rng, notice))
    print(f"spot eviction of a node during the PyTorch recipe (2 of 3 local nodes), {runs} runs per path; "
          f"notice {NOTICE_S:.0f} s, checkpoint every ~{EPOCH_SLEEP + 0.1:.1f} s")
    for notice, label in ((True, "with notice (drained for preemption)"), (False, "without notice (lost)")):
        r = results[notice]
        print(f"{label}:")
        print(figure("  notice/loss -> attempt 1 ended", [x["stopped"] for x in r], width=42))
        print(figure("  notice/loss -> all ranks RUNNING again", [x["recovery"] for x in r], width=42))
        print(figure("  work lost (s not in a checkpoint)", [x["work_lost"] for x in r], width=42))
        print(figure("  epochs redone by attempt 2", [x["redone"] for x in r], unit="epochs", width=42))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + API_PREFIX + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
