"""The scheduler loop's bookkeeping, driven without Ray: the launcher and the cluster
view are replaced by in-memory fakes so that failures Ray will not produce on demand
(the dashboard refusing a submission, a driver report arriving) can be injected.
Everything that runs for real is covered by the end-to-end tests."""

from __future__ import annotations

import time

from raybatch.runtime.launcher import RayJobState
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.loop import Scheduler
from raybatch.spec.job import JobSpec
from raybatch.state.store import Store


class FakeLauncher:
    def __init__(self):
        self.fail_next = 0
        self.submitted: list[tuple[str, int, tuple]] = []
        self.reports: dict[tuple[str, int], dict] = {}
        self.stops: list[tuple[str, int, str]] = []
        self.grants: list[tuple] = []
        self.revokes: list[tuple] = []
        self.synced: list[tuple] = []
        self.submit_kw: list[dict] = []

    def submit(self, job, attempt, nodes=None, **kw):
        self.submit_kw.append(kw)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("No available agent to submit job")
        self.submitted.append((job["id"], attempt, tuple(nodes or ())))
        return f"raybatch-{job['id']}-{attempt}"

    def report(self, job_id, attempt):
        return self.reports.get((job_id, attempt))

    def state(self, sid):
        return RayJobState("RUNNING", False)

    def request_stop(self, job_id, attempt, action, reason=""):
        self.stops.append((job_id, attempt, action))

    # array jobs' slots
    def grant_slot(self, job_id, attempt, slot, nodes):
        self.grants.append((job_id, attempt, slot, tuple(nodes)))

    def revoke_slot(self, job_id, attempt, slot, reason, preempt):
        self.revokes.append((job_id, attempt, slot, preempt, reason))

    def sync_slots(self, job_id, attempt, rows):
        self.synced.append((job_id, attempt, [(r["slot"], r["state"], r["preempted_by"]) for r in rows]))

    def stop(self, sid):
        pass


class FakeCluster:
    def __init__(self, n: int):
        self.nodes = [NodeView(f"node{i}", available={"CPU": 1.0}, total={"CPU": 1.0}) for i in range(n)]

    def snapshot(self):
        return [n.copy() for n in self.nodes]


def make(tmp_path, nodes=2):
    store = Store(tmp_path / "db.sqlite")
    launcher = FakeLauncher()
    return store, launcher, Scheduler(store, launcher, FakeCluster(nodes))


def submit(store, **fields):
    spec = JobSpec.model_validate({"name": "j", "command": "true", **fields})
    return store.create_job(name=spec.name, experiment=spec.experiment, priority=spec.priority_value,
                            spec=spec.model_dump(mode="json"), job_dir_for=lambda i: f"/tmp/{i}")


def test_failed_submission_requeues_without_charge_and_backs_off(tmp_path):
    store, launcher, sched = make(tmp_path)
    job = submit(store)
    launcher.fail_next = 1
    sched.cycle()
    row = store.get_job(job["id"])
    assert row["state"] == "QUEUED" and row["infra_retries"] == 0 and row["user_retries"] == 0
    assert store.attempts(job["id"])[0]["outcome"] == "START_FAILED"
    assert "No available agent" in store.attempts(job["id"])[0]["reason"]
    sched.cycle()  # within the back-off: nothing is submitted
    assert launcher.submitted == []
    assert "retrying in" in sched.waiting[job["id"]]
    sched._submit_retry_at = time.monotonic()  # the back-off has passed
    sched.cycle()
    assert launcher.submitted == [(job["id"], 2, ("node0",))]
    assert store.get_job(job["id"])["state"] == "STARTING"
    assert store.get_attempt(job["id"], 2)["nodes"] == ["node0"]


def test_node_lost_report_requeues_and_next_attempt_avoids_the_node(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=3)
    job = submit(store, nodes=2)
    sched.cycle()
    ranks = [{"rank": r, "node_rank": r, "local_rank": 0, "node_id": f"node{r}"} for r in (0, 1)]
    launcher.reports[(job["id"], 1)] = {"phase": "running", "at": time.time(), "ranks": ranks}
    sched.cycle()
    assert store.get_job(job["id"])["state"] == "RUNNING"
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": "NODE_LOST", "exit_code": None,
                                        "message": "rank 1 was lost", "ranks": ranks,
                                        "lost_nodes": ["node1"]}
    sched.cycle()
    row = store.get_job(job["id"])
    assert row["infra_retries"] == 1
    assert launcher.submitted[-1] == (job["id"], 2, ("node0", "node2"))  # not node1
    states = [t["to_state"] for t in store.transitions(job["id"])]
    assert states == ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "QUEUED", "STARTING"]


def test_avoided_node_is_used_when_the_gang_fits_nowhere_else(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=2)
    job = submit(store, nodes=2)
    sched.cycle()
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": "NODE_LOST", "message": "lost",
                                        "ranks": [], "lost_nodes": ["node1"]}
    sched.cycle()
    assert launcher.submitted[-1] == (job["id"], 2, ("node0", "node1"))  # rather run than wait forever


def test_cancel_of_a_running_job_asks_the_driver_once(tmp_path):
    store, launcher, sched = make(tmp_path)
    job = submit(store)
    sched.cycle()
    store.update_job(job["id"], cancel_requested=time.time())
    sched.cycle()
    sched.cycle()
    assert launcher.stops == [(job["id"], 1, "cancel")]
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": "CANCELLED", "message": "cancelled by user"}
    sched.cycle()
    assert store.get_job(job["id"])["state"] == "CANCELLED"


def _running(launcher, sched, store, job, nodes):
    """Report the job's gang as placed, and take its nodes off the fake cluster."""
    ranks = [{"rank": r, "node_rank": r, "local_rank": 0, "node_id": n} for r, n in enumerate(nodes)]
    launcher.reports[(job["id"], store.get_job(job["id"])["attempt"])] = {
        "phase": "running", "at": time.time(), "ranks": ranks}
    for n in sched.cluster.nodes:
        if n.node_id in nodes:
            n.available["CPU"] = 0.0
    sched.cycle()
    assert store.get_job(job["id"])["state"] == "RUNNING"


def test_preemption_stops_the_low_job_requeues_it_and_starts_the_high_one(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=2)
    low = submit(store, nodes=2, priority="low", grace_period="10s")
    sched.cycle()
    _running(launcher, sched, store, low, ["node0", "node1"])
    high = submit(store, nodes=2, priority="high")
    sched.cycle()
    row = store.get_job(low["id"])
    assert row["preempted_by"] == high["id"] and row["preempt_requested"]
    assert launcher.stops == [(low["id"], 1, "preempt")]
    assert "preempting " + low["id"] in sched.waiting[high["id"]]
    sched.cycle()
    assert launcher.stops == [(low["id"], 1, "preempt")]  # asked once
    launcher.reports[(low["id"], 1)] = {"phase": "done", "outcome": "PREEMPTED", "exit_code": None,
                                        "message": "preempted"}
    for n in sched.cluster.nodes:
        n.available["CPU"] = 1.0
    sched.cycle()
    row = store.get_job(low["id"])
    assert row["state"] == "QUEUED" and row["preemptions"] == 1 and row["preempt_requested"] is None
    assert row["infra_retries"] == 0 and row["user_retries"] == 0
    history = store.transitions(low["id"])
    assert [t["to_state"] for t in history][-2:] == ["PREEMPTED", "QUEUED"]
    assert f"preempted by {high['id']}" in history[-2]["reason"]
    assert store.get_job(high["id"])["state"] == "STARTING"
    assert "needs 2 nodes" in sched.waiting[low["id"]]


def _low_preempted_by_high(tmp_path):
    """One node: a low job running on it, then a high one that preempts it."""
    store, launcher, sched = make(tmp_path, nodes=1)
    low = submit(store, priority=100)
    sched.cycle()
    _running(launcher, sched, store, low, ["node0"])
    submit(store, priority=900)
    sched.cycle()
    return store, launcher, sched, low


def test_a_driver_that_dies_while_preempted_still_counts_as_preempted(tmp_path):
    store, launcher, sched, low = _low_preempted_by_high(tmp_path)
    launcher.state = lambda sid: RayJobState("STOPPED", True)  # killed, no report
    launcher.reports.pop((low["id"], 1))
    sched.cycle()
    row = store.get_job(low["id"])
    assert row["state"] == "QUEUED" and row["preemptions"] == 1 and row["infra_retries"] == 0


def test_cancel_wins_over_preemption(tmp_path):
    store, launcher, sched, low = _low_preempted_by_high(tmp_path)
    store.update_job(low["id"], cancel_requested=time.time())
    sched.cycle()
    assert launcher.stops == [(low["id"], 1, "preempt"), (low["id"], 1, "cancel")]
    launcher.reports[(low["id"], 1)] = {"phase": "done", "outcome": "PREEMPTED", "message": "x"}
    sched.cycle()
    assert store.get_job(low["id"])["state"] == "CANCELLED"


def test_policy_file_is_read_and_a_bad_one_keeps_the_last_good_policy(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=4)
    sched.policy_file = tmp_path / "policy.yaml"
    sched.policy_file.write_text("quotas: {vision: {max_nodes: 1}}\n")
    a = submit(store, experiment="vision")
    b = submit(store, experiment="vision")
    sched.cycle()
    assert store.get_job(a["id"])["state"] == "STARTING"
    assert "at its quota: 1 of 1 node(s)" in sched.waiting[b["id"]]
    import os
    sched.policy_file.write_text("quotas: {vision: {max_nodez: 1}}\n")
    os.utime(sched.policy_file, (time.time() + 5, time.time() + 5))
    sched.cycle()
    assert "quotas.vision.max_nodez: unknown field" in sched.policy_error
    assert sched.policy.quota("vision").max_nodes == 1


def test_the_incrementally_followed_queue_matches_a_full_read(tmp_path):
    from raybatch.state.states import JobState

    store, launcher, sched = make(tmp_path, nodes=0)  # nothing fits: everything stays queued
    jobs = [submit(store, priority=p) for p in (500, 250, 750, 500)]
    sched.cycle()
    store.transition(jobs[0]["id"], JobState.CANCELLED, "cancelled by user while queued")
    jobs += [submit(store, priority=p, experiment=e) for p, e in ((500, "b"), (900, "a"), (250, "b"))]
    sched.cycle()
    followed = list(sched.waiting)
    assert jobs[0]["id"] not in followed and len(followed) == 6
    sched.queue.resync()  # the full re-read
    sched.cycle()
    assert list(sched.waiting) == followed


def test_a_victim_that_just_ended_is_not_followed_by_a_second_one(tmp_path):
    # node0: low a, node1: low b; high needs one node and preempts one of them
    store, launcher, sched = make(tmp_path, nodes=2)
    a, b = submit(store, priority=100), submit(store, priority=100)
    sched.cycle()
    _running(launcher, sched, store, a, ["node0"])
    _running(launcher, sched, store, b, ["node1"])
    submit(store, priority=900)
    sched.cycle()
    victim = next(j["id"] for j in (a, b) if store.get_job(j["id"])["preempt_requested"])
    other = ({a["id"], b["id"]} - {victim}).pop()
    # the victim's driver reports done, but Ray's view still shows its node busy
    launcher.reports[(victim, 1)] = {"phase": "done", "outcome": "PREEMPTED", "message": "preempted"}
    sched.cycle()
    sched.cycle()
    assert store.get_job(victim)["state"] == "QUEUED"
    assert store.get_job(other)["preempt_requested"] is None


class TwoCpuNode:
    def __init__(self):
        self.nodes = [NodeView("node0", available={"CPU": 2.0}, total={"CPU": 2.0})]

    def snapshot(self):
        return [n.copy() for n in self.nodes]


def test_a_starting_gang_already_placed_is_not_subtracted_twice(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=1)
    sched.cluster = TwoCpuNode()
    a = submit(store)  # 1 CPU
    sched.cycle()
    assert store.get_job(a["id"])["state"] == "STARTING"
    # its placement group is placed (Ray shows 1 CPU used) while its ranks start
    sched.cluster.nodes[0].available["CPU"] = 1.0
    launcher.reports[(a["id"], 1)] = {"phase": "placed", "at": time.time() - 5}
    b = submit(store)  # fits the 1 CPU left
    sched.cycle()
    assert store.get_job(b["id"])["state"] == "STARTING", sched.waiting.get(b["id"])


def test_a_gang_placed_a_moment_ago_still_counts_as_pending(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=1)
    sched.cluster = TwoCpuNode()
    a = submit(store, resources={"cpus": 2})
    sched.cycle()
    # placed just now: Ray's view may not show it yet (2 CPU still free)
    launcher.reports[(a["id"], 1)] = {"phase": "placed", "at": time.time()}
    b = submit(store, resources={"cpus": 2})
    sched.cycle()
    assert store.get_job(b["id"])["state"] == "QUEUED"


def test_a_cancel_before_the_ray_job_was_submitted_is_not_requeued(tmp_path):
    store, launcher, sched = make(tmp_path)
    job = submit(store)
    sched.cycle()
    store.update_job(job["id"], cancel_requested=time.time())
    launcher.state = lambda sid: RayJobState("MISSING", True)  # as after a server crash
    sched.cycle()
    assert store.get_job(job["id"])["state"] == "CANCELLED"


def test_a_failing_cycle_hook_keeps_neither_the_others_nor_the_cycle_from_running(tmp_path, caplog):
    """Each hook runs on its own: one that raises is logged once per distinct error and
    shown as the scheduler's error (last_cycle_error: /health, GET /scheduler)."""
    import threading

    store, launcher, sched = make(tmp_path)
    calls = []

    def broken(_sched):
        calls.append("broken")
        raise RuntimeError(errors[0])

    class Reporting:  # a hook that keeps its own error, as NodeRecorder does
        error = None

        def __call__(self, _sched):
            calls.append("reporting")

    errors = ["GCS unreachable"]
    reporting = Reporting()
    sched.cycle_hooks += [broken, reporting]
    with caplog.at_level("ERROR", logger="raybatch.scheduler"):
        for _ in range(3):
            sched.cycle()
    assert calls == ["broken", "reporting"] * 3 and sched.stats["cycles"] == 3
    assert sum("cycle hook broken failed" in r.getMessage() for r in caplog.records) == 1
    assert sched.hooks_error() == "cycle hook broken: RuntimeError: GCS unreachable"
    errors[0] = "another error"
    sched.cycle()
    assert sum("cycle hook broken failed" in r.getMessage() for r in caplog.records) == 2
    reporting.error = "reading the nodes failed"
    assert sched.hooks_error() == ("cycle hook broken: RuntimeError: another error; "
                                   "cycle hook Reporting: reading the nodes failed")
    # the loop shows it where the scheduler's other errors are
    t = threading.Thread(target=sched.run_forever, daemon=True)
    t.start()
    try:
        deadline = time.time() + 5
        while sched.last_cycle_error is None and time.time() < deadline:
            time.sleep(0.02)
        assert "cycle hook broken: RuntimeError: another error" in sched.last_cycle_error
        sched.cycle_hooks.remove(broken)
        reporting.error = None
        deadline = time.time() + 5
        while sched.last_cycle_error is not None and time.time() < deadline:
            time.sleep(0.02)
        assert sched.last_cycle_error is None
    finally:
        sched.stop()
        t.join(5)
