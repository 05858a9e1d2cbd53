"""Node records (raybatch.scheduler.nodes): what the GCS and the autoscaler report turned
into one state per node, written to the store only on change; the cluster config the
server re-reads when it changes; the head's systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
import yaml

from raybatch.scheduler.nodes import GcsView, NodeRecorder, classify, cluster_status, node_infos, type_facts
from raybatch.state.store import Store

CONFIG = {"head_node_type": "head", "available_node_types": {
    "head": {"resources": {"CPU": 0}},
    "cpu2": {"resources": {"CPU": 2, "rb_type_cpu2": 1}, "node_config": {"azure_arm_parameters": {"vmSize": "Standard_D2s_v3"}}},
    "spot": {"resources": {"CPU": 2, "raybatch_low_priority": 1}, "labels": {"raybatch.io/low-priority": "true"}},
}}


def info(nid, alive=True, ntype="cpu2", ip="10.0.0.5", head=False, reason=None, message=None):
    return {"node_id": nid, "alive": alive, "node_type": ntype, "ip": ip, "head": head, "instance_type": None,
            "start_s": None, "end_s": time.time() if not alive else None, "death_reason": reason,
            "death_message": message}


class Feed:
    def __init__(self):
        self.view = GcsView()

    def __call__(self):
        return self.view


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "rb.db")
    yield s
    s.close()


def test_classify_states_and_reasons():
    view = GcsView(
        infos=[info("a"), info("b"), info("c"), info("d", alive=False, reason="AUTOSCALER_DRAIN_PREEMPTED",
                                                         message="spot eviction"),
               info("e", alive=False, reason="UNEXPECTED_TERMINATION"), info("f", alive=False, reason="AUTOSCALER_DRAIN_IDLE")],
        status={"a": 3, "b": 1, "c": 4}, draining={"c": 0},
        report={"pending_nodes": [["10.0.0.9", "cpu2", "setting-up"]], "failed_nodes": [["10.0.0.8", "spot"]]})
    got = {o.node_id: o for o in classify(view)}
    assert got["a"].state == "idle" and got["b"].state == "running"
    assert got["c"].state == "leaving" and got["c"].reason.startswith("DRAINING")
    assert got["d"].state == "preempted" and got["d"].end_reason == "AUTOSCALER_DRAIN_PREEMPTED: spot eviction"
    assert got["e"].state == "lost" and got["f"].state == "terminated"
    assert got["ip:10.0.0.9"].state == "preparing" and got["ip:10.0.0.9"].reason == "setting-up"
    assert got["ip:10.0.0.8"].state == "unusable" and got["ip:10.0.0.8"].reason == "update-failed"


def test_type_facts_vm_size_and_spot():
    facts = type_facts(CONFIG)
    assert facts["cpu2"] == ("Standard_D2s_v3", False) and facts["spot"] == (None, True)


def test_records_transitions_and_writes_only_on_change(store, monkeypatch):
    feed = Feed()
    rec = NodeRecorder(store, read=feed, config=lambda: CONFIG, read_every=0, touch_every=3600)
    writes = []
    real_put = store.put_node
    monkeypatch.setattr(store, "put_node", lambda nid, **f: (writes.append((nid, f)), real_put(nid, **f)))
    # set up under its address first, then it joins Ray: one record, first seen kept
    feed.view = GcsView(report={"pending_nodes": [["10.0.0.5", "cpu2", "setting-up"]]})
    rec()
    first = store.nodes()[0]
    assert first["node_id"] == "ip:10.0.0.5" and first["state"] == "preparing"
    feed.view = GcsView(infos=[info("n1"), info("h", ntype=None, ip="10.0.0.4", head=True)],
                        status={"n1": 3, "h": 3})
    rec()
    rows = {r["node_id"]: r for r in store.nodes()}
    assert set(rows) == {"n1", "h"}
    assert rows["n1"]["first_seen"] == first["first_seen"] and rows["n1"]["vm_size"] == "Standard_D2s_v3"
    assert rows["h"]["node_type"] == "head" and rows["h"]["head"] == 1
    n = len(writes)
    for _ in range(5):
        rec()
    assert len(writes) == n, "unchanged nodes must not be written"
    feed.view = GcsView(infos=[info("n1"), info("h", ip="10.0.0.4", head=True)], status={"n1": 1, "h": 3})
    rec()
    assert store.nodes()[1]["state"] == "running" if store.nodes()[1]["node_id"] == "n1" else True
    row = {r["node_id"]: r for r in store.nodes()}["n1"]
    assert row["state"] == "running" and row["state_since"] >= first["first_seen"]
    feed.view = GcsView(infos=[info("n1"), info("h", ip="10.0.0.4", head=True)], status={"n1": 4, "h": 3},
                        draining={"n1": int((time.time() + 60) * 1000)})
    rec()
    assert {r["node_id"]: r for r in store.nodes()}["n1"]["state"] == "leaving"
    feed.view = GcsView(infos=[info("n1", alive=False, reason="AUTOSCALER_DRAIN_PREEMPTED", message="evicted"),
                               info("h", ip="10.0.0.4", head=True)], status={"h": 3})
    rec()
    assert [r["node_id"] for r in store.nodes()] == ["h"]
    gone = {r["node_id"]: r for r in store.nodes(ended=True)}["n1"]
    assert gone["state"] == "preempted" and gone["end_reason"] == "AUTOSCALER_DRAIN_PREEMPTED: evicted"
    n = len(writes)
    rec()
    assert len(writes) == n, "an ended node is written once"
    # a node the GCS no longer knows is lost; a restarted recorder keeps what it knew
    feed.view = GcsView(infos=[], status={})
    rec()
    assert {r["node_id"]: r for r in store.nodes(ended=True)}["h"]["state"] == "lost"
    again = NodeRecorder(store, read=feed, config=lambda: CONFIG, read_every=0)
    again()
    assert len(store.nodes(ended=True)) == 2
    status = cluster_status(store, rec, None, [])
    assert status.counts["preempted"] == 1 and status.phase == "steady"


def test_last_seen_refreshed_at_most_every_touch_interval(store):
    feed = Feed()
    feed.view = GcsView(infos=[info("n1")], status={"n1": 3})
    rec = NodeRecorder(store, read=feed, read_every=0, touch_every=0.3)
    rec()
    t0 = store.nodes()[0]["last_seen"]
    rec()
    assert store.nodes()[0]["last_seen"] == t0
    time.sleep(0.35)
    rec()
    assert store.nodes()[0]["last_seen"] > t0


def test_jobs_shown_on_their_nodes(store):
    job = store.create_job(name="j", experiment="e", priority=0, spec={"name": "j", "command": "true"},
                           job_dir_for=lambda i: f"/tmp/{i}")
    from raybatch.state.states import JobState

    store.transition(job["id"], JobState.STARTING, "fits", attempt=1)
    store.add_attempt(job["id"], 1, "sid", nodes=["n1", "n2"])
    store.put_node("n1", state="running", state_since=1, first_seen=1, last_seen=1)
    store.put_node("n3", state="idle", state_since=1, first_seen=1, last_seen=1)
    infos = {n.node_id: n for n in node_infos(store)}
    assert infos["n1"].jobs == [job["id"]] and infos["n3"].jobs == []


def test_server_reloads_cluster_config_and_keeps_old_on_bad_file(tmp_path):
    from raybatch.scheduler.autoscale import Demand, NodeTypes
    from raybatch.server.main import ClusterConfigWatcher

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(CONFIG | {"available_node_types": {
        **CONFIG["available_node_types"], "cpu2": {"resources": {"CPU": 2}, "max_workers": 2}}}))
    demand = Demand(NodeTypes.from_cluster_yaml(path), send=lambda b: None)
    watch = ClusterConfigWatcher(path, demand)
    cfg = yaml.safe_load(path.read_text())
    cfg["available_node_types"]["cpu2"]["max_workers"] = 5
    path.write_text(yaml.safe_dump(cfg))
    import os

    os.utime(path, (time.time() + 2, time.time() + 2))
    watch()
    assert demand.types.types["cpu2"].max_workers == 5 and watch.error is None
    path.write_text("available_node_types: [not, a, mapping]\n")
    os.utime(path, (time.time() + 4, time.time() + 4))
    watch()
    assert demand.types.types["cpu2"].max_workers == 5 and "available_node_types" in watch.error


def test_head_unit_renders_and_verifies(tmp_path):
    from raybatch.cluster.systemd import render_unit

    unit = render_unit(state_dir="/mnt/raybatch-state", cluster_config="/home/u/ray_bootstrap_config.yaml",
                       user="root", home="/root", python="/usr/bin/python3")
    for line in ("Restart=always", "User=root", "WorkingDirectory=/root", "Environment=RAY_AUTH_MODE=token",
                 "ConditionPathIsMountPoint=/mnt/raybatch-state"):
        assert line in unit.splitlines()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    for part in ("--state-dir /mnt/raybatch-state", "--ray-address 127.0.0.1:6379",
                 "--cluster-config /home/u/ray_bootstrap_config.yaml", "--host 127.0.0.1"):
        assert part in exec_start
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here: the unit's text was checked, not verified by systemd")
    path = tmp_path / "raybatch-server.service"
    path.write_text(unit)
    p = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    # what verify may say about this machine rather than the unit (a container without a
    # running systemd, the host's own units); anything else is a problem
    harmless = (re.compile(r"^(/usr)?/lib/systemd/system/(?!raybatch)\S+:\d+: "),  # a host unit's own warning
                re.compile(r"Failed to (connect to|open) (system|user) (bus|scope)"),
                re.compile(r"^Unit \S+ not found\.$"))
    unexpected = [line for line in (p.stdout + p.stderr).splitlines()
                  if line.strip() and not any(h.search(line) for h in harmless)]
    assert p.returncode == 0 and not unexpected, p.stdout + p.stderr


def test_requeue_route_records_its_own_reason(store):
    """POST /nodes/requeue (`cluster scale --on-shrink requeue`): the job's preempted_by says
    why it goes back to the queue, not that a job with a higher priority took its place."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from raybatch.server.routes.nodes import REQUEUED_BY, router
    from raybatch.state.states import JobState

    job = store.create_job(name="j", experiment="e", priority=0, spec={"name": "j", "command": "true"},
                           job_dir_for=lambda i: f"/tmp/{i}")
    store.transition(job["id"], JobState.STARTING, "fits", attempt=1)
    store.add_attempt(job["id"], 1, "sid", nodes=["n1"])
    store.put_node("n1", node_type="cpu2", state="running", state_since=1, first_seen=1, last_seen=1)
    woken = []
    ctx = SimpleNamespace(store=store, scheduler=SimpleNamespace(
        spec_of=lambda j: SimpleNamespace(slots=None), wake=lambda: woken.append(1), cycle_hooks=[]))
    app = FastAPI()
    app.include_router(router(ctx))
    with TestClient(app) as client:
        r = client.post("/nodes/requeue", json={"node_ids": ["n1", "n9"]})
    assert r.status_code == 200 and r.json() == [job["id"]] and woken
    row = store.get_job(job["id"])
    assert row["preempt_requested"]
    assert row["preempted_by"] == "requeued by `raybatch cluster scale`: its node is beyond the new max of cpu2"
    assert row["preempted_by"].startswith(REQUEUED_BY)
    from raybatch.state.states import preempted_words
    assert preempted_words(row["preempted_by"]) == row["preempted_by"]  # the reason the job's history shows
    assert preempted_words("rb-1") == "preempted by rb-1, which has a higher priority"
