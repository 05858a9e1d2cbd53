"""The chaos run in the suite (issue 19): a short, seeded run of tests/chaos_engine.py, the
engine benchmarks/chaos.py runs for long, on its own 3-node Ray cluster, real server and
Azurite: a stream of no-op, failing, cancelled and payload-writing jobs (blob datastore and
server disk) while a raylet, a rank and a driver get SIGKILL, the server is killed with
``kill -9`` and restarted, and Azurite is stopped and started. Every invariant must hold.

The DDP and MPI recipes and the full state disk are left to the long run (torch's start-up
alone would take a third of this test's budget on a loaded machine). Deselect with
``-m "not chaos"``.

The invariant checks themselves are tested first, on made-up histories, so that a run
that "holds" is known to be able to break."""

from __future__ import annotations

import os
import subprocess
import time
from types import SimpleNamespace as NS

import pytest

from raybatch.state.states import JobState
from tests.chaos_engine import Chaos, ChaosConfig, Fault, job_of, run_chaos
from tests.conftest import wait_for

REQUIRED = {"raylet", "rank", "server", "azurite"}


# ---- the checks can fail ------------------------------------------------------------------
def _job(job_id, name, state, transitions, attempts):
    return NS(id=job_id, name=name, state=JobState(state), reason="", ended_at=None,
              transitions=[NS(from_state=JobState(a) if a else None, to_state=JobState(b), at=0.0, reason="")
                           for a, b in transitions],
              attempts=[NS(n=i + 1, started_at=s, ended_at=e, outcome=o, exit_code=None, reason="", ranks=ranks)
                        for i, (s, e, o, ranks) in enumerate(attempts)])


LOST_THEN_OK = [(None, "QUEUED"), ("QUEUED", "STARTING"), ("STARTING", "RUNNING"), ("RUNNING", "RESTARTING"),
                ("RESTARTING", "QUEUED"), ("QUEUED", "STARTING"), ("STARTING", "RUNNING"),
                ("RUNNING", "SUCCEEDED")]


@pytest.fixture
def checker(tmp_path):
    c = Chaos(ChaosConfig(workdir=tmp_path, process_grace_s=0.0))
    c.marks.mkdir()
    return c


def test_an_unexplained_outcome_or_a_bad_history_is_broken(checker):
    job = _job("rb-1", "chaos-blob-1", "SUCCEEDED", LOST_THEN_OK,
               [(100.0, 110.0, "NODE_LOST", []), (111.0, 120.0, "SUCCEEDED", [])])
    checker.report.jobs = {"rb-1": job}
    assert "attempt 1 ended NODE_LOST" in " ".join(checker._inv_terminal())  # no fault to explain it
    checker.report.faults = [Fault("raylet", 105.0, "node x", "rb-1", 1, until=106.0)]
    assert checker._inv_terminal() == []
    checker.report.broken = {"an invariant": ["its evidence"]}
    table = checker.report.table()
    assert "jobs run: 1" in table and "BROKEN: an invariant" in table and "    - its evidence" in table
    job.transitions.pop(3)  # RUNNING -> QUEUED is no edge of the state machine
    assert "history RUNNING then RESTARTING -> QUEUED" in " ".join(checker._inv_terminal())
    fail = _job("rb-2", "chaos-fail-2", "SUCCEEDED", LOST_THEN_OK[:3] + [("RUNNING", "SUCCEEDED")],
                [(1.0, 2.0, "SUCCEEDED", [])])
    checker.report.jobs = {"rb-2": fail}
    assert any("exits 3 but SUCCEEDED" in e for e in checker._inv_terminal())


def test_attempts_that_overlap_or_run_twice_are_broken(checker):
    job = _job("rb-3", "chaos-local-3", "SUCCEEDED", LOST_THEN_OK,
               [(100.0, 110.0, "NODE_LOST", []), (111.0, 120.0, "SUCCEEDED", [])])
    checker.report.jobs = {"rb-3": job}
    marks = checker.marks / "rb-3.marks"
    marks.write_text("start 1 0 100.5 1\nstart 2 0 111.5 2\nend 2 0 119.0 2\n")
    assert checker._inv_overlap() == []
    marks.write_text("start 1 0 100.5 1\nend 1 0 112.0 1\nstart 2 0 111.5 2\nend 2 0 119.0 2\n")
    assert "still running at 112.000" in " ".join(checker._inv_overlap())
    marks.write_text("start 1 0 100.5 1\nstart 1 0 101.5 3\nstart 2 0 111.5 2\n")
    assert "attempt 1 rank 0 started 2 times" in " ".join(checker._inv_overlap())
    job.attempts[0].ended_at = 112.0  # attempt 2 started before attempt 1 had ended
    assert "attempt 1 ended at 112.0 after attempt 2 started" in " ".join(checker._inv_overlap())


def test_a_left_process_and_an_unanswered_request_are_broken(checker):
    job = _job("rb-4", "chaos-noop-4", "SUCCEEDED", LOST_THEN_OK[:3] + [("RUNNING", "SUCCEEDED")],
               [(1.0, 2.0, "SUCCEEDED", [])])
    checker.report.jobs = {"rb-4": job}
    proc = subprocess.Popen(["sleep", "30"], env={**os.environ, "RAYBATCH_JOB_ID": "rb-4"})
    try:
        wait_for(lambda: job_of(proc.pid) == "rb-4", 10, "sleep to exec with its environment")
        job.attempts[0].ranks = [NS(rank=0, pid=proc.pid, role="rank")]
        assert f"pid {proc.pid}" in " ".join(checker._inv_processes())
    finally:
        proc.kill()
        proc.wait()
    assert checker._inv_processes() == []

    now = time.time()
    checker.server_down, checker.disk_full = [[now, now + 5]], [[now + 10, now + 12]]
    checker.requests.rows = [(now + 1, "GET", "/jobs", None, "ConnectError"), (now + 11, "POST", "/jobs", 503, "")]
    assert checker._inv_requests() == []
    checker.requests.rows += [(now + 8, "GET", "/jobs", None, "ConnectError"), (now + 11, "GET", "/jobs", 500, ""),
                              (now + 20, "POST", "/jobs", 503, "")]
    assert len(checker._inv_requests()) == 3


# ---- the run -------------------------------------------------------------------------------
@pytest.mark.chaos
@pytest.mark.timeout(280)
def test_short_chaos_run_breaks_no_invariant():
    cfg = ChaosConfig(seed=19, minutes=1.0, jobs_per_minute=12, faults=tuple(sorted(REQUIRED | {"driver"})),
                      kinds={"noop": 2, "fail": 1, "cancel": 1, "blob": 3, "local": 2},
                      fault_every_s=3.0, first_fault_s=5.0, drain_s=75.0, recovery_limit_s=60.0)
    t0 = time.monotonic()
    report = run_chaos(cfg)
    print(report.table())
    print(f"chaos run: {time.monotonic() - t0:.0f} s")
    assert REQUIRED <= {f.kind for f in report.faults}, (report.skipped, report.table())
    assert not report.broken, report.table()
    assert len(report.jobs) >= 8, report.table()
    states = {d.state.value for d in report.jobs.values()}
    assert {"SUCCEEDED", "FAILED"} <= states, report.table()
    assert all(f.recovered_s is not None for f in report.faults), report.table()
