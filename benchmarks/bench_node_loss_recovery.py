"""Benchmark (issue 4): recovery from a lost node.

A 3-node local Ray cluster (ray.cluster_utils: each node its own raylet) and a
raybatch server. The PyTorch recipe runs on 2 nodes, checkpointing every epoch;
once a few epochs are done, one node holding a rank is removed (its raylet and
every process on it die). Printed per run and as medians:

- detection: node removed -> attempt 1 ended (NODE_LOST);
- recovery: node removed -> every rank of attempt 2 running again, on the
  remaining nodes (no new machine to provision: the spare node is already up);
- work lost: node removed -> the last checkpoint before it (the checkpoint file's
  mtime), next to the checkpoint interval (one epoch) it should not exceed.

``--path eviction`` compares a spot eviction with notice to the loss above: the node is
drained for preemption (``GcsClient.drain_node(DRAIN_NODE_REASON_PREEMPTION, deadline =
notice + 30 s)``, what ``raybatch spot-watch`` does on an Azure Preempt event); the server
SIGTERMs the gang at once, the recipe finishes its epoch, checkpoints and exits, and the
node is removed after the ranks stopped (the cloud takes the VM). Printed per path:

- back to RUNNING: notice (or loss) -> every rank of attempt 2 running;
- work lost: the training time not in a checkpoint when the ranks stopped (with notice:
  the partial epoch is finished and saved, so 0), and the epochs attempt 2 redid.

    python benchmarks/bench_node_loss_recovery.py [--runs 3] [--path loss|eviction]
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, figure

from raybatch import Client
from raybatch.config import API_PREFIX, ray_client_env

RECIPE = ROOT / "recipes" / "pytorch-digits-ddp"
EPOCH_SLEEP = 1.0  # seconds added to each epoch, so the checkpoint interval is well defined


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_node(cluster):
    return cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20,
                            dashboard_agent_listen_port=free_port())


def wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.05)
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


def one_run(client: Client, cluster, rng: random.Random) -> dict[str, float]:
    job, ckpt, victim = start_and_pick(client, cluster, rng)
    t_kill = time.time()
    last_ckpt = ckpt.stat().st_mtime
    cluster.remove_node(victim)
    d = wait(lambda: (lambda j: j if len(j.attempts) == 2 and j.attempts[1].running_at else None)(
        client.get(job.id)), 120, "attempt 2 running")
    done = client.wait(job.id, timeout=180)
    assert done.state == "SUCCEEDED", done.reason
    add_node(cluster)  # spare for the next run
    return {
        "detection": d.attempts[0].ended_at - t_kill,
        "recovery": d.attempts[1].running_at - t_kill,
        "work_lost": t_kill - last_ckpt,
        "redone": redone_epochs(client, job.id),
    }


NOTICE_S = 30.0  # Azure gives a Spot VM at least 30 s between the Preempt event and the eviction


def eviction_run(client: Client, cluster, rng: random.Random, notice: bool) -> dict[str, float]:
    """One eviction of a node holding a rank: with notice (drained for preemption, then
    removed once the ranks stopped), or without (removed at once)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    job, ckpt, victim = start_and_pick(client, cluster, rng)
    t0 = time.time()
    if notice:
        gcs = GcsClient(address=cluster.address)
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
    add_node(cluster)  # spare for the next run
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
    args = ap.parse_args()
    ray_client_env()
    from ray.cluster_utils import Cluster

    dash = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": dash, "dashboard_host": "127.0.0.1",
        "object_store_memory": 100 * 2**20, "dashboard_agent_listen_port": free_port()})
    for _ in range(2):
        add_node(cluster)
    cluster.wait_for_nodes()
    state = Path(tempfile.mkdtemp(prefix="raybatch-bench-"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "raybatch.server", "--state-dir", str(state), "--ray-address", cluster.address,
         "--dashboard-url", f"http://127.0.0.1:{dash}", "--port", str(port)],
        stdout=open(state / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(lambda: _healthy(url), 60, "server")
        client = Client(url, (state / "token").read_text().strip())
        rng = random.Random(7)
        if args.path == "eviction":
            report_evictions(client, cluster, rng, args.runs)
            return
        results = [one_run(client, cluster, rng) for _ in range(args.runs)]
        interval = EPOCH_SLEEP  # plus ~0.1 s of training per epoch
        print(f"node loss during the PyTorch recipe (2 of 3 local nodes), {args.runs} runs")
        for key, label in (("detection", "node removed -> attempt ended (NODE_LOST)"),
                           ("recovery", "node removed -> all ranks running again"),
                           ("work_lost", "work lost (since the last checkpoint)")):
            print(figure(label, [r[key] for r in results], width=42))
        print(f"  recovery target <= 10 s; work lost target <= one checkpoint interval "
              f"(~{interval + 0.1:.1f} s here)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        cluster.shutdown()


def report_evictions(client: Client, cluster, rng: random.Random, runs: int) -> None:
    results = {notice: [] for notice in (True, False)}
    for _ in range(runs):
        for notice in (True, False):
            results[notice].append(eviction_run(client, cluster, rng, notice))
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
