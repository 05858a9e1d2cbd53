"""Spot evictions without Ray: how an EVICTED attempt moves its job and which budget it
draws on; which gangs the scheduler evicts for draining nodes; the autoscaler demand's
preference for dedicated nodes and its back-off after a failed spot launch; the
autoscaler's launch failures read from its recorded status; the spot watcher's reading of
Azure Scheduled Events. The end-to-end runs are in test_evictions_e2e.py."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from email.utils import formatdate

import pytest
from ray.autoscaler._private.autoscaler import AutoscalerSummary
from ray.autoscaler._private.node_provider_availability_tracker import (
    NodeAvailabilityRecord, NodeAvailabilitySummary, UnavailableNodeInformation,
)

from raybatch.cluster import spot_watch as sw
from raybatch.runtime.protocol import Control, Outcome, SlotGrant
from raybatch.runtime.slots import reruns_free
from raybatch.runtime.watch import lost_outcome
from raybatch.scheduler import evictions as ev
from raybatch.scheduler.autoscale import SPOT_BACKOFF_S, Demand, NodeTypes
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.launches import LaunchFailure, from_cluster_status, launch_failures, parse_status
from raybatch.scheduler.loop import Scheduler
from raybatch.scheduler.policy import job_from_spec
from raybatch.spec.job import JobSpec
from raybatch.state.states import AttemptOutcome
from raybatch.state.store import Store
from tests.test_scheduler_loop import FakeCluster, FakeLauncher, submit


# ---- outcomes, budgets ---------------------------------------------------------------

class DrainingCluster(FakeCluster):
    """FakeCluster plus what a RayClusterView tells of drains and deaths."""

    def __init__(self, n):
        super().__init__(n)
        self.drains: dict[str, float | None] = {}
        self.deaths: dict[str, str] = {}

    def draining(self):
        return dict(self.drains)

    def death_reasons(self, node_ids):
        return {n: r for n, r in self.deaths.items() if n in node_ids}


class EvictingLauncher(FakeLauncher):
    def __init__(self):
        super().__init__()
        self.evicts: list[tuple] = []

    def request_stop(self, job_id, attempt, action, reason="", deadline=None):
        super().request_stop(job_id, attempt, action, reason)
        if action == "evict":
            self.evicts.append((job_id, attempt, reason, deadline))

    def revoke_slot(self, job_id, attempt, slot, reason, preempt, evict_by=None):
        super().revoke_slot(job_id, attempt, slot, reason, preempt)
        if evict_by is not None:
            self.evicts.append((job_id, attempt, slot, reason, evict_by))


def make(tmp_path, nodes=2):
    store, launcher, cluster = Store(tmp_path / "db.sqlite"), EvictingLauncher(), DrainingCluster(nodes)
    return store, launcher, cluster, Scheduler(store, launcher, cluster)


def _done(launcher, job_id, n, outcome, message="", lost=()):
    launcher.reports[(job_id, n)] = {"phase": "done", "at": time.time(), "outcome": outcome, "message": message,
                                     "lost_nodes": list(lost), "ranks": []}


def _running(store, launcher, sched, job_id, n=1):
    sched.cycle()
    launcher.reports[(job_id, n)] = {"phase": "running", "at": time.time() - 5,
                                     "ranks": [{"rank": 0, "node_rank": 0, "local_rank": 0, "node_id": "node0"}]}
    sched.cycle()
    assert store.get_job(job_id)["state"] == "RUNNING"


def test_an_evicted_attempt_is_requeued_at_its_place_on_its_own_budget(tmp_path):
    store, launcher, _, sched = make(tmp_path, nodes=1)
    job = submit(store, retries={"infrastructure": 0, "evictions": 2})
    for n in (1, 2):
        _running(store, launcher, sched, job["id"], n)
        _done(launcher, job["id"], n, "EVICTED", "evicted: spot node node0 is being taken back")
        sched.cycle()
        row = store.get_job(job["id"])
        assert row["evictions"] == n and row["infra_retries"] == 0 and row["preemptions"] == 0
        assert row["seq"] == job["seq"]  # its place in the queue
    states = [t["to_state"] for t in store.transitions(job["id"])]
    assert states[3:5] == ["PREEMPTED", "QUEUED"]
    assert "requeued after eviction 2 of 2" in store.transitions(job["id"])[-1]["reason"] or \
        store.get_job(job["id"])["state"] in ("QUEUED", "STARTING")
    # the third eviction is one too many
    _running(store, launcher, sched, job["id"], 3)
    _done(launcher, job["id"], 3, "EVICTED", "evicted")
    sched.cycle()
    row = store.get_job(job["id"])
    assert row["state"] == "FAILED" and row["evictions"] == 3
    assert "retries.evictions is 2" in row["reason"] and "EVICTED" in row["reason"]


def test_evictions_are_unlimited_by_default_and_node_loss_stays_infrastructure(tmp_path):
    store, launcher, _, sched = make(tmp_path, nodes=1)
    assert JobSpec.model_validate({"name": "j", "command": "x"}).retries.evictions is None
    job = submit(store, retries={"infrastructure": 1})
    for n in range(1, 6):
        _running(store, launcher, sched, job["id"], n)
        _done(launcher, job["id"], n, "EVICTED", "evicted")
        sched.cycle()
    assert store.get_job(job["id"])["evictions"] == 5
    _running(store, launcher, sched, job["id"], 6)
    _done(launcher, job["id"], 6, "NODE_LOST", "rank 0 was lost", lost=["nodeX"])
    sched.cycle()
    row = store.get_job(job["id"])
    assert row["infra_retries"] == 1 and row["evictions"] == 5 and row["state"] in ("QUEUED", "STARTING")
    assert [t["to_state"] for t in store.transitions(job["id"])][-2] in ("RESTARTING", "QUEUED")


def test_a_node_lost_after_a_drain_for_preemption_is_an_eviction(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, nodes=1)
    a = submit(store)
    _running(store, launcher, sched, a["id"])
    cluster.deaths["nodeP"] = ev.PREEMPTED_DEATH
    _done(launcher, a["id"], 1, "NODE_LOST", "rank 0 was lost (node nodeP)", lost=["nodeP"])
    sched.cycle()
    att = store.get_attempt(a["id"], 1)
    assert att["outcome"] == "EVICTED" and "AUTOSCALER_DRAIN_PREEMPTED" in att["reason"]
    assert store.get_job(a["id"])["infra_retries"] == 0
    # a node that died otherwise: NODE_LOST
    store, launcher, cluster, sched = make(tmp_path / "b", nodes=1)
    b = submit(store)
    cluster.deaths["nodeU"] = "UNEXPECTED_TERMINATION"
    _running(store, launcher, sched, b["id"])
    _done(launcher, b["id"], 1, "NODE_LOST", "rank 0 was lost (node nodeU)", lost=["nodeU"])
    sched.cycle()
    assert store.get_attempt(b["id"], 1)["outcome"] == "NODE_LOST"
    assert store.get_job(b["id"])["infra_retries"] == 1


def test_draining_nodes_evict_the_gangs_on_them_once(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, nodes=2)
    job = submit(store, grace_period=40)
    _running(store, launcher, sched, job["id"])
    node = store.get_attempt(job["id"], 1)["nodes"][0]
    deadline = time.time() + 25
    cluster.drains = {"elsewhere": None}
    sched.cycle()
    assert launcher.evicts == []
    cluster.drains = {node: deadline}
    sched.cycle()
    sched.cycle()
    assert len(launcher.evicts) == 1
    job_id, n, reason, sent_deadline = launcher.evicts[0]
    assert (job_id, n, sent_deadline) == (job["id"], 1, deadline)
    assert f"spot node {node[:12]} is being taken back" in reason and "goes in 2" in reason
    assert ("evict" in {s[2] for s in launcher.stops})


class FlakyLauncher(EvictingLauncher):
    """Its next ``fail`` evictions raise (the driver's control file cannot be written)."""

    def __init__(self, fail=1):
        super().__init__()
        self.fail = fail

    def request_stop(self, job_id, attempt, action, reason="", deadline=None):
        if action == "evict" and self.fail:
            self.fail -= 1
            raise OSError(f"control file of {job_id}: No space left on device")
        super().request_stop(job_id, attempt, action, reason, deadline)

    def revoke_slot(self, job_id, attempt, slot, reason, preempt, evict_by=None):
        if evict_by is not None and self.fail:
            self.fail -= 1
            raise OSError(f"control file of {job_id}: No space left on device")
        super().revoke_slot(job_id, attempt, slot, reason, preempt, evict_by)


def test_a_failed_eviction_keeps_neither_the_others_nor_itself_from_being_made(tmp_path):
    store, cluster = Store(tmp_path / "db.sqlite"), DrainingCluster(2)
    launcher = FlakyLauncher(fail=1)
    sched = Scheduler(store, launcher, cluster)
    a, b = submit(store, name="a"), submit(store, name="b")
    sched.cycle()
    for job in (a, b):
        node = store.get_attempt(job["id"], 1)["nodes"][0]
        launcher.reports[(job["id"], 1)] = {"phase": "running", "at": time.time() - 5, "ranks": [
            {"rank": 0, "node_rank": 0, "local_rank": 0, "node_id": node}]}
    sched.cycle()
    assert {store.get_job(j["id"])["state"] for j in (a, b)} == {"RUNNING"}
    cluster.drains = {"node0": None, "node1": None}
    sched.cycle()  # the first eviction fails: the second is still made, the cycle goes on
    assert len(launcher.evicts) == 1
    first_failed = ({a["id"], b["id"]} - {launcher.evicts[0][0]}).pop()
    assert "No space left on device" in sched.evictions.error and first_failed in sched.evictions.error
    assert "cycle hook Evictions: evicting failed" in sched.hooks_error()
    sched.cycle()  # and the failed one is made next cycle, the other not twice
    assert sorted(e[0] for e in launcher.evicts) == sorted([a["id"], b["id"]])
    sched.cycle()
    assert len(launcher.evicts) == 2 and sched.evictions.error is None and sched.hooks_error() is None


def test_a_slot_whose_revocation_failed_reaches_the_driver_next_cycle(tmp_path):
    store, cluster = Store(tmp_path / "db.sqlite"), DrainingCluster(2)
    launcher = FlakyLauncher(fail=1)
    sched = Scheduler(store, launcher, cluster)
    job = submit(store, array={"count": 4, "max_concurrent": 2})
    sched.cycle()
    slots = store.slots(job["id"], 1, live=True)
    launcher.reports[(job["id"], 1)] = {"phase": "running", "at": time.time(), "ranks": [],
                                        "slots": [{"slot": s["slot"], "nodes": s["nodes"], "state": "busy",
                                                   "placed_at": time.time() - 10} for s in slots]}
    sched.cycle()
    cluster.drains = {slots[0]["nodes"][0]: None}
    launcher.synced.clear()
    sched.cycle()  # the store has the slot revoked; the control file could not be written
    assert launcher.evicts == [] and "No space left on device" in sched.evictions.error
    sched.cycle()  # the loop's slot sync writes what the store says
    assert any((j, n) == (job["id"], 1) and (slots[0]["slot"], "revoked", "eviction") in rows
               for j, n, rows in launcher.synced)


def test_decide_and_gangs_of():
    spec = JobSpec.model_validate({"name": "a", "command": "x", "grace_period": 30,
                                   "array": {"count": 4, "max_concurrent": 2}})
    plain = JobSpec.model_validate({"name": "p", "command": "x", "nodes": 2})
    specs = {"arr": spec, "job": plain, "stopping": plain}
    active = [
        {"id": "job", "attempt": 1, "_attempt": {"nodes": ["n1", "n2"]}},
        {"id": "arr", "attempt": 3, "_slots": [{"slot": 0, "nodes": ["n2"], "state": "granted", "preempted_by": None},
                                               {"slot": 1, "nodes": ["n3"], "state": "granted", "preempted_by": None},
                                               {"slot": 2, "nodes": ["n2"], "state": "revoked",
                                                "preempted_by": "rb-high"}]},
        {"id": "stopping", "attempt": 1, "cancel_requested": 1.0, "_attempt": {"nodes": ["n2"]}},
    ]
    gangs = ev.gangs_of(active, lambda j: specs[j["id"]])
    assert [(g.job_id, g.slot) for g in gangs] == [("job", None), ("arr", 0), ("arr", 1)]
    out = ev.decide(gangs, {"n2": 100.0}, set())
    assert [(e.gang.job_id, e.gang.slot, e.node, e.deadline) for e in out] == [("job", None, "n2", 100.0),
                                                                                ("arr", 0, "n2", 100.0)]
    assert ev.decide(gangs, {"n2": 100.0, "n1": 90.0}, {e.key for e in out}) == []


def test_slots_on_a_draining_node_are_revoked_and_their_task_reruns_free(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, nodes=2)
    job = submit(store, array={"count": 4, "max_concurrent": 2}, grace_period=20)
    sched.cycle()
    slots = store.slots(job["id"], 1, live=True)
    assert slots
    node = slots[0]["nodes"][0]
    launcher.reports[(job["id"], 1)] = {"phase": "running", "at": time.time(), "ranks": [],
                                        "slots": [{"slot": s["slot"], "nodes": s["nodes"], "state": "busy",
                                                   "placed_at": time.time() - 10} for s in slots]}
    sched.cycle()
    cluster.drains = {node: None}
    before = time.time()
    sched.cycle()
    evicted = [e for e in launcher.evicts if len(e) == 5]
    assert [(e[0], e[2]) for e in evicted] == [(job["id"], slots[0]["slot"])]
    assert before + 20 - 1 <= evicted[0][4] <= time.time() + 20  # no deadline: the grace period
    row = next(s for s in store.slots(job["id"], 1) if s["slot"] == slots[0]["slot"])
    assert row["state"] == "revoked" and row["preempted_by"] == "eviction"
    # the slot's task: EVICTED, rerun free, whatever the infrastructure budget
    assert reruns_free(Outcome(AttemptOutcome.EVICTED), infra_reruns=5, budget=0)
    assert not reruns_free(Outcome(AttemptOutcome.NODE_LOST), infra_reruns=5, budget=0)


# ---- the driver's side ----------------------------------------------------------------

def test_evict_control_and_grace():
    c = Control(action="evict", reason="evicted: spot node n1", deadline=time.time() + 12)
    stop = Control.model_validate_json(c.model_dump_json()).requested_stop()
    assert stop.kind is AttemptOutcome.EVICTED and stop.message == "evicted: spot node n1"
    assert 11 <= stop.grace(30) <= 12
    assert stop.grace(5) == 5
    assert Outcome(AttemptOutcome.EVICTED, deadline=time.time() - 3).grace(30) == 0
    assert Control(action="preempt").requested_stop().grace(30) == 30
    g = SlotGrant(nodes=["n"], state="revoked", preempt=True, evict_by=5.0)
    assert SlotGrant.model_validate_json(g.model_dump_json()).evict_by == 5.0


def test_a_rank_lost_to_a_preempted_node_is_evicted():
    class Died(Exception):
        def __init__(self, preempted):
            self.preempted = preempted

    assert lost_outcome(Died(True), "rank 1", "abcdef0123456789").kind is AttemptOutcome.EVICTED
    lost = lost_outcome(Died(False), "rank 1", "abcdef0123456789")
    assert lost.kind is AttemptOutcome.NODE_LOST and "abcdef012345" in lost.message


def test_every_outcome_has_a_way_out_of_the_loop(tmp_path):
    """Each AttemptOutcome ends the attempt and leaves the job in a state the store accepts."""
    for outcome in AttemptOutcome:
        store, launcher, _, sched = make(tmp_path / outcome.value, nodes=1)
        job = submit(store)
        _running(store, launcher, sched, job["id"])
        _done(launcher, job["id"], 1, outcome.value, "because")
        sched.cycle()
        att = store.get_attempt(job["id"], 1)
        assert att["outcome"] == outcome.value and att["ended_at"], outcome
        assert store.get_job(job["id"])["state"] != "RUNNING", outcome


# ---- autoscaling demand ------------------------------------------------------------------

CONFIG = {"available_node_types": {
    "head": {"resources": {"CPU": 0}, "max_workers": 0},
    "ded": {"resources": {"CPU": 2, "rb_type_ded": 1}, "max_workers": 2},
    "spot": {"resources": {"CPU": 2, "rb_type_spot": 1, "raybatch_low_priority": 1},
             "labels": {"raybatch.io/low-priority": "true"}, "max_workers": 4},
}, "head_node_type": "head"}


def _job(**fields):
    spec = JobSpec.model_validate({"name": "j", "command": "x", "resources": {"cpus": 2}, **fields})
    return job_from_spec(fields.get("name", "j"), 1, spec)


def _demand(failures=None):
    sent = []
    d = Demand(NodeTypes.from_config(CONFIG), send=sent.append, failures=failures)
    return d, sent


def test_allow_jobs_get_dedicated_nodes_unless_they_prefer_spot():
    d, _ = _demand()
    assert d.plan([], [_job()]) == ({"ded": 1}, ["j"])
    assert d.plan([], [_job(prefer_low_priority=True)]) == ({"spot": 1}, ["j"])
    assert d.plan([], [_job(low_priority_nodes="require")])[0] == {"spot": 1}
    assert d.plan([], [_job(low_priority_nodes="avoid", prefer_low_priority=True)])[0] == {"ded": 1}
    # dedicated ones run out (max_workers 2): a gang that needs more goes to spot nodes only,
    # and the next jobs to spot when the dedicated ones are taken
    assert d.plan([], [_job(name="a", nodes=3)])[0] == {"spot": 3}
    assert d.plan([], [_job(name="a"), _job(name="b"), _job(name="c")])[0] == {"ded": 2, "spot": 1}
    # a live idle spot node is used before anything new is added
    live = [NodeView("s1", total={"CPU": 2, "raybatch_low_priority": 1}, available={"CPU": 2, "raybatch_low_priority": 1},
                     labels={"raybatch.io/low-priority": "true"}, node_type="spot")]
    assert d.plan(live, [_job()]) == ({}, [])


def test_a_spot_type_is_skipped_for_ten_minutes_after_a_failed_launch():
    now = time.time()
    failures = [LaunchFailure("spot", now - 60, "OperationNotAllowed", "Operation could not be completed as it "
                              "results in exceeding approved LowPriorityCores quota"),
                LaunchFailure("ded", now - 30, "SkuNotAvailable", "no capacity")]
    d, _ = _demand(lambda: failures)
    assert d.plan([], [_job(low_priority_nodes="require")]) == ({}, [])
    assert d.plan([], [_job(prefer_low_priority=True)])[0] == {"ded": 1}  # dedicated types are not backed off
    assert d.backed_off == {"spot": pytest.approx(now - 60 + SPOT_BACKOFF_S)}
    d.update([], [_job(low_priority_nodes="require")])
    assert "not planning spot type(s) after a failed launch: spot until" in d.info()["summary"]
    # ten minutes after the failure it is planned again
    d.refresh_backoff(now=now - 60 + SPOT_BACKOFF_S + 1)
    assert d.backed_off == {}
    old = [LaunchFailure("spot", now - SPOT_BACKOFF_S - 1, "OperationNotAllowed", "quota")]
    d, _ = _demand(lambda: old)
    assert d.plan([], [_job(low_priority_nodes="require")])[0] == {"spot": 1} and d.backed_off == {}


def test_prefer_low_priority_is_a_job_field():
    spec = JobSpec.model_validate({"name": "j", "command": "x", "prefer_low_priority": True})
    assert job_from_spec("j", 1, spec).prefer_low_priority is True
    with pytest.raises(ValueError, match="retries.evictions"):
        JobSpec.model_validate({"name": "j", "command": "x", "retries": {"evictions": -1}})


# ---- launch failures ----------------------------------------------------------------------

def _recorded_status() -> bytes:
    """What the v1 monitor writes to __autoscaling_status, built with Ray's own dataclasses."""
    summary = AutoscalerSummary(
        active_nodes={"ded": 1}, idle_nodes={}, pending_nodes=[], pending_launches={"spot": 1},
        failed_nodes=[("10.0.0.7", "spot")],
        node_availability_summary=NodeAvailabilitySummary({
            "spot": NodeAvailabilityRecord("spot", False, 1796054000, UnavailableNodeInformation(
                "OperationNotAllowed", "Operation could not be completed as it results in exceeding approved "
                "LowPriorityCores quota.")),
            "ded": NodeAvailabilityRecord("ded", True, 1796053000, None),
            "gpu": NodeAvailabilityRecord("gpu", False, 1796053500, UnavailableNodeInformation(
                "SkuNotAvailable", "The requested size is currently not available in location 'westeurope'.")),
        }))
    return json.dumps({"gcs_request_time": 0.001, "time": 1796054001.5, "monitor_pid": 7,
                       "autoscaler_report": asdict(summary), "load_metrics_report": {}}).encode()


def test_launch_failures_from_the_recorded_autoscaler_status():
    failures = parse_status(_recorded_status())
    assert failures == [
        LaunchFailure("gpu", 1796053500.0, "SkuNotAvailable",
                      "The requested size is currently not available in location 'westeurope'."),
        LaunchFailure("spot", 1796054000.0, "OperationNotAllowed",
                      "Operation could not be completed as it results in exceeding approved LowPriorityCores quota."),
    ]
    assert str(failures[0]).startswith("gpu: SkuNotAvailable: The requested size")
    assert parse_status(None) == [] and parse_status(b"{not json") == []
    assert parse_status(json.dumps({"time": 1, "load_metrics_report": {}})) == []

    class Gcs:
        def internal_kv_get(self, key, namespace, timeout=None):
            assert key == b"__autoscaling_status" and namespace is None
            assert timeout, "a GCS call without a timeout can hang the scheduler's cycle"
            return _recorded_status()

    assert [f.node_type for f in launch_failures(Gcs(), "127.0.0.1:1")] == ["gpu", "spot"]
    # the node records read the same report through the same reader
    from raybatch.scheduler import launches, nodes
    assert nodes.autoscaler_report is launches.autoscaler_report
    report = launches.autoscaler_report(Gcs())
    assert report["failed_nodes"] == [["10.0.0.7", "spot"]] and report["pending_launches"] == {"spot": 1}
    assert launches.failures_in(report) == failures


def test_launch_failures_of_the_v2_autoscaler():
    from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest

    status = ClusterStatus(failed_launches=[LaunchRequest("Standard_D4s_v5", "spot", 2, LaunchRequest.Status.FAILED,
                                                          100, 130, "QuotaExceeded")])
    assert from_cluster_status(status) == [LaunchFailure("spot", 130.0, "LaunchFailed", "QuotaExceeded")]


# ---- the spot watcher ---------------------------------------------------------------------

EVENTS = {"DocumentIncarnation": 3, "Events": [
    {"EventId": "A", "EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": ["VM-Spot-1"],
     "EventStatus": "Scheduled", "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT", "Description": "",
     "EventSource": "Platform", "DurationInSeconds": -1},
    {"EventId": "B", "EventType": "Reboot", "ResourceType": "VirtualMachine", "Resources": ["vm-spot-1"],
     "EventStatus": "Scheduled", "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"},
    {"EventId": "C", "EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": ["vm-other"],
     "EventStatus": "Scheduled", "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"},
]}


def test_scheduled_events_are_parsed_as_documented():
    incarnation, events = sw.parse_events(EVENTS)
    assert incarnation == 3 and [e.event_id for e in events] == ["A", "B", "C"]
    assert events[0].not_before == 1474309787.0 and events[0].names("vm-spot-1")
    assert not events[2].names("vm-spot-1")
    assert sw.parse_events({"DocumentIncarnation": 0, "Events": []}) == (0, [])
    assert sw.parse_not_before("") is None
    with pytest.raises(sw.WatchError, match="NotBefore 'tomorrow'"):
        sw.parse_not_before("tomorrow")


class FakeImds:
    def __init__(self, doc):
        self.doc = doc

    def events(self):
        return sw.parse_events(self.doc)


def test_the_watcher_drains_once_per_preempt_of_its_vm():
    drains, logs = [], []
    w = sw.SpotWatcher(FakeImds(EVENTS), lambda *a: drains.append(a) or (True, ""), "ab" * 28, "vm-spot-1",
                       log=logs.append)
    assert [e.event_id for e in w.poll(now=1474309700.0)] == ["A"]
    assert w.poll() == [] and w.poll() == []
    assert drains == [("ab" * 28, drains[0][1], 1474309787000)]
    assert "Preempt of vm-spot-1" in drains[0][1] and "not before 18:29:47 UTC" in drains[0][1]
    assert "87 s left" in logs[-1] and "drained Ray node abababababab" in logs[-1]
    # a started event has no NotBefore: it goes now; a refused drain is tried again
    started = {"Events": [{"EventId": "D", "EventType": "Preempt", "Resources": ["vm-spot-1"],
                           "EventStatus": "Started", "NotBefore": ""}]}
    answers = iter([(False, "the node is gone"), (True, "")])
    drains2 = []
    w2 = sw.SpotWatcher(FakeImds(started), lambda *a: drains2.append(a) or next(answers), "n", "vm-spot-1",
                        log=logs.append)
    assert w2.poll(now=100.0) == [] and "refused" in logs[-1]
    assert [e.event_id for e in w2.poll(now=101.0)] == ["D"] and drains2[-1][2] == 101000


def test_the_watcher_reads_imds_over_http_and_never_posts():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.command, self.path, self.headers.get("Metadata")))
            body = (b"vm-spot-1" if "compute/name" in self.path else json.dumps(
                {"DocumentIncarnation": 1, "Events": [dict(EVENTS["Events"][0],
                                                           NotBefore=formatdate(2e9, usegmt=True))]}).encode())
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        imds = sw.Imds(f"http://127.0.0.1:{srv.server_address[1]}")
        assert imds.vm_name() == "vm-spot-1"
        drains = []
        w = sw.SpotWatcher(imds, lambda *a: drains.append(a) or (True, ""), "n", imds.vm_name(), log=lambda m: None)
        stop = threading.Event()
        t = threading.Thread(target=w.run, args=(0.05, stop))
        t.start()
        time.sleep(0.5)
        stop.set()
        t.join(5)
    finally:
        srv.shutdown()
    assert [d[2] for d in drains] == [2_000_000_000_000]
    assert {m for m, _, _ in seen} == {"GET"} and {h for _, _, h in seen} == {"true"}
    assert any(p == sw.EVENTS_PATH for _, p, _ in seen) and any(p == sw.VM_NAME_PATH for _, p, _ in seen)


def test_own_node_id_is_the_one_live_node_at_this_address():
    import socket

    class Info:
        def __init__(self, state, address, hostname="elsewhere"):
            self.state, self.node_manager_address, self.node_manager_hostname = state, address, hostname

    class Id:
        def __init__(self, h):
            self.h = h

        def hex(self):
            return self.h

    class Gcs:
        def __init__(self, nodes):
            self.nodes = nodes

        def get_all_node_info(self, timeout=None):
            assert timeout, "a GCS call without a timeout can hang spot-watch"
            return self.nodes

    me = Gcs({Id("aa"): Info(0, "10.9.9.9", socket.gethostname()), Id("bb"): Info(0, "10.9.9.8"),
              Id("cc"): Info(1, "127.0.0.1")})
    assert sw.own_node_id(me, "10.9.9.8:6379") == "aa"
    two = Gcs({Id("aa"): Info(0, "127.0.0.1"), Id("bb"): Info(0, "127.0.0.1")})
    with pytest.raises(sw.WatchError, match="2 \\(aa, bb\\); pass --node-id"):
        sw.own_node_id(two, "127.0.0.1:6379")


def test_show_prints_the_evictions(tmp_path):
    from raybatch.cli import render
    from raybatch.models import JobDetail
    from tests.test_protocol import _server

    http, store, _, _ = _server(tmp_path)
    job = http.post("/api/v1/jobs", json={"spec": {"name": "j", "command": "true",
                                                   "retries": {"evictions": 4}}}).json()
    store.update_job(job["id"], evictions=2)
    shown = JobDetail.model_validate(http.get(f"/api/v1/jobs/{job['id']}").json())
    assert shown.evictions == 2 and shown.spec.retries.evictions == 4
    with render.console.capture() as out:
        render.show_job(shown)
    assert "evicted:     2 time(s) from spot nodes (retries.evictions 4)" in out.get()


# ---- reading the GCS -----------------------------------------------------------------------

class BoundedGcs:
    """A GcsClient whose every call must carry a timeout: one without can hang the
    scheduler's cycle for as long as the GCS does not answer."""

    A, B = "ab" * 28, "cd" * 28

    def __init__(self):
        self.calls: list[str] = []

    def _bounded(self, name, timeout):
        assert timeout and timeout > 0, f"{name} without a timeout"
        self.calls.append(name)

    def get_draining_nodes(self, timeout=None):
        self._bounded("get_draining_nodes", timeout)
        return {self.A: 1_700_000_030_000, self.B: 0}

    def get_all_node_info(self, timeout=None, **_):
        from ray.core.generated import gcs_pb2

        self._bounded("get_all_node_info", timeout)
        dead = gcs_pb2.GcsNodeInfo(node_id=bytes.fromhex(self.A), state=gcs_pb2.GcsNodeInfo.DEAD,
                                   node_manager_address="10.0.0.1", node_type_name="spot")
        dead.death_info.reason, dead.death_info.reason_message = 3, "spot eviction"
        alive = gcs_pb2.GcsNodeInfo(node_id=bytes.fromhex(self.B), state=gcs_pb2.GcsNodeInfo.ALIVE,
                                    node_manager_address="10.0.0.2", node_type_name="ded")

        class Id(str):
            def hex(self):
                return str(self)

        return {Id(self.A): dead, Id(self.B): alive}

    def get_cluster_resource_state(self, timeout_s=None):
        from ray.core.generated import autoscaler_pb2

        self._bounded("get_cluster_resource_state", timeout_s)
        reply = autoscaler_pb2.GetClusterResourceStateReply()
        n = reply.cluster_resource_state.node_states.add()
        n.node_id, n.status, n.ray_node_type_name, n.node_ip_address = bytes.fromhex(self.B), 1, "ded", "10.0.0.2"
        n.total_resources["CPU"], n.available_resources["CPU"] = 2, 1
        return reply.SerializeToString()

    def internal_kv_get(self, key, namespace=None, timeout=None):
        self._bounded("internal_kv_get", timeout)
        return _recorded_status()


def test_every_gcs_read_of_the_cycle_is_bounded(monkeypatch):
    from raybatch.scheduler import cluster as cluster_mod
    from raybatch.scheduler import nodes

    gcs = BoundedGcs()
    monkeypatch.setattr(cluster_mod, "gcs_client", lambda address: gcs)
    monkeypatch.setattr(nodes, "gcs_client", lambda address: gcs)
    view = cluster_mod.RayClusterView("127.0.0.1:1")
    assert view.draining() == {gcs.A: 1_700_000_030.0, gcs.B: None}
    assert view.death_reasons([gcs.A, gcs.B]) == {gcs.A: ev.PREEMPTED_DEATH}
    [node] = view.snapshot()
    assert (node.node_id, node.node_type, node.total, node.available) == (gcs.B, "ded", {"CPU": 2.0}, {"CPU": 1.0})
    # the node records read the same things the same way (one reader of each)
    read = nodes.gcs_reader("127.0.0.1:1")()
    assert read.draining == {gcs.A: 1_700_000_030_000, gcs.B: 0} and read.status == {gcs.B: 1}
    dead = next(i for i in read.infos if i["node_id"] == gcs.A)
    assert (dead["alive"], dead["death_reason"], dead["death_message"]) == (False, ev.PREEMPTED_DEATH, "spot eviction")
    assert read.report["failed_nodes"] == [["10.0.0.7", "spot"]]
    assert set(gcs.calls) == {"get_draining_nodes", "get_all_node_info", "get_cluster_resource_state",
                              "internal_kv_get"}


def test_death_reason_names_are_ray_s_own():
    from ray.core.generated import common_pb2

    from raybatch.scheduler.cluster import death_reason

    for name, number in common_pb2.NodeDeathInfo.Reason.items():
        assert death_reason(number) == name
    assert death_reason(3) == ev.PREEMPTED_DEATH and death_reason(99) == "UNSPECIFIED"


def test_one_place_makes_gcs_clients():
    """raybatch.scheduler.cluster.gcs_client sets raybatch's client environment first: a
    GcsClient made anywhere else could skip it."""
    from pathlib import Path

    import raybatch

    root = Path(raybatch.__file__).parent
    makers = sorted(str(f.relative_to(root)) for f in root.rglob("*.py") if "GcsClient(" in f.read_text())
    assert makers == ["scheduler/cluster.py"], makers
