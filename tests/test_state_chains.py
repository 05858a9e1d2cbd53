"""Every state chain in one transaction (RESTARTING -> QUEUED, PREEMPTED -> QUEUED, with the
ended attempt's record): a write that fails half way leaves the job where it was, and the
next cycle finishes the chain; the start-up sweep moves on a job a crash left between two
states. The fault is real SQLite's: a trigger that aborts the second write, as a full disk or
a locked database would, on the store's own file."""

from __future__ import annotations

import sqlite3
import time

import pytest

from raybatch.state.states import JobState
from raybatch.state.store import Step, Store
from tests.test_scheduler_loop import make, submit

RANKS = [{"rank": r, "node_rank": r, "local_rank": 0, "node_id": f"node{r}"} for r in (0, 1)]


def fail_writes_of(path, to_state: str):
    db = sqlite3.connect(path)
    db.execute(f"CREATE TRIGGER fail_{to_state} BEFORE INSERT ON transitions WHEN NEW.to_state='{to_state}' "
               "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    db.commit()
    return db


def running_job(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=3)
    job = submit(store, nodes=2)
    sched.cycle()
    launcher.reports[(job["id"], 1)] = {"phase": "running", "at": time.time(), "ranks": RANKS}
    sched.cycle()
    assert store.get_job(job["id"])["state"] == "RUNNING"
    return store, launcher, sched, job


def test_a_requeue_that_fails_half_way_leaves_the_job_running_and_the_next_cycle_finishes_it(tmp_path):
    store, launcher, sched, job = running_job(tmp_path)
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": "NODE_LOST", "exit_code": None,
                                        "message": "rank 1 was lost", "ranks": RANKS, "lost_nodes": ["node1"]}
    db = fail_writes_of(tmp_path / "db.sqlite", "QUEUED")
    with pytest.raises(sqlite3.DatabaseError, match="disk is full"):
        sched.cycle()
    row = store.get_job(job["id"])
    assert row["state"] == "RUNNING" and row["infra_retries"] == 0  # not RESTARTING forever
    assert store.get_attempt(job["id"], 1)["outcome"] is None     # the attempt's end rolled back too
    db.execute("DROP TRIGGER fail_QUEUED")
    db.commit()
    sched.cycle()
    row = store.get_job(job["id"])
    assert row["infra_retries"] == 1 and row["state"] in ("QUEUED", "STARTING")
    assert store.get_attempt(job["id"], 1)["outcome"] == "NODE_LOST"
    states = [t["to_state"] for t in store.transitions(job["id"])]
    assert states[:6] == ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "QUEUED", "STARTING"]


def test_a_preemption_requeue_is_one_transaction_too(tmp_path):
    store, launcher, sched, job = running_job(tmp_path)
    store.update_job(job["id"], preempt_requested=time.time(), preempted_by="rb-high")
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": "PREEMPTED", "exit_code": None,
                                        "message": "preempted", "ranks": RANKS}
    db = fail_writes_of(tmp_path / "db.sqlite", "QUEUED")
    with pytest.raises(sqlite3.DatabaseError):
        sched.cycle()
    assert store.get_job(job["id"])["state"] == "RUNNING"
    db.execute("DROP TRIGGER fail_QUEUED")
    db.commit()
    sched.cycle()
    row = store.get_job(job["id"])
    assert row["preemptions"] == 1 and row["state"] in ("QUEUED", "STARTING")


def test_the_start_up_sweep_requeues_a_job_left_between_two_states(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    a, b, c = (submit(store) for _ in range(3))
    for j, mid in ((a, JobState.RESTARTING), (b, JobState.PREEMPTED)):
        store.chain(j["id"], [Step(JobState.STARTING, "s"), Step(JobState.RUNNING, "r"), Step(mid, "left here")])
    store.close()
    store = Store(tmp_path / "db.sqlite")  # the server's next start
    assert sorted(store.requeue_stranded()) == sorted([a["id"], b["id"]])
    for j in (a, b):
        row = store.get_job(j["id"])
        assert row["state"] == "QUEUED" and "requeued at server start" in row["reason"]
    assert store.get_job(c["id"])["state"] == "QUEUED" and store.requeue_stranded() == []


def test_a_chain_checks_every_step(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    j = submit(store)
    from raybatch.state.states import InvalidTransition
    with pytest.raises(InvalidTransition):
        store.chain(j["id"], [Step(JobState.STARTING, "s"), Step(JobState.QUEUED, "no: not from STARTING")])
    assert store.get_job(j["id"])["state"] == "QUEUED"
    assert [t["to_state"] for t in store.transitions(j["id"])] == ["QUEUED"]


def test_a_write_that_finds_the_database_locked_gives_the_store_back(tmp_path):
    # another process holds the write lock: the scheduler's write fails after the busy
    # timeout, and must not keep the store's own lock (every later write would hang on it)
    import threading

    from raybatch.state.store import StoreBusy

    store = Store(tmp_path / "db.sqlite")
    j = submit(store)
    holder = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    failed = []
    t = threading.Thread(target=lambda: failed.append(_raises(lambda: store.update_job(j["id"], reason="x"))))
    t.start()
    t.join(10)
    assert failed and isinstance(failed[0], StoreBusy) and "locked" in str(failed[0])
    holder.execute("ROLLBACK")
    holder.close()
    store.update_job(j["id"], reason="written")  # this thread gets the store at once
    assert store.get_job(j["id"])["reason"] == "written"


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None
