"""The scheduler loop: reconcile -> cancel -> nominate -> fit -> admit.

- reconcile: for each STARTING/RUNNING job, read its driver's report and its Ray
  Job; record where ranks run; end the attempt when the Ray Job is over.
- cancel: stop the Ray Jobs of jobs a user cancelled.
- admit: walk the queue in order (priority, then submission); a job starts only
  when its whole gang fits the live nodes' free resources, node by node. For
  now the queue is strict: the first job that does not fit blocks those behind it.

Every state change is written to the store before it is acted on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from raybatch.runtime.launcher import RayJobLauncher, ray_job_id
from raybatch.scheduler import fit
from raybatch.scheduler.cluster import RayClusterView
from raybatch.spec.job import JobSpec
from raybatch.state.states import AttemptOutcome, JobState
from raybatch.state.store import Store

log = logging.getLogger("raybatch.scheduler")
STOP_ESCALATION_S = 30.0  # beyond the job's grace period, before `ray job stop`


def _spec(job: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate_json(job["spec"])


class Scheduler:
    def __init__(self, store: Store, launcher: RayJobLauncher, cluster: RayClusterView,
                 tick: float = 0.5):
        self.store = store
        self.launcher = launcher
        self.cluster = cluster
        self.tick = tick
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._stop_sent: set[str] = set()
        self._killed: set[str] = set()
        self._submit_failures = 0       # consecutive Ray Job submissions that failed
        self._submit_retry_at = 0.0     # no admission before this (monotonic) time
        self.waiting: dict[str, str] = {}  # job id -> why it is still queued
        self._unplaced: list[dict[str, Any]] = []
        self.last_cycle_error: Optional[str] = None

    # ---- driving the loop -------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def run_forever(self) -> None:
        while not self._stopped.is_set():
            try:
                self.cycle()
                self.last_cycle_error = None
            except Exception as e:  # noqa: BLE001 - the loop must survive a bad cycle
                self.last_cycle_error = f"{type(e).__name__}: {e}"
                log.exception("scheduler cycle failed")
            self._wake.wait(self.tick)
            self._wake.clear()

    def cycle(self) -> None:
        self.reconcile()
        self.admit()

    # ---- reconcile running attempts -------------------------------------------
    def reconcile(self) -> None:
        self._unplaced: list[dict[str, Any]] = []  # STARTING, gang not placed yet: see admit()
        for job in self.store.active_jobs():
            self._reconcile_one(job)

    def _reconcile_one(self, job: dict[str, Any]) -> None:
        job_id, n = job["id"], job["attempt"]
        attempt = self.store.get_attempt(job_id, n)
        sid = attempt["ray_job_id"] if attempt else ray_job_id(job_id, n)
        if attempt is None:  # the server died between the transition and recording the attempt
            self.store.add_attempt(job_id, n, sid)
        if job["cancel_requested"]:
            self._stop(job, sid, "cancel")
        report = self.launcher.report(job_id, n) or {}
        if job["state"] == JobState.STARTING.value and report.get("phase") in ("running", "stopping", "done") \
                and report.get("ranks"):
            self.store.set_ranks(job_id, n, report["ranks"])
            self.store.update_attempt(job_id, n, running_at=report.get("at"))
            nodes = len({r["node_id"] for r in report["ranks"]})
            job = self.store.transition(
                job_id, JobState.RUNNING,
                f"all {len(report['ranks'])} ranks running on {nodes} node(s)",
                expect=JobState.STARTING, started_at=job["started_at"] or report.get("at"),
            )
        # "done" is written after every rank's process group is gone and the placement
        # group is removed, so the attempt can end before Ray marks its job finished.
        ray_state = None if report.get("phase") == "done" else self.launcher.state(sid)
        if ray_state is not None and not ray_state.terminal:
            if job["state"] == JobState.STARTING.value:
                self._unplaced.append(job)
            return
        if ray_state is None:
            outcome = AttemptOutcome(report["outcome"])
            code, message = report.get("exit_code"), report.get("message", "")
            if report.get("ranks"):
                self.store.set_ranks(job_id, n, report["ranks"])
            if report.get("lost_nodes"):
                self.store.update_attempt(job_id, n, lost_nodes=report["lost_nodes"])
        elif ray_state.status == "MISSING" and not report:
            # the server died before the Ray job was submitted: nothing ran, nothing is charged
            self.store.update_attempt(job_id, n, ended_at=time.time(),
                                      outcome=AttemptOutcome.START_FAILED.value,
                                      reason="the Ray job was never submitted")
            self.store.transition(job_id, JobState.RESTARTING, "attempt's Ray job was never submitted")
            self.store.transition(job_id, JobState.QUEUED, "requeued")
            return
        else:
            outcome, code = AttemptOutcome.DRIVER_LOST, None
            message = f"the attempt's Ray job ended {ray_state.status} without a report"
            if ray_state.message:
                message += f": {ray_state.message}"
        if job["cancel_requested"]:
            outcome = AttemptOutcome.CANCELLED
            message = "cancelled by user"
        self._stop_sent.discard(sid)
        self._killed.discard(sid)
        self.end_attempt(job, outcome, code, message)

    def _stop(self, job: dict[str, Any], sid: str, action: str) -> None:
        """Ask the driver to stop the gang (it gives each rank its grace period); if
        it has not finished well after that, have Ray stop the driver itself."""
        if sid not in self._stop_sent:
            self.launcher.request_stop(job["id"], job["attempt"], action)
            self._stop_sent.add(sid)
        grace = _spec(job).grace_period
        if time.time() - job["cancel_requested"] > grace + STOP_ESCALATION_S and sid not in self._killed:
            log.warning("%s did not stop within %.0f s: stopping its Ray job", sid, grace + STOP_ESCALATION_S)
            self.launcher.stop(sid)
            self._killed.add(sid)

    def end_attempt(self, job: dict[str, Any], outcome: AttemptOutcome, code: Optional[int],
                    message: str) -> None:
        """One way to end an attempt; the retry policy picks the job's next state."""
        job_id, n = job["id"], job["attempt"]
        self.store.update_attempt(job_id, n, ended_at=time.time(), outcome=outcome.value,
                                  exit_code=code, reason=message)
        spec = _spec(job)
        reason = f"attempt {n}: {outcome.value}: {message}"
        # a stall is the user's: it draws on the user budget, whatever the exit code filter
        user_failure = outcome in (AttemptOutcome.USER_ERROR, AttemptOutcome.STALLED)
        retryable = outcome == AttemptOutcome.STALLED or spec.retries.retries_user_error(code)
        if outcome == AttemptOutcome.SUCCEEDED:
            self.store.transition(job_id, JobState.SUCCEEDED, reason, exit_code=0)
        elif outcome == AttemptOutcome.CANCELLED:
            self.store.transition(job_id, JobState.CANCELLED, reason, exit_code=code)
        elif outcome == AttemptOutcome.PREEMPTED:
            self.store.transition(job_id, JobState.PREEMPTED, reason)
            self.store.transition(job_id, JobState.QUEUED, "requeued after preemption")
        elif outcome.is_infrastructure and job["infra_retries"] < spec.retries.infrastructure:
            used = job["infra_retries"] + 1
            self.store.transition(job_id, JobState.RESTARTING, reason, infra_retries=used)
            self.store.transition(
                job_id, JobState.QUEUED,
                f"requeued: infrastructure retry {used} of {spec.retries.infrastructure}",
            )
        elif user_failure and retryable and job["user_retries"] < spec.retries.user:
            used = job["user_retries"] + 1
            self.store.transition(job_id, JobState.RESTARTING, reason, user_retries=used)
            self.store.transition(
                job_id, JobState.QUEUED, f"requeued: user-error retry {used} of {spec.retries.user}"
            )
        else:
            if user_failure and not retryable:
                reason += f" (exit code {code} is not in retries.user_exit_codes)"
            elif outcome.is_infrastructure or user_failure:
                reason += " (no retries left)"
            self.store.transition(job_id, JobState.FAILED, reason,
                                  exit_code=code if code is not None else 1)
        self.wake()

    # ---- admission -----------------------------------------------------------
    def _pending_demand(self, nodes: list[fit.NodeView]) -> None:
        """Attempts admitted but not yet placed hold no Ray resources yet: subtract
        them from the snapshot so the same free nodes are not handed out twice.
        (``reconcile``, earlier in the same cycle, found them.)"""
        for job in self._unplaced:
            spec = _spec(job)
            bundle = spec.resources.as_ray_bundle()
            placed = fit.gang_fit(nodes, bundle, spec.nodes, spec.placement.strategy)
            if placed:
                fit.reserve(nodes, placed, bundle)

    def admit(self) -> None:
        queued = self.store.queued_jobs()
        if not queued:
            self.waiting.clear()
            return
        if time.monotonic() < self._submit_retry_at:  # the last Ray Job submission failed
            wait_s = self._submit_retry_at - time.monotonic()
            self.waiting = {j["id"]: f"Ray Job submission failed {self._submit_failures} time(s) in a row; "
                                     f"retrying in {wait_s:.0f} s" for j in queued}
            return
        nodes = self.cluster.snapshot()
        self._pending_demand(nodes)
        waiting: dict[str, str] = {}
        blocked_by: Optional[str] = None
        for job in queued:
            if blocked_by is not None:
                waiting[job["id"]] = f"behind {blocked_by} in the queue"
                continue
            spec = _spec(job)
            bundle = spec.resources.as_ray_bundle()
            # keep away from nodes where this job lost a rank, when the gang fits elsewhere
            avoid = self.store.lost_nodes(job["id"]) if job["attempt"] else set()
            placed = None
            if avoid:
                placed = fit.gang_fit([n for n in nodes if n.node_id not in avoid], bundle, spec.nodes,
                                      spec.placement.strategy)
            if placed is None:
                avoid = set()
                placed = fit.gang_fit(nodes, bundle, spec.nodes, spec.placement.strategy)
            if placed is None:
                waiting[job["id"]] = fit.why_not(nodes, bundle, spec.nodes, spec.placement.strategy)
                blocked_by = job["id"]
                continue
            fit.reserve(nodes, placed, bundle)
            if not self._start(job, avoid):
                break
        self.waiting = waiting

    def _start(self, job: dict[str, Any], avoid_nodes: set[str]) -> bool:
        """Admit ``job``: record the attempt, then submit its Ray Job. False if the
        submission failed (the job is back in the queue, no retry budget charged)."""
        n = job["attempt"] + 1
        job = self.store.transition(job["id"], JobState.STARTING,
                                    f"gang of {_spec(job).nodes} node(s) fits; starting attempt {n}",
                                    expect=JobState.QUEUED, attempt=n)
        sid = ray_job_id(job["id"], n)
        self.store.add_attempt(job["id"], n, sid)  # intent first: a crash here is reconciled
        try:
            self.launcher.submit(job, n, avoid_nodes)
        except Exception as e:  # noqa: BLE001 - the Ray dashboard may be down
            log.warning("submitting %s attempt %d failed: %s", job["id"], n, e)
            message = f"could not submit the Ray job: {type(e).__name__}: {e}"
            self.store.update_attempt(job["id"], n, ended_at=time.time(),
                                      outcome=AttemptOutcome.START_FAILED.value, reason=message)
            self.store.transition(job["id"], JobState.RESTARTING, message)
            self.store.transition(job["id"], JobState.QUEUED, "requeued")
            self._submit_failures += 1
            self._submit_retry_at = time.monotonic() + min(60.0, 2.0 ** self._submit_failures)
            return False
        self._submit_failures = 0
        return True
