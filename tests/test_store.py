"""Unit tests of the SQLite store and the job state machine (raybatch.state), on a
real SQLite file in tmp_path. No Ray, no server."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from raybatch.state import InvalidTransition, JobState, Store
from raybatch.state.states import ALLOWED, FINAL_STATES, check_transition

Q, S, R = JobState.QUEUED, JobState.STARTING, JobState.RUNNING
OK, FAIL, CXL = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED
PRE, RST = JobState.PREEMPTED, JobState.RESTARTING


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "raybatch.db"


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()


def new(store: Store, name: str = "j", priority: int = 500, **kw):
    return store.create_job(
        name=name, experiment=kw.pop("experiment", "exp"), priority=priority,
        spec={"name": name, "command": "echo hi", **kw.pop("spec", {})},
        job_dir_for=lambda job_id: f"/jobs/{job_id}", **kw,
    )


def walk(store: Store, job_id: str, *states: JobState) -> dict:
    job = None
    for st in states:
        job = store.transition(job_id, st, f"to {st.value}")
    return job


# ---- create ----------------------------------------------------------------------------

def test_create_job_is_queued_with_a_submitted_transition(store):
    before = time.time()
    job = new(store, "train", priority=750, spec={"nodes": 2}, code_package="abc123")
    assert job["id"].startswith("rb-") and len(job["id"]) == 11
    assert job["state"] == "QUEUED"
    assert (job["name"], job["experiment"], job["priority"]) == ("train", "exp", 750)
    assert job["job_dir"] == f"/jobs/{job['id']}"
    assert job["code_package"] == "abc123"
    assert job["attempt"] == 0 and job["user_retries"] == 0 and job["infra_retries"] == 0
    assert job["started_at"] is None and job["ended_at"] is None
    assert before <= job["submitted_at"] == job["updated_at"] <= time.time()
    assert json.loads(job["spec"]) == {"name": "train", "command": "echo hi", "nodes": 2}
    (tr,) = store.transitions(job["id"])
    assert tr["from_state"] is None and tr["to_state"] == "QUEUED" and tr["reason"] == "submitted"
    assert tr["at"] == job["submitted_at"]
    assert store.get_job(job["id"]) == job


def test_job_ids_are_unique_and_unknown_ids_are_none(store):
    ids = {new(store)["id"] for _ in range(50)}
    assert len(ids) == 50
    assert store.get_job("rb-nothere") is None
    with pytest.raises(KeyError):
        store.transition("rb-nothere", S, "x")


# ---- the queue -----------------------------------------------------------------------------

def test_queue_orders_by_priority_then_submission(store):
    names = [("low1", 250), ("norm1", 500), ("high1", 750), ("norm2", 500), ("low2", 250),
             ("high2", 750), ("top", 1000)]
    for name, prio in names:
        new(store, name, prio)
    assert [j["name"] for j in store.queued_jobs()] == [
        "top", "high1", "high2", "norm1", "norm2", "low1", "low2"]


def test_queue_holds_only_queued_jobs(store):
    new(store, "a")
    b, c = new(store, "b"), new(store, "c")
    walk(store, b["id"], S)
    walk(store, c["id"], CXL)
    assert [j["name"] for j in store.queued_jobs()] == ["a"]
    assert [j["name"] for j in store.active_jobs()] == ["b"]
    assert store.count_by_state() == {"QUEUED": 1, "STARTING": 1, "CANCELLED": 1}


def test_requeued_job_keeps_its_original_place(store):
    first = new(store, "first")
    second = new(store, "second")
    third = new(store, "third")
    walk(store, first["id"], S, RST, Q)
    walk(store, second["id"], S, R, PRE, Q)
    requeued = store.get_job(first["id"])
    assert requeued["state"] == "QUEUED" and requeued["seq"] == first["seq"]
    assert [j["name"] for j in store.queued_jobs()] == ["first", "second", "third"]
    assert first["seq"] < second["seq"] < third["seq"]


def test_list_jobs_newest_first_with_filters(store):
    a = new(store, "a", experiment="x")
    new(store, "b", experiment="y")
    new(store, "c", experiment="x")
    walk(store, a["id"], S, R)
    assert [j["name"] for j in store.list_jobs()] == ["c", "b", "a"]
    assert [j["name"] for j in store.list_jobs(experiment="x")] == ["c", "a"]
    assert [j["name"] for j in store.list_jobs(states=[R])] == ["a"]
    assert [j["name"] for j in store.list_jobs(states=[Q], experiment="x")] == ["c"]
    assert [j["name"] for j in store.list_jobs(limit=1)] == ["c"]


# ---- transitions ----------------------------------------------------------------------------

def test_transitions_are_recorded_in_order(store):
    job = new(store)
    t0 = time.time()
    store.transition(job["id"], S, "admitted", attempt=1, started_at=123.0)
    store.transition(job["id"], R, "all ranks running")
    store.transition(job["id"], RST, "node lost", infra_retries=1)
    store.transition(job["id"], Q, "retry 1 of 3")
    trs = store.transitions(job["id"])
    assert [(t["from_state"], t["to_state"], t["reason"]) for t in trs] == [
        (None, "QUEUED", "submitted"),
        ("QUEUED", "STARTING", "admitted"),
        ("STARTING", "RUNNING", "all ranks running"),
        ("RUNNING", "RESTARTING", "node lost"),
        ("RESTARTING", "QUEUED", "retry 1 of 3"),
    ]
    ats = [t["at"] for t in trs]
    assert ats == sorted(ats) and ats[1] >= t0 and ats[-1] <= time.time()
    got = store.get_job(job["id"])
    assert got["state"] == "QUEUED" and got["reason"] == "retry 1 of 3"
    assert got["attempt"] == 1 and got["started_at"] == 123.0 and got["infra_retries"] == 1
    assert got["updated_at"] == ats[-1]
    assert got["ended_at"] is None


@pytest.mark.parametrize("path, bad", [
    ((), R),             # QUEUED -> RUNNING skips STARTING
    ((), OK),
    ((), PRE),
    ((), Q),
    ((S, R), Q),         # RUNNING goes back to the queue only through RESTARTING/PREEMPTED
    ((S, R), S),
    ((S, R, PRE), R),
    ((S, RST), R),
    ((S, R, OK), Q),     # final states are final
    ((S, R, OK), FAIL),
    ((FAIL,), Q),
    ((CXL,), S),
    ((CXL,), CXL),
])
def test_disallowed_edges_are_rejected_and_change_nothing(store, path, bad):
    job = new(store)
    walk(store, job["id"], *path)
    before = store.get_job(job["id"])
    n = len(store.transitions(job["id"]))
    with pytest.raises(InvalidTransition, match=f"{before['state']} -> {bad.value} is not an allowed"):
        store.transition(job["id"], bad, "nope")
    assert store.get_job(job["id"]) == before
    assert len(store.transitions(job["id"])) == n


@pytest.mark.parametrize("final", sorted(FINAL_STATES, key=lambda s: s.value))
def test_no_edge_leaves_a_final_state(final):
    assert ALLOWED[final] == frozenset()
    for dst in JobState:
        with pytest.raises(InvalidTransition):
            check_transition(final, dst)


def test_every_state_has_an_entry_and_requeue_edges():
    assert set(ALLOWED) == set(JobState)
    assert Q in ALLOWED[RST] and Q in ALLOWED[PRE]
    assert R not in ALLOWED[Q]


def test_compare_and_set_mismatch_is_rejected(store):
    job = new(store)
    walk(store, job["id"], S)
    with pytest.raises(InvalidTransition, match="is STARTING, expected QUEUED"):
        store.transition(job["id"], CXL, "user cancel", expect=Q)
    assert store.get_job(job["id"])["state"] == "STARTING"
    assert len(store.transitions(job["id"])) == 2
    # with the right expectation it goes through
    assert store.transition(job["id"], R, "ok", expect=S)["state"] == "RUNNING"


def test_only_one_of_two_racing_cas_transitions_wins(store):
    job = new(store)
    barrier = threading.Barrier(2)
    results = []

    def go(dst):
        barrier.wait()
        try:
            store.transition(job["id"], dst, f"race {dst.value}", expect=Q)
            results.append(("ok", dst))
        except InvalidTransition:
            results.append(("lost", dst))

    threads = [threading.Thread(target=go, args=(d,)) for d in (S, CXL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["lost", "ok"]
    winner = next(d for r, d in results if r == "ok")
    assert store.get_job(job["id"])["state"] == winner.value
    assert len(store.transitions(job["id"])) == 2


@pytest.mark.parametrize("path", [(S, R, OK), (S, R, FAIL), (CXL,), (FAIL,), (S, CXL), (S, R, PRE, CXL)])
def test_final_states_set_ended_at(store, path):
    job = new(store)
    walk(store, job["id"], *path[:-1])
    assert store.get_job(job["id"])["ended_at"] is None
    t0 = time.time()
    done = store.transition(job["id"], path[-1], "done", exit_code=0)
    assert done["state"] == path[-1].value
    assert t0 <= done["ended_at"] <= time.time()
    assert done["ended_at"] == done["updated_at"]
    assert done["exit_code"] == 0


def test_explicit_ended_at_is_kept(store):
    job = new(store)
    done = store.transition(job["id"], FAIL, "could not start", ended_at=42.0)
    assert done["ended_at"] == 42.0


def test_non_final_states_do_not_set_ended_at(store):
    job = new(store)
    for st in (S, R, RST):
        assert store.transition(job["id"], st, "x")["ended_at"] is None


def test_transition_rejects_unknown_or_immutable_fields(store):
    job = new(store)
    for bad in ({"bogus": 1}, {"seq": 99}, {"id": "rb-x"}, {"spec": "{}"}, {"submitted_at": 0}):
        with pytest.raises(ValueError, match="not job fields"):
            store.transition(job["id"], S, "x", **bad)
    assert store.get_job(job["id"])["state"] == "QUEUED"


def test_update_job_refuses_state(store):
    job = new(store)
    with pytest.raises(ValueError, match="use transition"):
        store.update_job(job["id"], state="RUNNING")
    store.update_job(job["id"], cancel_requested=5.0, reason="cancel asked")
    got = store.get_job(job["id"])
    assert got["state"] == "QUEUED" and got["cancel_requested"] == 5.0
    assert got["reason"] == "cancel asked"


# ---- attempts and ranks ------------------------------------------------------------------------

def test_attempts_round_trip(store):
    job = new(store)
    store.add_attempt(job["id"], 1, "raysubmit_1")
    store.add_attempt(job["id"], 2, "raysubmit_2")
    store.update_attempt(job["id"], 1, running_at=10.0, ended_at=20.0, outcome="NODE_LOST",
                         exit_code=None, reason="node died")
    a1 = store.get_attempt(job["id"], 1)
    assert a1["ray_job_id"] == "raysubmit_1" and a1["running_at"] == 10.0
    assert a1["ended_at"] == 20.0 and a1["outcome"] == "NODE_LOST" and a1["reason"] == "node died"
    assert a1["started_at"] > 0
    atts = store.attempts(job["id"])
    assert [(a["n"], a["ray_job_id"], a["outcome"]) for a in atts] == [
        (1, "raysubmit_1", "NODE_LOST"), (2, "raysubmit_2", None)]
    assert store.get_attempt(job["id"], 3) is None
    with pytest.raises(sqlite3.IntegrityError):
        store.add_attempt(job["id"], 1, "again")
    with pytest.raises(ValueError, match="not attempt fields"):
        store.update_attempt(job["id"], 1, ray_job_id="x")


def test_ranks_round_trip(store):
    job = new(store)
    ranks = [
        {"rank": r, "node_rank": r // 2, "local_rank": r % 2, "node_id": f"node{r // 2}",
         "node_ip": f"10.0.0.{r // 2}", "hostname": f"host{r // 2}", "pid": 1000 + r, "exit_code": None}
        for r in (3, 0, 2, 1)
    ]
    store.set_ranks(job["id"], 1, ranks)
    got = store.ranks(job["id"], 1)
    assert [g["rank"] for g in got] == [0, 1, 2, 3]
    for g in got:
        want = next(r for r in ranks if r["rank"] == g["rank"])
        assert {k: g[k] for k in want} == want
        assert g["job_id"] == job["id"] and g["attempt"] == 1
    # replacing a rank (its exit code arrived) and a second attempt
    store.set_ranks(job["id"], 1, [{**ranks[1], "exit_code": 0}])
    store.set_ranks(job["id"], 2, [{"rank": 0, "node_rank": 0, "local_rank": 0}])
    assert store.ranks(job["id"], 1)[0]["exit_code"] == 0
    assert len(store.ranks(job["id"], 1)) == 4
    all_ranks = store.ranks(job["id"])
    assert [(r["attempt"], r["rank"]) for r in all_ranks] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert all_ranks[-1]["node_id"] is None and all_ranks[-1]["pid"] is None


# ---- the file ----------------------------------------------------------------------------------

def test_data_survives_closing_and_reopening(db_path):
    s = Store(db_path)
    a = new(s, "a", priority=250)
    b = new(s, "b", priority=750)
    walk(s, a["id"], S, R)
    s.add_attempt(a["id"], 1, "raysubmit_a")
    s.set_ranks(a["id"], 1, [{"rank": 0, "node_rank": 0, "local_rank": 0, "pid": 7}])
    s.close()

    s2 = Store(db_path)
    try:
        assert s2.get_job(a["id"])["state"] == "RUNNING"
        assert s2.get_job(b["id"]) == b
        assert [t["to_state"] for t in s2.transitions(a["id"])] == ["QUEUED", "STARTING", "RUNNING"]
        assert s2.attempts(a["id"])[0]["ray_job_id"] == "raysubmit_a"
        assert s2.ranks(a["id"], 1)[0]["pid"] == 7
        c = new(s2, "c")
        assert c["seq"] > b["seq"] > a["seq"]
        assert [j["name"] for j in s2.queued_jobs()] == ["b", "c"]
    finally:
        s2.close()


def test_journal_mode_is_wal(store, db_path):
    new(store)
    assert store._one("PRAGMA journal_mode")["journal_mode"] == "wal"
    # WAL is a property of the file: another connection sees it too
    other = sqlite3.connect(str(db_path))
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    finally:
        other.close()


def test_store_creates_the_parent_directory(tmp_path):
    path = tmp_path / "a" / "b" / "c.db"
    s = Store(path)
    try:
        assert path.is_file()
    finally:
        s.close()


# ---- concurrency --------------------------------------------------------------------------------

THREADS, JOBS_PER_THREAD = 8, 50


def _run_threads(worker):
    errors = []

    def wrapped(i):
        try:
            worker(i)
        except BaseException as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def _check_all_landed(store, ids_by_thread):
    ids = [j for ids in ids_by_thread.values() for j in ids]
    assert len(ids) == len(set(ids)) == THREADS * JOBS_PER_THREAD
    assert store.count_by_state() == {"SUCCEEDED": THREADS * JOBS_PER_THREAD}
    for job_id in ids:
        assert [t["to_state"] for t in store.transitions(job_id)] == [
            "QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]


def test_concurrent_transitions_on_different_jobs_all_land(store):
    ids_by_thread: dict[int, list[str]] = {}

    def worker(i):
        ids = ids_by_thread[i] = []
        for k in range(JOBS_PER_THREAD):
            ids.append(new(store, f"t{i}-{k}")["id"])
        for job_id in ids:
            store.transition(job_id, S, "admitted", expect=Q)
            store.transition(job_id, R, "running", expect=S)
            store.transition(job_id, OK, "done", expect=R, exit_code=0)

    _run_threads(worker)
    _check_all_landed(store, ids_by_thread)


def test_concurrent_transitions_through_separate_connections(db_path):
    """Several Store objects (connections) on one file: SQLite's locking, not the
    in-process lock, keeps every write."""
    Store(db_path).close()
    ids_by_thread: dict[int, list[str]] = {}

    def worker(i):
        s = Store(db_path)
        try:
            ids = ids_by_thread[i] = []
            for k in range(JOBS_PER_THREAD):
                job_id = new(s, f"t{i}-{k}")["id"]
                ids.append(job_id)
                walk(s, job_id, S, R, OK)
        finally:
            s.close()

    _run_threads(worker)
    s = Store(db_path)
    try:
        _check_all_landed(s, ids_by_thread)
    finally:
        s.close()
