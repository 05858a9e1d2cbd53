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

    def submit(self, job, attempt, avoid_nodes=()):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("No available agent to submit job")
        self.submitted.append((job["id"], attempt, tuple(sorted(avoid_nodes))))
        return f"raybatch-{job['id']}-{attempt}"

    def report(self, job_id, attempt):
        return self.reports.get((job_id, attempt))

    def state(self, sid):
        return RayJobState("RUNNING", False)

    def request_stop(self, job_id, attempt, action):
        self.stops.append((job_id, attempt, action))

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
    assert launcher.submitted == [(job["id"], 2, ())]
    assert store.get_job(job["id"])["state"] == "STARTING"


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
    assert launcher.submitted[-1] == (job["id"], 2, ("node1",))
    states = [t["to_state"] for t in store.transitions(job["id"])]
    assert states == ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "QUEUED", "STARTING"]


def test_avoided_node_is_used_when_the_gang_fits_nowhere_else(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=2)
    job = submit(store, nodes=2)
    sched.cycle()
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": "NODE_LOST", "message": "lost",
                                        "ranks": [], "lost_nodes": ["node1"]}
    sched.cycle()
    assert launcher.submitted[-1] == (job["id"], 2, ())  # rather run than wait forever


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
