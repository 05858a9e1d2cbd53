"""Deadline-aware spot use as the scheduler applies it (raybatch.scheduler.deadline_jobs):
the job file's fields, the absolute deadline at submit, progress p and restart overhead d
kept in the store from checkpoint file times, the effective low_priority_nodes of queued
jobs each cycle (running jobs and jobs without a deadline untouched), and what queue and
show print. Driven without Ray: the launcher and the cluster view are in-memory fakes
(tests/test_scheduler_loop.py); the e2e run on fake_multinode is tests/test_deadline_e2e.py."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from raybatch.scheduler import policy
from raybatch.scheduler.autoscale import NodeTypes
from raybatch.scheduler.deadline import DEFAULT_RESTART_OVERHEAD_S
from raybatch.scheduler.deadline_jobs import restart_overhead, spot_available
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.loop import Scheduler
from raybatch.spec.job import JobSpec
from raybatch.state.states import JobState
from raybatch.state.store import Store
from tests.test_scheduler_loop import FakeLauncher

LOW = {"raybatch_low_priority": 1.0}


def spec_of(**fields) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "command": "true", **fields})


# ---- the job file ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field, words", [
    ({"deadline": "6h"}, "deadline", "needs runtime_estimate too"),
    ({"runtime_estimate": "2h"}, "runtime_estimate", "needs deadline too"),
    ({"deadline": "1h", "runtime_estimate": "2h"}, "deadline", "(3600 s) is shorter than runtime_estimate (7200 s)"),
    ({"deadline": "2030-01-01T00:00:00", "runtime_estimate": "1h"}, "deadline", "has no time zone"),
    ({"deadline": "next week", "runtime_estimate": "1h"}, "deadline", "is neither a time nor a duration"),
    ({"deadline": "6h", "runtime_estimate": 0}, "runtime_estimate", "must be positive"),
    ({"deadline": "6h", "runtime_estimate": "1h", "low_priority_nodes": "avoid"}, "deadline",
     "remove low_priority_nodes: avoid"),
    ({"deadline": "6h", "runtime_estimate": "1h", "prefer_low_priority": True}, "deadline",
     "remove prefer_low_priority"),
    ({"deadline": "6h", "runtime_estimate": "1h", "array": {"count": 3}}, "deadline", "not to an array job"),
])
def test_bad_deadline_fields_name_the_field(fields, field, words):
    with pytest.raises(ValidationError) as e:
        spec_of(**fields)
    text = str(e.value)
    assert words in text and field in text, text


def test_deadline_forms():
    rel = spec_of(deadline="90m", runtime_estimate="01:00:00")
    assert rel.deadline == "90m" and rel.runtime_estimate == 3600.0
    assert rel.deadline_at(1000.0) == 1000.0 + 5400
    # YAML reads an unquoted time as a datetime: kept with its zone
    loaded = yaml.safe_load("deadline: 2030-05-01T18:00:00+02:00\nruntime_estimate: 2h\n")
    aware = spec_of(**loaded)
    assert aware.deadline_at(0.0) == dt.datetime(2030, 5, 1, 16, tzinfo=dt.timezone.utc).timestamp()
    assert spec_of(deadline="2030-05-01T16:00:00Z", runtime_estimate=60).deadline_at(0.0) == aware.deadline_at(0.0)
    assert spec_of().deadline_at(0.0) is None  # without one: as before
    with pytest.raises(ValidationError, match="has no time zone"):
        spec_of(**yaml.safe_load("deadline: 2030-05-01 18:00:00\nruntime_estimate: 2h\n"))


def test_a_deadline_past_or_too_close_at_submit_is_an_error():
    now = time.time()
    past = spec_of(deadline="2020-01-01T00:00:00Z", runtime_estimate="1h")
    with pytest.raises(ValueError, match=r"deadline: 2020-01-01T00:00:00Z is already past \(\d+ s ago\)"):
        past.deadline_at(now)
    soon = dt.datetime.fromtimestamp(now + 600, dt.timezone.utc).isoformat()
    with pytest.raises(ValueError, match=r"is 600 s from now, less than runtime_estimate \(3600 s\)"):
        spec_of(deadline=soon, runtime_estimate="1h").deadline_at(now)


# ---- restart overhead ---------------------------------------------------------------------------

def _attempt(n, started_at, running_at, ended_at, checkpoint_at=None):
    return {"n": n, "started_at": started_at, "running_at": running_at, "ended_at": ended_at,
            "checkpoint_at": checkpoint_at}


def test_restart_overhead_is_start_up_plus_work_lost_averaged_over_restarts():
    assert restart_overhead([]) == (DEFAULT_RESTART_OVERHEAD_S, 0)
    assert restart_overhead([_attempt(1, 90, 100, 500, 480)]) == (DEFAULT_RESTART_OVERHEAD_S, 0)
    # attempt 2 not running yet: no restart measured
    assert restart_overhead([_attempt(1, 90, 100, 500, 480), _attempt(2, 510, None, None)])[1] == 0
    a = [_attempt(1, 90, 100, 500, 480),     # lost 20 s after its last checkpoint
         _attempt(2, 520, 530, 900, None),   # start-up 10 s; then ran 370 s without a checkpoint: all lost
         _attempt(3, 1000, 1010, None)]      # start-up 10 s
    # the time back in the queue (500 -> 520, 900 -> 1000) is not overhead: start-up is the
    # restarted attempt's own, from its admission (started_at) to its start of running
    assert restart_overhead(a) == ((10 + 20 + 10 + 370) / 2, 2)
    # an attempt that never ran (start failed) loses no work; its successor's start-up counts
    assert restart_overhead([_attempt(1, 100, None, 200), _attempt(2, 250, 260, None)]) == (10.0, 1)


# ---- the scheduler's bookkeeping and decisions -------------------------------------------------------

class Nodes:
    """A cluster view: named nodes, 1 CPU each; spot ones marked low-priority."""

    def __init__(self, ded: int, spot: int):
        self.nodes = [NodeView(f"ded{i}", available={"CPU": 1.0}, total={"CPU": 1.0}) for i in range(ded)]
        self.nodes += [NodeView(f"spot{i}", available={"CPU": 1.0}, total={"CPU": 1.0, **LOW}) for i in range(spot)]

    def snapshot(self):
        return [n.copy() for n in self.nodes]

    def take(self, node_id):
        next(n for n in self.nodes if n.node_id == node_id).available["CPU"] = 0.0


def make(tmp_path, ded=1, spot=1):
    store = Store(tmp_path / "db.sqlite")
    launcher = FakeLauncher()
    cluster = Nodes(ded, spot)
    sched = Scheduler(store, launcher, cluster)
    sched.deadlines.every_s = 0.0
    return store, launcher, cluster, sched


def submit(store, tmp_path, submitted_ago=0.0, **fields):
    spec = spec_of(**fields)
    job = store.create_job(name=spec.name, experiment=spec.experiment, priority=spec.priority_value,
                           spec=spec.model_dump(mode="json"), job_dir_for=lambda i: str(tmp_path / "jobs" / i),
                           deadline_at=spec.deadline_at(time.time() - submitted_ago))
    if submitted_ago:
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE jobs SET submitted_at=? WHERE id=?", (job["submitted_at"] - submitted_ago, job["id"]))
    return store.get_job(job["id"])


def run(launcher, sched, job, n, node, at):
    launcher.reports[(job["id"], n)] = {"phase": "running", "at": at, "ranks": [
        {"rank": 0, "node_rank": 0, "local_rank": 0, "node_id": node}]}
    sched.cycle()


def end(launcher, sched, job, n, node, outcome="EVICTED"):
    launcher.reports[(job["id"], n)] = {"phase": "done", "outcome": outcome, "exit_code": None,
                                        "message": "the node was taken back", "at": time.time(),
                                        "ranks": [{"rank": 0, "node_rank": 0, "local_rank": 0, "node_id": node}]}
    sched.cycle()


def checkpoint(tmp_path, job, name, mtime):
    d = tmp_path / "jobs" / job["id"] / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    # written and dated beside the directory, then renamed in: a listing running on the
    # scheduler's thread never sees the file with the time of its writing
    tmp = d.parent / f".{name}.tmp"
    tmp.write_text(name)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, d / name)


def settle(sched, check, timeout=20.0):
    """Cycle until ``check()`` holds: checkpoint listings run on worker threads."""
    end_at = time.monotonic() + timeout
    while time.monotonic() < end_at:
        sched.cycle()
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_progress_and_overhead_follow_the_checkpoint_files(tmp_path):
    store, launcher, cluster, sched = make(tmp_path)
    job = submit(store, tmp_path, submitted_ago=200, deadline="4h", runtime_estimate="2h")
    sched.cycle()
    assert launcher.submitted == [(job["id"], 1, ("spot0",))]  # rule 2: spot available
    t0 = time.time()
    checkpoint(tmp_path, job, "restored-from-before", t0 - 500)  # older than the attempt: not progress
    run(launcher, sched, job, 1, "spot0", at=t0 - 100)
    assert store.get_attempt(job["id"], 1)["progress_start"] == 0.0
    checkpoint(tmp_path, job, "ck-1", t0 - 70)
    settle(sched, lambda: store.get_job(job["id"])["progress_s"] == pytest.approx(30.0))
    assert store.get_attempt(job["id"], 1)["checkpoint_at"] == pytest.approx(t0 - 70)
    assert store.get_attempt(job["id"], 1)["deadline_rule"] == 2
    # a file older than the newest one seen moves nothing
    checkpoint(tmp_path, job, "ck-old", t0 - 90)
    for _ in range(3):
        sched.cycle()
        time.sleep(0.02)
    assert store.get_job(job["id"])["progress_s"] == pytest.approx(30.0)

    # evicted: its grace-period checkpoint (written before the attempt ended) is read once more
    cluster.nodes = [n for n in cluster.nodes if n.node_id != "spot0"]
    checkpoint(tmp_path, job, "ck-sigterm", t0 - 10)
    end(launcher, sched, job, 1, "spot0")
    ended = store.get_attempt(job["id"], 1)["ended_at"]
    assert store.get_job(job["id"])["state"] in ("QUEUED", "STARTING")
    settle(sched, lambda: store.get_job(job["id"])["progress_s"] == pytest.approx(90.0))
    # no spot left and p = 90 s below the line C*t/D (~100 s): rule 1, a dedicated node, from p = 90
    assert launcher.submitted[-1] == (job["id"], 2, ("ded0",))
    run(launcher, sched, job, 2, "ded0", at=ended + 5)
    second = store.get_attempt(job["id"], 2)
    assert second["progress_start"] == pytest.approx(90.0) and second["deadline_rule"] == 1
    info = sched.deadlines.info(store.get_job(job["id"]), spec_of(deadline="4h", runtime_estimate="2h"))
    assert info["restarts_measured"] == 1
    # start-up: attempt 2's own (admitted at started_at, running at ended + 5); work lost:
    # attempt 1's end - its newest checkpoint
    start_up = ended + 5 - second["started_at"]
    assert info["restart_overhead_s"] == pytest.approx(start_up + (ended - (t0 - 10)))
    checkpoint(tmp_path, job, "ck-2", ended + 25)
    settle(sched, lambda: store.get_job(job["id"])["progress_s"] == pytest.approx(110.0))
    assert sched.deadlines.decisions[job["id"]].where.value == "dedicated"


def test_queued_jobs_get_their_node_class_and_others_are_untouched(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=2)
    plain = submit(store, tmp_path)                                   # no deadline: allow
    avoid = submit(store, tmp_path, low_priority_nodes="avoid")       # no deadline: its own choice
    for n in ("ded0", "spot0", "spot1"):
        cluster.take(n)  # nothing free: every job waits, and their views can be read
    fresh = submit(store, tmp_path, deadline="10h", runtime_estimate="1h")
    sched.cycle()
    views = {pj.id: pj for pj in sched.queue.views()}
    assert views[plain["id"]].low_priority_nodes == "allow"
    assert views[avoid["id"]].low_priority_nodes == "avoid"
    # no spot: a job with no progress is below the line (rule 1): dedicated
    assert views[fresh["id"]].low_priority_nodes == "avoid"
    assert sched.deadlines.decisions[fresh["id"]].decision.rule == 1
    assert "low-priority nodes: avoid" in sched.waiting[fresh["id"]]
    # two free spot nodes: the job without a deadline takes one as before (its place comes first),
    # the job with one gets the other by rule 2; the avoid job still waits for a dedicated node
    for n in cluster.nodes:
        if n.node_id.startswith("spot"):
            n.available["CPU"] = 1.0
    sched.cycle()
    assert [j for j, _, _ in launcher.submitted] == [plain["id"], fresh["id"]]
    assert launcher.submitted[1][2][0].startswith("spot")
    assert store.get_attempt(fresh["id"], 1)["deadline_rule"] == 2
    assert store.get_attempt(plain["id"], 1)["deadline_rule"] is None
    assert store.get_job(avoid["id"])["state"] == "QUEUED"


def test_a_job_ahead_of_the_line_waits_for_spot_instead_of_an_idle_dedicated_node(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=1)
    cluster.take("spot0")
    job = submit(store, tmp_path, submitted_ago=100, deadline="10h", runtime_estimate="1h")
    store.update_job(job["id"], progress_s=50.0)  # ahead of the line C*t/D = 10 s
    sched.cycle()
    assert launcher.submitted == []
    shown = sched.deadlines.decisions[job["id"]]
    assert (shown.decision.rule, shown.where.value, shown.spot_available) == (0, "queued", False)
    assert "low-priority nodes: require" in sched.waiting[job["id"]]
    # behind the line: dedicated (rule 1)
    store.update_job(job["id"], progress_s=5.0)
    sched.cycle()
    assert launcher.submitted == [(job["id"], 1, ("ded0",))]


def test_a_running_job_is_not_moved_its_decision_is_only_shown(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=1)
    job = submit(store, tmp_path, deadline="2h", runtime_estimate="1h")
    sched.cycle()
    assert launcher.submitted == [(job["id"], 1, ("spot0",))]
    run(launcher, sched, job, 1, "spot0", at=time.time())
    # the deadline draws near (an hour of work left, 1 h 1 min to go): rule 4 says dedicated
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET submitted_at = submitted_at - 3540, deadline_at = deadline_at - 3540 "
                   "WHERE id=?", (job["id"],))
    for _ in range(3):
        sched.cycle()
    shown = sched.deadlines.decisions[job["id"]]
    assert (shown.decision.rule, shown.where.value, shown.decision.low_priority_nodes) == (4, "spot", "avoid")
    # ... and nothing acts on it: no stop, no second attempt, the running view keeps the spec's value
    assert launcher.stops == [] and len(launcher.submitted) == 1
    assert store.get_job(job["id"])["state"] == "RUNNING"
    assert [r.low_priority_nodes for r in sched._running(cluster.snapshot())] == ["allow"]


class _Auto(SimpleNamespace):
    pass


def test_spot_available_counts_spot_types_that_can_still_launch():
    types = NodeTypes.from_config({"available_node_types": {
        "ded": {"resources": {"CPU": 1}, "max_workers": 2},
        "spot": {"resources": {"CPU": 1, "raybatch_low_priority": 1}, "max_workers": 1},
    }})
    job = policy.Job("j", 500, 1, {"CPU": 1.0})
    now = time.time()
    live_spot = NodeView("s1", available={"CPU": 0.0}, total={"CPU": 1.0, **LOW}, node_type="spot")
    assert spot_available(job, [], _Auto(types=types, backed_off={}), now)          # can launch
    assert not spot_available(job, [], _Auto(types=types, backed_off={"spot": now + 60}), now)  # back-off
    assert spot_available(job, [], _Auto(types=types, backed_off={"spot": now - 1}), now)       # over
    assert not spot_available(job, [live_spot], _Auto(types=types, backed_off={}), now)          # at max, busy
    live_spot.available["CPU"] = 1.0
    assert spot_available(job, [live_spot], None, now)                                           # free now
    assert not spot_available(job, [], None, now)                                                # no autoscaler
    two = policy.Job("j2", 500, 1, {"CPU": 1.0}, count=2)
    assert not spot_available(two, [], _Auto(types=types, backed_off={}), now)  # one spot node at most


def test_a_slow_checkpoint_listing_does_not_hold_up_the_cycle(tmp_path):
    store, launcher, cluster, sched = make(tmp_path)
    from raybatch.storage.datastores import Datastores

    def slow():
        time.sleep(1.5)
        return Datastores()

    sched.deadlines.datastores = slow
    job = submit(store, tmp_path, deadline="10h", runtime_estimate="2h")
    sched.cycle()
    t0 = time.time()
    run(launcher, sched, job, 1, "spot0", at=t0 - 10)
    checkpoint(tmp_path, job, "ck", t0 - 5)
    started = time.perf_counter()
    for _ in range(5):
        sched.cycle()
    assert time.perf_counter() - started < 1.0
    assert store.get_job(job["id"])["progress_s"] == 0.0
    settle(sched, lambda: store.get_job(job["id"])["progress_s"] == pytest.approx(5.0, abs=0.01), timeout=5)


def test_a_failing_listing_is_reported_as_the_hooks_error(tmp_path):
    store, launcher, cluster, sched = make(tmp_path)

    def broken():
        raise RuntimeError("the datastores file is gone")

    sched.deadlines.datastores = broken
    job = submit(store, tmp_path, deadline="10h", runtime_estimate="2h")
    sched.cycle()
    run(launcher, sched, job, 1, "spot0", at=time.time() - 10)
    settle(sched, lambda: sched.hooks_error() is not None)
    assert f"cycle hook DeadlineJobs: {job['id']}: listing its checkpoints failed" in sched.hooks_error()
    assert "the datastores file is gone" in sched.hooks_error()


def test_an_older_store_gets_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX jobs_deadline_open")
    for table, col in (("jobs", "deadline_at"), ("jobs", "progress_s"), ("attempts", "progress_start"),
                       ("attempts", "checkpoint_at"), ("attempts", "deadline_rule")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    db.commit()
    db.close()
    store = Store(path)
    cols = {r["name"] for r in store._all("PRAGMA table_info(jobs)")}
    assert {"deadline_at", "progress_s"} <= cols
    assert {"progress_start", "checkpoint_at", "deadline_rule"} <= {
        r["name"] for r in store._all("PRAGMA table_info(attempts)")}
    assert store.deadline_jobs() == []


# ---- the API and what the CLI prints -----------------------------------------------------------------

def _api(tmp_path):
    from fastapi.testclient import TestClient

    from raybatch.server.app import ServerContext, create_app
    from raybatch.storage.datastores import Datastores

    store, launcher, cluster, sched = make(tmp_path)
    (tmp_path / "code").mkdir()
    ctx = ServerContext(store=store, scheduler=sched, jobs_root=str(tmp_path / "jobs"),
                        code_root=tmp_path / "code", datastores=Datastores)
    http = TestClient(create_app(ctx, "tok"))
    http.headers["Authorization"] = "Bearer tok"
    return http, store, cluster, sched


def test_submit_stores_the_deadline_and_queue_and_show_name_the_rule(tmp_path):
    from raybatch.cli import render
    from raybatch.models import JobDetail, QueueEntry

    http, store, cluster, sched = _api(tmp_path)
    cluster.take("ded0")
    cluster.take("spot0")
    before = time.time()
    r = http.post("/api/v1/jobs", json={"spec": {"name": "dl", "command": "true", "deadline": "2h",
                                                 "runtime_estimate": "30m"}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    row = store.get_job(job_id)
    assert before + 7200 <= row["deadline_at"] <= time.time() + 7200
    past = http.post("/api/v1/jobs", json={"spec": {"name": "late", "command": "true",
                                                    "deadline": "2001-01-01T00:00:00Z", "runtime_estimate": "1h"}})
    assert past.status_code == 400 and "deadline: 2001-01-01T00:00:00Z is already past" in past.json()["detail"]
    plain = http.post("/api/v1/jobs", json={"spec": {"name": "plain", "command": "true"}}).json()["id"]
    sched.cycle()
    entries = [QueueEntry.model_validate(e) for e in http.get("/api/v1/queue").json()]
    mine = next(e for e in entries if e.id == job_id)
    assert mine.deadline.rule == 1 and mine.deadline.low_priority_nodes == "avoid"
    assert mine.deadline.words.startswith("rule 1: behind the uniform-progress line")
    assert mine.deadline.slack_s == pytest.approx(7200 - 1800, abs=5)
    assert mine.deadline.runtime_estimate_s == 1800 and mine.deadline.progress_s == 0
    assert mine.deadline.restart_overhead_s == DEFAULT_RESTART_OVERHEAD_S
    assert next(e for e in entries if e.id == plain).deadline is None
    table = render.queue_table(entries)
    cells = [c for col in table.columns for c in col._cells]
    assert any(str(c).startswith("rule 1 (dedicated), slack 1h") for c in cells), cells
    detail = JobDetail.model_validate(http.get(f"/api/v1/jobs/{job_id}").json())
    lines = render.deadline_lines(detail.deadline, detail.state)
    assert "slack 1h29m" in lines[0] or "slack 1h30m" in lines[0], lines
    assert "p 0s of C 30m00s" in lines[1] and "the default until it has restarted once" in lines[1]
    assert "rule 1:" in lines[2] and "low_priority_nodes avoid at now" in lines[2]
    assert JobDetail.model_validate(http.get(f"/api/v1/jobs/{plain}").json()).deadline is None


def test_a_finished_job_says_whether_it_met_its_deadline(tmp_path):
    store, launcher, cluster, sched = make(tmp_path)
    job = submit(store, tmp_path, deadline="1h", runtime_estimate="10m")
    sched.cycle()
    run(launcher, sched, job, 1, "spot0", at=time.time())
    end(launcher, sched, job, 1, "spot0", outcome="SUCCEEDED")
    row = store.get_job(job["id"])
    assert row["state"] == "SUCCEEDED"
    info = sched.deadlines.info(row, spec_of(deadline="1h", runtime_estimate="10m"))
    assert info["met"] is True and "slack_s" not in info and "rule" not in info
    assert job["id"] not in sched.deadlines.decisions  # forgotten once over
    assert Path(row["job_dir"]).name == job["id"]


# ---- review fixes: rule 3 at a restart, per-cycle cost, hung listings, apply's failures --------------

def test_rule_3_keeps_a_job_restarted_from_dedicated_nodes_on_dedicated(tmp_path):
    """raybatch does not migrate a running job, so rule 3 acts at its next start: a queued job
    whose previous attempt ran on dedicated nodes is evaluated as on dedicated nodes."""
    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=1)
    cluster.take("spot0")
    job = submit(store, tmp_path, submitted_ago=100, deadline="10h", runtime_estimate="1h")
    sched.cycle()
    assert launcher.submitted == [(job["id"], 1, ("ded0",))]  # rule 1: no spot, behind the line
    assert store.get_attempt(job["id"], 1)["deadline_rule"] == 1
    run(launcher, sched, job, 1, "ded0", at=time.time())
    # p = 15 s: ahead of the line at t (C*t/D ~ 10 s), not at t + 2d (~ 22 s, d = 60 s)
    store.update_job(job["id"], progress_s=15.0)
    next(n for n in cluster.nodes if n.node_id == "spot0").available["CPU"] = 1.0  # spot is back
    end(launcher, sched, job, 1, "ded0", outcome="NODE_LOST")
    # requeued and started again in the same cycle: rule 3 keeps it on the dedicated node
    assert launcher.submitted[-1] == (job["id"], 2, ("ded0",))
    assert store.get_attempt(job["id"], 2)["deadline_rule"] == 3


def test_a_job_restarted_from_spot_is_not_held_by_rule_3(tmp_path):
    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=1)
    job = submit(store, tmp_path, submitted_ago=100, deadline="10h", runtime_estimate="1h")
    sched.cycle()
    assert launcher.submitted == [(job["id"], 1, ("spot0",))]  # rule 2
    run(launcher, sched, job, 1, "spot0", at=time.time())
    store.update_job(job["id"], progress_s=15.0)
    end(launcher, sched, job, 1, "spot0", outcome="NODE_LOST")
    assert launcher.submitted[-1] == (job["id"], 2, ("spot0",))
    assert store.get_attempt(job["id"], 2)["deadline_rule"] == 2


def _many(store, tmp_path, n):
    spec = spec_of(deadline="10h", runtime_estimate="1h")
    at = spec.deadline_at(time.time())
    store.create_jobs([dict(name=spec.name, experiment=spec.experiment, priority=spec.priority_value,
                            spec=spec.model_dump(mode="json"), job_dir_for=lambda i: str(tmp_path / "jobs" / i),
                            deadline_at=at) for _ in range(n)])


def test_the_cost_of_a_cycle_does_not_grow_with_the_queued_deadline_jobs(tmp_path, monkeypatch):
    """One store read of the deadline jobs per cycle (few columns, no spec), shared by apply
    and the hook; "spot available" once per job shape; nothing per job in SQL."""
    from raybatch.scheduler import deadline_jobs

    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=1)
    for n in ("ded0", "spot0"):
        cluster.take(n)  # nothing free: every job stays queued
    calls = []
    real = deadline_jobs.spot_available
    monkeypatch.setattr(deadline_jobs, "spot_available", lambda *a: calls.append(a[0].shape) or real(*a))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    def measure():
        for _ in range(2):  # new submissions read (specs, views), then a steady cycle
            sched.cycle()
        statements.clear()
        calls.clear()
        sched.cycle()
        return list(statements), list(calls)

    _many(store, tmp_path, 150)
    few, few_calls = measure()
    _many(store, tmp_path, 450)
    many, many_calls = measure()
    assert len(sched.deadlines.decisions) == 600
    assert {s.decision.rule for s in sched.deadlines.decisions.values()} == {1}
    assert all(pj.low_priority_nodes == "avoid" for pj in sched.queue.views())
    assert len(many) == len(few), (few, many)  # the same statements, whatever the queue's length
    reads = [s for s in many if "deadline_at IS NOT NULL" in s]
    assert len(reads) == 1 and "SELECT *" not in reads[0] and "spec" not in reads[0].split("FROM")[0]
    assert not any("deadline" in s and "SELECT *" in s for s in many)
    assert len(few_calls) == len(many_calls) == 1  # one shape: spot_available once
    plan = store._all("EXPLAIN QUERY PLAN " + reads[0])
    assert any("jobs_deadline_open" in r["detail"] for r in plan), plan


def test_the_deadline_index_leaves_out_finished_jobs_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "old.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)  # a file of the previous release: its index kept finished jobs too
    db.execute("DROP INDEX jobs_deadline_open")
    db.execute("CREATE INDEX jobs_deadline ON jobs (seq) WHERE deadline_at IS NOT NULL")
    db.commit()
    db.close()
    store = Store(path)
    indexes = {r["name"]: r["sql"] for r in store._all("SELECT name, sql FROM sqlite_master WHERE type='index'")}
    assert "jobs_deadline" not in indexes
    assert "state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')" in indexes["jobs_deadline_open"]
    job = submit(store, tmp_path, deadline="10h", runtime_estimate="1h")
    assert [r["id"] for r in store.deadline_jobs()] == [job["id"]]
    store.transition(job["id"], JobState.CANCELLED, "test")
    assert store.deadline_jobs() == []


def test_a_hung_listing_is_abandoned_reported_and_its_threads_capped(tmp_path):
    from raybatch.storage.datastores import Datastores

    store, launcher, cluster, sched = make(tmp_path)
    release = threading.Event()
    started = []

    def hung():
        started.append(time.monotonic())
        release.wait(20)
        return Datastores()

    dl = sched.deadlines
    dl.datastores = hung
    dl.listing_timeout_s = 0.2
    dl.max_abandoned = 2
    job = submit(store, tmp_path, deadline="10h", runtime_estimate="2h")
    sched.cycle()
    t0 = time.time()
    run(launcher, sched, job, 1, "spot0", at=t0 - 10)
    checkpoint(tmp_path, job, "ck", t0 - 5)
    assert len(started) == 1
    time.sleep(0.3)
    sched.cycle()  # the first listing is abandoned, its slot freed: a second one starts
    assert f"{job['id']}: listing its checkpoints took over 0.2 s: abandoned" in sched.hooks_error()
    assert len(started) == 2
    time.sleep(0.3)
    sched.cycle()  # two abandoned threads still running: the cap, no third one
    for _ in range(3):
        sched.cycle()
    assert len(started) == 2
    assert "2 abandoned listing(s) still running: no new listing starts" in sched.hooks_error()
    release.set()  # the storage answers again: listings resume, the progress moves, the errors go
    settle(sched, lambda: store.get_job(job["id"])["progress_s"] == pytest.approx(5.0, abs=0.01)
           and sched.hooks_error() is None)


def test_forgotten_jobs_free_their_listing_slots(tmp_path):
    store, launcher, cluster, sched = make(tmp_path)
    release = threading.Event()
    sched.deadlines.datastores = lambda: release.wait(20) or None
    job = submit(store, tmp_path, deadline="10h", runtime_estimate="2h")
    sched.cycle()
    run(launcher, sched, job, 1, "spot0", at=time.time() - 10)
    assert list(sched.deadlines._listing) == [(job["id"], 1)]
    store.transition(job["id"], JobState.CANCELLED, "test", expect=JobState.RUNNING)
    sched.cycle()
    assert sched.deadlines._listing == {} and len(sched.deadlines._abandoned) == 1
    release.set()


@pytest.mark.parametrize("broken", ["store", "spec"])
def test_a_failure_in_apply_skips_the_adjustment_not_the_plan(tmp_path, monkeypatch, broken):
    store, launcher, cluster, sched = make(tmp_path, ded=1, spot=1)
    cluster.take("spot0")
    dl = submit(store, tmp_path, deadline="10h", runtime_estimate="1h")
    plain = submit(store, tmp_path)

    def fail(*a, **k):
        raise sqlite3.OperationalError("database disk image is malformed")

    if broken == "store":
        monkeypatch.setattr(store, "deadline_jobs", fail)
    else:
        monkeypatch.setattr(sched, "spec_of", fail)
    sched.cycle()  # does not raise
    assert [j for j, _, _ in launcher.submitted] == [dl["id"]]  # the plan ran (the queue's head on ded0)
    error = sched.hooks_error()  # the hook, reading the same, fails too: either is shown
    assert error.startswith("cycle hook DeadlineJobs: ") and "database disk image is malformed" in error, error
    assert sched.deadlines.error.startswith("apply: deadline adjustment skipped: OperationalError: database disk")
    monkeypatch.undo()
    sched.cycle()
    assert sched.hooks_error() is None
    assert store.get_job(plain["id"])["state"] == "QUEUED"


def test_a_numeric_deadline_of_a_million_seconds_or_more(tmp_path):
    for seconds, text in ((1e6, "1000000s"), (1234567.5, "1234567.5s"), (2e22, "20000000000000000000000s"),
                          (90, "90s"), (0.25, "0.25s")):
        spec = spec_of(deadline=seconds, runtime_estimate=0.1)
        assert spec.deadline == text
        assert spec.deadline_at(1000.0) == 1000.0 + seconds
    assert spec_of(deadline=10**6, runtime_estimate="1h").deadline == "1000000s"
    # the same text read back: a stored spec validates again
    assert JobSpec.model_validate_json(spec_of(deadline=1e6, runtime_estimate="1h").model_dump_json()).deadline \
        == "1000000s"


def test_one_work_lost_and_one_time_parser():
    from raybatch.scheduler import cost, deadline_jobs
    from raybatch.spec import job as job_spec
    from raybatch.spec.units import parse_duration_or_time

    assert deadline_jobs.work_lost is cost.work_lost
    assert cost.work_lost({"running_at": 100, "checkpoint_at": 160, "ended_at": 200}) == 40
    assert cost.work_lost({"running_at": 100, "checkpoint_at": None, "ended_at": 200}) == 100
    assert cost.work_lost({"running_at": 100, "checkpoint_at": 50, "ended_at": 200}) == 100  # restored
    assert cost.work_lost({"running_at": None, "checkpoint_at": None, "ended_at": 200}) == 0
    assert job_spec.parse_deadline("6h") == parse_duration_or_time("6h", "x") == 21600.0
    with pytest.raises(ValueError, match="^deadline: '2030-01-01T00:00' has no time zone"):
        job_spec.parse_deadline("2030-01-01T00:00")


def test_a_checkpoints_directory_replaced_by_a_link_is_not_walked(tmp_path):
    """A job that replaced its checkpoints directory with a link (to /, or to files it
    dated as it liked) made the scheduler's listing walk wherever the link pointed, and
    count what it found as the job's progress."""
    store, launcher, cluster, sched = make(tmp_path)
    job = submit(store, tmp_path, submitted_ago=200, deadline="4h", runtime_estimate="2h")
    sched.cycle()
    t0 = time.time()
    run(launcher, sched, job, 1, "spot0", at=t0 - 100)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "ck").write_text("x")
    os.utime(elsewhere / "ck", (t0 - 10, t0 - 10))
    ckpt = tmp_path / "jobs" / job["id"] / "checkpoints"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.symlink_to(elsewhere)
    for _ in range(40):  # listings run on threads: give them many cycles to (not) move it
        sched.cycle()
        time.sleep(0.05)
    assert store.get_job(job["id"])["progress_s"] == 0.0, "progress moved through the link"
    ckpt.unlink()  # a real directory with a real checkpoint is read as before
    checkpoint(tmp_path, job, "ck-1", t0 - 50)
    settle(sched, lambda: store.get_job(job["id"])["progress_s"] == pytest.approx(50.0))
