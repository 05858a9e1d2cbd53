"""Spot evictions end to end, on ONE fake_multinode cluster (Ray's own v1 autoscaler; its
"nodes" are raylets on this machine) with a dedicated and a spot node type, and a real
raybatch server:

(a)+(c) a checkpointing job on a spot node; `raybatch spot-watch`, reading a loopback
        Instance Metadata Service that announces a Preempt of its VM, drains the node for
        preemption; the server SIGTERMs the job's rank at once, it checkpoints, the attempt
        ends EVICTED; the raylet is then SIGKILLed (the VM taken) and the job resumes from
        its checkpoint on a replacement spot node, its infrastructure budget untouched;
(b)     meanwhile a job on a dedicated node loses it without notice (SIGKILL of its
        raylet): NODE_LOST, on the infrastructure budget;
(d)     the spot type's max_workers set to 0 in the cluster config file (the autoscaler and
        the server reload it): a job that prefers spot nodes gets a dedicated one.

Nothing leaves loopback. Only pids this test's cluster started are signalled."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raybatch.config import ray_client_env
from raybatch.scheduler.cluster import RayClusterView
from raybatch.scheduler.launches import launch_failures
from tests.conftest import ServerProcess, wait_for
from tests.fake_autoscaling import LOW_PRIORITY_LABEL, kill_node, raylet_pid, spot_cloud

pytestmark = pytest.mark.timeout(240)

RAYBATCH = str(Path(sys.executable).with_name("raybatch"))
LOW = LOW_PRIORITY_LABEL
TYPES = {
    "ded": {"resources": {"CPU": 1, "rb_type_ded": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    "spot": {"resources": {"CPU": 1, "rb_type_spot": 1, "raybatch_low_priority": 1}, "labels": LOW,
             "node_config": {}, "min_workers": 0, "max_workers": 2},
    # a spot type the cloud has no capacity for (tests/fake_cloud_provider.py)
    "spotx": {"resources": {"CPU": 1, "rb_type_spotx": 1, "raybatch_low_priority": 1}, "labels": LOW,
              "node_config": {"fail_launch": "SkuNotAvailable"}, "min_workers": 0, "max_workers": 1},
}
# a lost raylet is noticed in ~3 s instead of ~30 s

CHECKPOINTING = r'''
import os, pathlib, signal, sys, time
ck = pathlib.Path(os.environ["RAYBATCH_CHECKPOINT_DIR"]) / "step.txt"
step = int(ck.read_text()) if ck.exists() else 0
print(f"attempt {os.environ['RAYBATCH_ATTEMPT']} resumed from step {step}", flush=True)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.time()))
while step < int(sys.argv[1]):
    if stopping:
        ck.write_text(str(step))  # only on SIGTERM: a resumed step > 0 proves the notice came
        print(f"SIGTERM: checkpointed at step {step}", flush=True)
        sys.exit(143)
    time.sleep(0.1)
    step += 1
    if step % 20 == 0:
        print(f"step {step}", flush=True)
print(f"done at step {step}", flush=True)
'''


class Imds(ThreadingHTTPServer):
    """Azure's Instance Metadata Service as documented, on loopback: one Preempt event."""

    def __init__(self, vm_name: str):
        super().__init__(("127.0.0.1", 0), _ImdsHandler)
        self.vm_name, self.events, self.requests = vm_name, {"DocumentIncarnation": 1, "Events": []}, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def preempt(self, not_before: float) -> None:
        self.events = {"DocumentIncarnation": 2, "Events": [{
            "EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
            "ResourceType": "VirtualMachine", "Resources": [self.vm_name], "EventStatus": "Scheduled",
            "NotBefore": formatdate(not_before, usegmt=True), "Description": "",
            "EventSource": "Platform", "DurationInSeconds": -1}]}


class _ImdsHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv: Imds = self.server  # type: ignore[assignment]
        srv.requests.append(("GET", self.path, self.headers.get("Metadata")))
        if self.headers.get("Metadata") != "true":
            return self._send(400, b'{"error": "Bad request. Required metadata header not specified"}')
        if self.path.startswith("/metadata/scheduledevents?api-version=2020-07-01"):
            return self._send(200, json.dumps(srv.events).encode())
        if self.path.startswith("/metadata/instance/compute/name?"):
            return self._send(200, srv.vm_name.encode(), "text/plain")
        self._send(404, b"{}")

    def do_POST(self):  # noqa: N802 - acknowledging an event would hasten the eviction
        self.server.requests.append(("POST", self.path, self.headers.get("Metadata")))  # type: ignore[attr-defined]
        self._send(200, b"")

    def _send(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def spot_cluster():
    ray_client_env()
    c = spot_cloud(TYPES, idle_timeout_minutes=0.1, max_workers=4)  # dead raylets leave; "spotx" cannot launch
    yield c
    c.stop()


@pytest.fixture(scope="module")
def spot_server(spot_cluster, tmp_path_factory):
    s = ServerProcess(spot_cluster, tmp_path_factory.mktemp("spot-server"),
                      extra_args=("--cluster-config", spot_cluster.config_path)).start()
    yield s
    s.stop()




def _node_type(cluster, node_id: str) -> str | None:
    return next((n.ray_node_type_name for n in cluster.alive_nodes() if n.node_id.hex() == node_id), None)


def _job_row(server, job_id: str) -> dict:
    db = sqlite3.connect(f"file:{server.state_dir / 'raybatch.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
    finally:
        db.close()


def test_spot_evictions(spot_cluster, spot_server, tmp_path):
    from ray._raylet import GcsClient

    t0 = time.monotonic()
    client = spot_server.client()
    script = tmp_path / "ckpt.py"
    script.write_text(CHECKPOINTING)
    spot_job = client.submit({"name": "on-spot", "low_priority_nodes": "require", "grace_period": 20,
                              "resources": {"cpus": 1}, "command": f"{sys.executable} {script} 400"})
    ded_job = client.submit({"name": "on-dedicated", "low_priority_nodes": "avoid", "resources": {"cpus": 1},
                             "command": f"{sys.executable} {script} 150"})
    # a spot type that cannot launch: the autoscaler's record of it, and raybatch backs off
    no_room = client.submit({"name": "no-capacity", "resources": {"cpus": 1, "custom": {"rb_type_spotx": 1}},
                             "command": "true"})
    failures = wait_for(lambda: launch_failures(GcsClient(address=spot_cluster.address), spot_cluster.address),
                        60, "the failed spotx launch")
    assert [(f.node_type, f.category) for f in failures] == [("spotx", "SkuNotAvailable")]
    assert "no capacity" in failures[0].message and abs(failures[0].at - time.time()) < 60
    info = wait_for(lambda: (a := client.scheduler().autoscaler)["spot_backed_off"] and a, 15, "the back-off")
    assert set(info["spot_backed_off"]) == {"spotx"} and "spotx" not in info["to_add"]
    client.cancel(no_room.id)
    for j in (spot_job, ded_job):
        wait_for(lambda: "step 20" in client.logs(j.id), 90, f"{j.id} to run")
    spot_node = client.get(spot_job.id).attempts[0].ranks[0].node_id
    ded_node = client.get(ded_job.id).attempts[0].ranks[0].node_id
    assert _node_type(spot_cluster, spot_node) == "spot" and _node_type(spot_cluster, ded_node) == "ded"

    # (b) a dedicated node lost without notice: the whole VM at once (killing the raylet alone
    # left its worker alive for the seconds Ray takes to declare the node dead, and the
    # driver's stop of the attempt reached it: the rank got SIGTERM and checkpointed)
    kill_node(spot_cluster, ded_node)

    # (a)+(c) the watcher on the spot node sees Azure's notice and drains the node
    imds = Imds("vm-spot-0")
    watch_log = tmp_path / "spot-watch.log"
    with open(watch_log, "wb") as out:
        watcher = subprocess.Popen([RAYBATCH, "spot-watch", "--gcs-address", spot_cluster.address, "--imds-url",
                                    imds.url, "--poll-s", "0.3", "--node-id", spot_node],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(r[1].startswith("/metadata/scheduledevents") for r in imds.requests), 30,
                 "the watcher's first poll")
        assert raylet_pid(spot_cluster, spot_node) is not None  # nothing drained without an event
        notice_at = time.time()
        imds.preempt(not_before=notice_at + 30)
        wait_for(lambda: "drained Ray node" in watch_log.read_text(), 15, "the watcher to drain the node")
        evicted = wait_for(lambda: (d := client.get(spot_job.id)).attempts[0].outcome and d, 60,
                           "the evicted attempt to end")
        stopped_in = time.time() - notice_at
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(timeout=10)
    assert evicted.attempts[0].outcome == "EVICTED", evicted.attempts[0].reason
    assert "evicted" in evicted.attempts[0].reason and spot_node[:12] in evicted.attempts[0].reason
    assert stopped_in < 30, f"the gang stopped {stopped_in:.0f} s after the notice, after NotBefore"
    log1 = client.logs(spot_job.id, attempt=1)
    assert "SIGTERM: checkpointed at step" in log1, log1[-2000:]
    checkpointed = int(log1.rsplit("checkpointed at step ", 1)[1].split()[0])
    # the watcher: drained once, for this event, never acknowledged it
    assert watch_log.read_text().count("drained Ray node") == 1
    assert all(method == "GET" and header == "true" for method, _, header in imds.requests), imds.requests
    # the cloud takes the VM (the drained raylet may already have exited: idle after the drain)
    pid = raylet_pid(spot_cluster, spot_node)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)

    done = client.wait(spot_job.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    assert [a.outcome for a in done.attempts] == ["EVICTED", "SUCCEEDED"]
    assert [t.to_state.value for t in done.transitions] == [
        "QUEUED", "STARTING", "RUNNING", "PREEMPTED", "QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert "requeued after eviction 1" in done.transitions[4].reason
    assert done.evictions == 1 and done.preemptions == 0
    row = _job_row(spot_server, spot_job.id)
    assert row["infra_retries"] == 0 and row["evictions"] == 1
    log2 = client.logs(spot_job.id, attempt=2)
    assert f"attempt 2 resumed from step {checkpointed}" in log2 and checkpointed > 0, log2[:500]
    assert "done at step 400" in log2
    new_node = done.attempts[1].ranks[0].node_id
    assert new_node != spot_node

    lost = client.wait(ded_job.id, timeout=90)
    assert lost.state == "SUCCEEDED", lost.reason
    assert [a.outcome for a in lost.attempts] == ["NODE_LOST", "SUCCEEDED"], lost.attempts[0].reason
    assert "RESTARTING" in [t.to_state.value for t in lost.transitions] and lost.evictions == 0
    assert _job_row(spot_server, ded_job.id)["infra_retries"] == 1
    assert "resumed from step 0" in client.logs(ded_job.id, attempt=2)  # no notice: no checkpoint
    # what the GCS recorded of the two nodes' ends (read by the server to tell a loss with notice)
    reasons = RayClusterView(spot_cluster.address).death_reasons([ded_node, spot_node])
    assert reasons[ded_node] == "UNEXPECTED_TERMINATION"
    # the drained node exited once idle (AUTOSCALER_DRAIN_PREEMPTED), or was killed before that
    assert reasons[spot_node] in ("AUTOSCALER_DRAIN_PREEMPTED", "UNEXPECTED_TERMINATION")

    # (d) no spot nodes any more: a job that prefers them gets a dedicated one
    config = json.loads(Path(spot_cluster.config_path).read_text())
    config["available_node_types"]["spot"]["max_workers"] = 0
    tmp = Path(spot_cluster.config_path + ".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, spot_cluster.config_path)
    wait_for(lambda: not [n for n in spot_cluster.alive_nodes() if n.ray_node_type_name == "spot"], 60,
             "idle spot nodes to go")
    wait_for(lambda: client.scheduler().autoscaler["node_types"]["spot"]["max_workers"] == 0, 15,
             "the server to reload the cluster config")
    cheap = client.submit({"name": "prefers-spot", "prefer_low_priority": True, "resources": {"cpus": 1},
                           "command": "echo ok; sleep 3"})
    running = wait_for(lambda: (d := client.get(cheap.id)).state.value == "RUNNING" and d, 90, "RUNNING")
    assert _node_type(spot_cluster, running.attempts[0].ranks[0].node_id) == "ded"
    ran = client.wait(cheap.id, timeout=30)
    assert ran.state == "SUCCEEDED", ran.reason
    assert time.monotonic() - t0 < 180, f"eviction scenarios took {time.monotonic() - t0:.0f} s"
    client.close()
