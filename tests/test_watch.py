"""watch's verdict when a stop (cancel, preemption, the clock) meets ranks that had already
exited 0 before it reached them, but whose exits it had not yet seen: the work is done,
the attempt succeeded. A rank that exits 0 *because of* the SIGTERM was stopped. Real
processes stopped by the ranks' real ``_stop_group``; Ray's waits are replaced by a
round in which nothing has been seen yet (the race CI met: an array item ran twice)."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from raybatch.runtime import rank as rank_mod
from raybatch.runtime import watch as watch_mod
from raybatch.runtime.protocol import Outcome, RankReport
from raybatch.state.states import AttemptOutcome

CATCHES_TERM = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                "print('up', flush=True)\n"
                "time.sleep(60)\n")


class Actor:
    def __init__(self, proc):
        self.proc = proc
        self.wait = SimpleNamespace(remote=lambda: object())


class Gang:
    def __init__(self, procs):
        self.actors = [Actor(p) for p in procs]
        self.spec = SimpleNamespace(grace_period=5.0, stall_timeout=None, max_wall_clock=60.0)

    def terminate(self, grace, only=None):
        return {i: rank_mod._stop_group(a.proc, grace) for i, a in enumerate(self.actors)
                if only is None or i in only}


def unseen(refs, tick):
    yield None  # a round in which no exit has been seen


def run(procs, stop, monkeypatch):
    monkeypatch.setattr(watch_mod, "as_completed", unseen)
    gang = Gang(procs)
    ranks = [RankReport(rank=i, node_rank=i, local_rank=0, node_id=f"n{i}", pid=p.pid) for i, p in enumerate(procs)]
    framework = SimpleNamespace(ends_with_rank0=lambda spec: False)
    outcome = watch_mod.watch(gang, ranks, framework, time.monotonic() + 60, lambda: stop, set(),
                              lambda *a, **k: None, lambda m: None)
    return outcome, ranks


def started(code: str, ready: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    if ready:
        assert p.stdout.readline().strip() == b"up"
    return p


@pytest.mark.parametrize("kind", [AttemptOutcome.CANCELLED, AttemptOutcome.PREEMPTED])
def test_ranks_that_exited_0_before_the_stop_succeeded(monkeypatch, kind):
    procs = [started("pass"), started("pass")]
    for p in procs:
        p.wait()  # exited, and watch has not seen it
    outcome, ranks = run(procs, Outcome(kind, None, "cancelled by user"), monkeypatch)
    assert outcome.succeeded, outcome
    assert "before the stop (cancelled by user)" in outcome.message
    assert [r.exit_code for r in ranks] == [0, 0]


def test_a_rank_that_exits_0_on_sigterm_was_stopped(monkeypatch):
    procs = [started("pass"), started(CATCHES_TERM, ready=True)]
    procs[0].wait()
    outcome, ranks = run(procs, Outcome(AttemptOutcome.CANCELLED, None, "cancelled by user"), monkeypatch)
    assert outcome.kind is AttemptOutcome.CANCELLED
    assert [r.exit_code for r in ranks] == [0, 0]  # both 0; one of them only because it was told to stop


def test_a_rank_that_had_failed_before_the_stop_is_not_a_success(monkeypatch):
    procs = [started("pass"), started("raise SystemExit(3)")]
    for p in procs:
        p.wait()
    outcome, _ = run(procs, Outcome(AttemptOutcome.PREEMPTED, None, "preempted"), monkeypatch)
    assert outcome.kind is AttemptOutcome.PREEMPTED
