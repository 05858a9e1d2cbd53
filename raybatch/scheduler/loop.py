"""The scheduler loop: reconcile -> plan -> act.

- reconcile: for each STARTING/RUNNING job, read its driver's report and its Ray
  Job; record where ranks run; stop jobs that were cancelled or preempted; end
  the attempt when the Ray Job is over (one retry policy: ``end_attempt``).
- plan: hand the live nodes, the running jobs and the queue to the policy
  (``policy.plan``: priorities, fair share, quotas, gang fit, EASY backfill,
  preemption).
- act: ask victims to stop, submit the admitted jobs pinned to the nodes the
  policy chose, record why every other job waits, and tell the autoscaler what
  the queue needs.

Every state change is written to the store before it is acted on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

from raybatch.errors import SpecError
from raybatch.runtime.launcher import AttemptSetupError, RayJobLauncher
from raybatch.runtime.protocol import Phase, Report, plain_reason, ray_job_id
from raybatch.scheduler import fit, policy
from raybatch.scheduler.cluster import RayClusterView
from raybatch.scheduler.deadline_jobs import DeadlineJobs
from raybatch.scheduler.evictions import Evictions
from raybatch.scheduler.queue import QueueFollower
from raybatch.scheduler.simulate import SimJob, simulate
from raybatch.spec.job import JobSpec
from raybatch.spec.policy import SchedulerPolicy, load_policy
from raybatch.state.states import AttemptOutcome, InvalidTransition, JobState, preempted_words
from raybatch.state.store import SLOT_GRANTED, SLOT_REVOKED, Step, Store

log = logging.getLogger("raybatch.scheduler")
STOP_ESCALATION_S = 30.0  # beyond the job's grace period, before `ray job stop`
STOP_SLACK_S = 5.0        # after the grace period, until a stopped gang's resources are back
SYNC_HEARTBEAT_S = 30.0   # a driver in its final upload reports at least this often
MIN_CYCLE_GAP_S = 0.2     # submissions wake the loop; at most one cycle per this long
RESYNC_S = 60.0           # re-read the whole queue this often (it is followed incrementally)
VIEW_LAG_S = 2.0          # Ray's resource view may show a gang placed/removed this much later
SETTLE_S = 5.0            # after a victim ends, its head preempts no one else for this long


def _spec(job: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate_json(job["spec"])


def _placed(report: Optional[Report]) -> bool:
    """Does Ray's resource view already show this attempt's gang?"""
    return report is not None and report.shows_placed(VIEW_LAG_S)


class Scheduler:
    def __init__(self, store: Store, launcher: RayJobLauncher, cluster: RayClusterView,
                 tick: float = 0.5, policy_file: Optional[Path] = None, autoscaler: Any = None):
        self.store = store
        self.launcher = launcher
        self.cluster = cluster
        self.tick = tick
        self.policy_file = policy_file
        self.policy = SchedulerPolicy()
        self.policy_error: Optional[str] = None
        self._policy_mtime: Optional[float] = None
        self.autoscaler = autoscaler    # raybatch.scheduler.autoscale.Demand, or None
        self._specs: dict[str, JobSpec] = {}          # job id -> spec (specs never change)
        self.queue = QueueFollower(store, self._specs.get, RESYNC_S)
        self._settling: dict[str, float] = {}  # head job -> when one of its victims ended
        self._active: list[dict[str, Any]] = []
        self.reservation: Optional[policy.Reservation] = None
        self.last_inputs: Optional[tuple] = None      # (now, nodes, running) of the last plan
        self.stats: dict[str, float] = {"cycles": 0, "last_cycle_ms": 0.0, "last_plan_ms": 0.0,
                                        "queued": 0, "active": 0}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._stop_sent: set[str] = set()
        self._killed: set[str] = set()
        self._submit_failures = 0       # consecutive Ray Job submissions that failed
        self._submit_retry_at = 0.0     # no admission before this (monotonic) time
        self._control_synced: set[tuple[str, int]] = set()  # attempts whose control.json matches the store
        self.waiting: dict[str, str] = {}  # job id -> why it (an array job: its next slot) is still queued
        self.slot_counts: dict[str, tuple[int, int]] = {}  # active array job -> (slots held, wanted)
        self._unplaced: list[dict[str, Any]] = []
        self.last_cycle_error: Optional[str] = None   # the cycle's, else its hooks' (hooks_error)
        self.cycle_hooks: list[Any] = []  # called with the scheduler after each cycle (nodes.NodeRecorder)
        self.hook_errors: dict[str, str] = {}  # hook -> what it raised in its last call (each runs apart)
        # gangs on nodes drained for preemption are stopped at once (a cluster view that can tell)
        self.evictions = Evictions(cluster) if hasattr(cluster, "draining") else None
        if self.evictions is not None:
            self.cycle_hooks.append(self.evictions)
        # jobs with a deadline: spot or dedicated nodes each cycle (apply, in admit), and their
        # progress and restart overhead (a hook)
        self.deadlines = DeadlineJobs(store, getattr(launcher, "datastores", None))
        self.cycle_hooks.append(self.deadlines)

    # ---- driving the loop -------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def run_forever(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self.cycle()
                self.last_cycle_error = self.hooks_error()
            except Exception as e:  # noqa: BLE001 - the loop must survive a bad cycle
                self.last_cycle_error = f"{type(e).__name__}: {e}"
                log.exception("scheduler cycle failed")
            self._wake.wait(self.tick)
            self._wake.clear()
            # a burst of submissions must not turn into a cycle per submission
            gap = min(MIN_CYCLE_GAP_S, self.tick) - (time.monotonic() - started)
            if gap > 0 and not self._stopped.is_set():
                time.sleep(gap)

    def cycle(self) -> None:
        t0 = time.perf_counter()
        self.reconcile()
        self.admit()
        for hook in list(self.cycle_hooks):
            self._run_hook(hook)
        self.stats["cycles"] += 1
        self.stats["last_cycle_ms"] = (time.perf_counter() - t0) * 1000

    @staticmethod
    def _hook_name(hook: Any) -> str:
        return getattr(hook, "__name__", None) or type(hook).__name__

    def _run_hook(self, hook: Any) -> None:
        """One cycle hook: what it raises is recorded (logged once per distinct error) and
        keeps neither the other hooks nor the cycle's stats from running."""
        name = self._hook_name(hook)
        try:
            hook(self)
        except Exception as e:  # noqa: BLE001 - a hook's failure must not stop the cycle
            error = f"{type(e).__name__}: {e}"
            if self.hook_errors.get(name) != error:
                log.exception("scheduler cycle hook %s failed (the cycle goes on)", name)
            self.hook_errors[name] = error
        else:
            if self.hook_errors.pop(name, None) is not None:
                log.info("scheduler cycle hook %s runs again", name)

    def hooks_error(self) -> Optional[str]:
        """The cycle hooks' current problems, one string (None: none): what a hook raised,
        or what it reports itself in its ``error`` (a GCS read that failed, an eviction
        that could not be made)."""
        errors = {}
        for hook in list(self.cycle_hooks):
            name = self._hook_name(hook)
            reported = getattr(hook, "error", None)
            error = self.hook_errors.get(name) or (reported if isinstance(reported, str) else None)
            if error:
                errors[name] = error
        return "; ".join(f"cycle hook {k}: {v}" for k, v in errors.items()) or None

    def spec_of(self, job: dict[str, Any]) -> JobSpec:
        spec = self._specs.get(job["id"])
        if spec is None:
            spec = self._specs[job["id"]] = _spec(job)
        return spec

    def load_policy(self) -> None:
        """(Re)read the policy file when it changes; a bad file keeps the last good policy."""
        if self.policy_file is None:
            return
        try:
            mtime = self.policy_file.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime == self._policy_mtime:
            return
        self._policy_mtime = mtime
        try:
            self.policy = load_policy(self.policy_file)
            self.policy_error = None
            log.info("scheduler policy loaded from %s", self.policy_file)
        except SpecError as e:
            self.policy_error = str(e)
            log.error("%s (keeping the previous policy)", e)

    # ---- reconcile running attempts -------------------------------------------
    def reconcile(self) -> None:
        self._unplaced: list[dict[str, Any]] = []  # STARTING, gang not placed yet: see admit()
        self._active = []                          # still running after this pass
        for job in self.store.active_jobs():
            self._reconcile_one(job)

    def _reconcile_one(self, job: dict[str, Any]) -> None:
        job_id, n = job["id"], job["attempt"]
        attempt = self.store.get_attempt(job_id, n)
        sid = attempt["ray_job_id"] if attempt else ray_job_id(job_id, n)
        if attempt is None:  # the server died between the transition and recording the attempt
            self.store.add_attempt(job_id, n, sid)
            attempt = self.store.get_attempt(job_id, n)
        if job["cancel_requested"]:
            self._stop(job, sid, "cancel", job["cancel_requested"])
        elif job["preempt_requested"]:
            self._stop(job, sid, "preempt", job["preempt_requested"], preempted_words(job["preempted_by"]))
        report = self.report(job_id, n)
        spec = self.spec_of(job)
        if job["state"] == JobState.STARTING.value and report and report.phase.ranks_started \
                and (report.ranks or report.slots):
            self.store.set_ranks(job_id, n, [r.model_dump() for r in report.ranks])
            self.store.update_attempt(job_id, n, running_at=report.at or None)
            nodes = len({r.node_id for r in report.ranks})
            job = self.store.transition(
                job_id, JobState.RUNNING,
                f"all {len(report.ranks)} ranks running on {nodes} node(s)",
                expect=JobState.STARTING, started_at=job["started_at"] or report.at or None,
            )
        if spec.slots is not None:
            self._sync_slots(job, report)
        # DONE is written after every rank's process group is gone and the placement
        # group is removed, so the attempt can end before Ray marks its job finished.
        done = report is not None and report.phase is Phase.DONE
        ray_state = None if done else self.launcher.state(sid)
        if ray_state is not None and not ray_state.terminal:
            job["_attempt"] = attempt
            job["_report"] = report
            self._active.append(job)
            # an array job's gangs are its slots, each placed on its own (_running)
            if job["state"] == JobState.STARTING.value and spec.slots is None and not _placed(report):
                self._unplaced.append(job)
            return
        if ray_state is None:
            assert report is not None
            outcome = report.outcome or AttemptOutcome.DRIVER_LOST
            code, message = report.exit_code, report.message
            if report.ranks:
                self.store.set_ranks(job_id, n, [r.model_dump() for r in report.ranks])
            if report.lost_nodes:
                self.store.update_attempt(job_id, n, lost_nodes=report.lost_nodes)
                if outcome is AttemptOutcome.NODE_LOST and self.evictions is not None:
                    notice = self.evictions.with_notice(report.lost_nodes)  # a spot eviction with notice
                    if notice:
                        outcome, message = AttemptOutcome.EVICTED, f"{message} ({notice})"
        elif ray_state.status == "MISSING" and report is None:
            # the server died before the Ray job was submitted: nothing ran, nothing is charged
            self._attempt_over(job_id, n)
            ended = (n, dict(ended_at=time.time(), outcome=AttemptOutcome.START_FAILED.value,
                             reason="the Ray job was never submitted"))
            if job["cancel_requested"]:
                self.store.chain(job_id, [Step(JobState.CANCELLED, "cancelled by user before it started")],
                                 attempt=ended)
                return
            self.store.chain(job_id, [Step(JobState.RESTARTING, "attempt's Ray job was never submitted",
                                           {"preempt_requested": None}),
                                      Step(JobState.QUEUED, "requeued")], attempt=ended)
            return
        else:
            outcome, code = AttemptOutcome.DRIVER_LOST, None
            message = f"the attempt's Ray job ended {ray_state.status} without a report"
            if ray_state.message:
                message += f": {ray_state.message}"
        # what the driver could not upload (and where the copies are) must survive the relabel
        m = re.search(r"\d+ file\(s\) not uploaded: .*$", message or "")
        not_out = m.group(0) if m else ""
        if job["cancel_requested"]:
            outcome = AttemptOutcome.CANCELLED
            message = "cancelled by user" + (f"; {not_out}" if not_out else "")
        elif job["preempt_requested"] and outcome != AttemptOutcome.SUCCEEDED:
            outcome, code = AttemptOutcome.PREEMPTED, None
            message = preempted_words(job["preempted_by"]) + (f"; {not_out}" if not_out else "")
        self._stop_sent -= {f"{sid}:cancel", f"{sid}:preempt"}
        self._killed.discard(sid)
        self.end_attempt(job, outcome, code, message)

    def _stop(self, job: dict[str, Any], sid: str, action: str, since: float, reason: str = "") -> None:
        """Ask the driver to stop the gang (it gives each rank its grace period); if
        it has not finished well after that, have Ray stop the driver itself."""
        key = f"{sid}:{action}"  # a cancel after a preemption request is sent too
        if key not in self._stop_sent:
            self.launcher.request_stop(job["id"], job["attempt"], action, reason)
            self._stop_sent.add(key)
        grace = self.spec_of(job).grace_period
        if time.time() - since > grace + STOP_ESCALATION_S and sid not in self._killed:
            report = self.report(job["id"], job["attempt"])
            if report and report.phase is Phase.SYNCING and time.time() - report.at < SYNC_HEARTBEAT_S:
                return  # the gang has stopped; its driver is uploading the last outputs
            log.warning("%s did not stop within %.0f s: stopping its Ray job", sid, grace + STOP_ESCALATION_S)
            self.launcher.stop(sid)
            self._killed.add(sid)

    def report(self, job_id: str, n: int) -> Optional[Report]:
        """The attempt's driver's latest report (launchers may hand it over as a dict)."""
        report = self.launcher.report(job_id, n)
        return Report.model_validate(report) if report is not None else None

    def _discard_secrets(self, job_id: str, n: int) -> None:
        """The attempt is over: its storage credentials file goes (a driver that never
        ran did not remove it)."""
        discard = getattr(self.launcher, "discard_secrets", None)
        if discard is not None:
            discard(job_id, n)

    def end_attempt(self, job: dict[str, Any], outcome: AttemptOutcome, code: Optional[int],
                    message: str) -> None:
        """One way to end an attempt; the retry policy picks the job's next state."""
        job_id, n = job["id"], job["attempt"]
        message = plain_reason(message)  # one line: Ray's messages may carry a traceback
        now = time.time()
        self._attempt_over(job_id, n)  # an array job's slots end with its attempt
        if self.evictions is not None:
            self.evictions.forget(job_id, n)
        ended = (n, dict(ended_at=now, outcome=outcome.value, exit_code=code, reason=message))
        spec = self.spec_of(job)
        if outcome == AttemptOutcome.PREEMPTED and job["preempted_by"]:
            # Ray's view shows the victim's nodes busy a moment longer: its head must not
            # take that for a reason to preempt one more job
            self._settling[job["preempted_by"]] = now
        reason = f"attempt {n}: {outcome.value}: {message}"
        # a stall is the user's: it draws on the user budget, whatever the exit code filter
        user_failure = outcome in (AttemptOutcome.USER_ERROR, AttemptOutcome.STALLED)
        retryable = outcome == AttemptOutcome.STALLED or spec.retries.retries_user_error(code)
        # the attempt's end and the job's next states: one transaction (Store.chain)
        if outcome == AttemptOutcome.SUCCEEDED:
            steps = [Step(JobState.SUCCEEDED, reason, {"exit_code": 0})]
        elif outcome == AttemptOutcome.CANCELLED:
            steps = [Step(JobState.CANCELLED, reason, {"exit_code": code})]
        elif outcome == AttemptOutcome.PREEMPTED:
            steps = [Step(JobState.PREEMPTED, reason, {"preempt_requested": None,
                                                        "preemptions": job["preemptions"] + 1}),
                     Step(JobState.QUEUED, "requeued after preemption: it keeps its place in the queue and "
                                           "resumes from its checkpoint dir")]
        elif outcome == AttemptOutcome.EVICTED and not spec.retries.evictions_exhausted(job["evictions"]):
            limit = spec.retries.evictions
            count = f" {job['evictions'] + 1} of {limit}" if limit is not None else f" {job['evictions'] + 1}"
            steps = [Step(JobState.PREEMPTED, reason, {"evictions": job["evictions"] + 1}),
                     Step(JobState.QUEUED, f"requeued after eviction{count}: it keeps its place in the queue "
                                           "and resumes from its checkpoint dir")]
        elif outcome.is_infrastructure and job["infra_retries"] < spec.retries.infrastructure:
            used = job["infra_retries"] + 1
            steps = [Step(JobState.RESTARTING, reason, {"infra_retries": used}),
                     Step(JobState.QUEUED, f"requeued: infrastructure retry {used} of {spec.retries.infrastructure}")]
        elif user_failure and retryable and job["user_retries"] < spec.retries.user:
            used = job["user_retries"] + 1
            steps = [Step(JobState.RESTARTING, reason, {"user_retries": used}),
                     Step(JobState.QUEUED, f"requeued: user-error retry {used} of {spec.retries.user}")]
        else:
            if user_failure and not retryable:
                reason += f" (exit code {code} is not in retries.user_exit_codes)"
            elif outcome.is_infrastructure or user_failure:
                reason += " (no retries left)"
            failed = {"exit_code": code if code is not None else 1}
            if outcome == AttemptOutcome.EVICTED:
                reason += f" (evicted {job['evictions'] + 1} time(s): retries.evictions is {spec.retries.evictions})"
                failed["evictions"] = job["evictions"] + 1
            steps = [Step(JobState.FAILED, reason, failed)]
        self.store.chain(job_id, steps, attempt=ended)
        self.wake()

    # ---- array jobs' slots -------------------------------------------------------
    def _attempt_over(self, job_id: str, attempt: int) -> None:
        """An attempt ended (or never started): its credentials file goes, its slots are
        released, and the scheduler forgets it."""
        self._discard_secrets(job_id, attempt)
        self.store.release_slots(job_id, attempt)
        self._control_synced.discard((job_id, attempt))

    def _sync_slots(self, job: dict[str, Any], report: Optional[Report]) -> None:
        """Slots the driver has given back (drained, preempted, lost, or the tail's) are
        released in the store; the jobs that preempted them may start."""
        live = {r["slot"]: r for r in self.store.slots(job["id"], job["attempt"], live=True)}
        key = (job["id"], job["attempt"])
        if key not in self._control_synced:
            # once per attempt and server: a server killed between the store's write and the
            # control file's would otherwise leave a grant or revocation the driver never sees
            self.launcher.sync_slots(job["id"], job["attempt"], list(live.values()))
            self._control_synced.add(key)
        gone = [s.slot for s in (report.slots if report else []) if s.gone and s.slot in live]
        if gone:
            self.store.release_slots(job["id"], job["attempt"], gone)
            for k in gone:
                if live[k]["preempted_by"]:
                    self._settling[live[k]["preempted_by"]] = time.time()
            live = {k: r for k, r in live.items() if k not in gone}
        job["_slots"] = list(live.values())

    def _slot_views(self, job: dict[str, Any], spec: JobSpec, nodes: list[fit.NodeView]) -> list[policy.Job]:
        """An active array job's live slots, as running jobs of the policy. A slot not
        placed yet holds no Ray resources: it is subtracted from ``nodes`` (see _running);
        one placed is in Ray's view (after VIEW_LAG_S) for as long as it lives, whatever
        its driver does with it meanwhile."""
        report: Optional[Report] = job.get("_report")
        placed = {s.slot for s in (report.slots if report else [])
                  if s.placed_at is not None and time.time() - s.placed_at > VIEW_LAG_S}
        live = {n.node_id for n in nodes}
        bundle = spec.resources.as_ray_bundle()
        out = []
        for slot in job.get("_slots", []):
            k = slot["slot"]
            if k not in placed:
                fit.reserve(nodes, [p for p in slot["nodes"] if p in live], bundle)
            stopping = None
            if slot["state"] == SLOT_REVOKED:
                tail = spec.grace_period if slot["preempted_by"] else spec.slots.unit_timeout + spec.grace_period
                stopping = slot["revoked_at"] + tail + STOP_SLACK_S
            # a granted slot's lease is renewed every cycle unless the head needs its nodes
            # (_renew_leases): it runs from now
            out.append(policy.slot_from_spec(job["id"], k, job["seq"], spec, started_at=time.time(),
                                             nodes=tuple(slot["nodes"]), stopping_until=stopping))
        return out

    def _slot_requests(self) -> list[policy.Job]:
        """The slots active array jobs still want, as queued jobs at their job's place: as
        many as the driver reports it can use (before its first report: max_concurrent,
        or fewer when the job has fewer tasks), less those it holds."""
        out = []
        self.slot_counts = {}
        for job in self._active:
            spec = self.spec_of(job)
            if spec.slots is None or job["cancel_requested"]:
                continue
            report: Optional[Report] = job.get("_report")
            if report is not None and report.slots_wanted is not None:
                wanted = report.slots_wanted
            else:
                wanted = spec.slots.wanted_at_start
            slots = job.get("_slots", [])
            held = sum(1 for r in slots if r["state"] == SLOT_GRANTED)
            self.slot_counts[job["id"]] = (held, max(wanted, held))
            if wanted <= held:
                continue
            nxt = self.store.next_slot(job["id"], job["attempt"])
            avoid = frozenset(self.store.lost_nodes(job["id"]))
            out += [policy.slot_from_spec(job["id"], nxt + i, job["seq"], spec, avoid=avoid)
                    for i in range(wanted - held)]
        return out

    def _renew_leases(self, running: list[policy.Job], reservation: Optional[policy.Reservation],
                      head: Optional[policy.Job]) -> None:
        """Renew every granted slot's lease for another item_timeout, unless the head's
        reservation needs its nodes (``policy.renews``): then the slot drains."""
        if head is not None and head.id in self._settling:
            # its victims have just given their nodes back; Ray's view lags: the nodes it
            # reserved are not the ones it will get, so no slot is drained for it now
            head = None
        for pj in running:
            if pj.parent is None or pj.stopping_until is not None:
                continue
            job = next((j for j in self._active if j["id"] == pj.parent), None)
            if job is None:
                continue
            if policy.renews(pj, reservation, head):
                continue
            holder = head.parent or head.id if head else "?"
            reason = f"its lease was not renewed: its node(s) are reserved for {holder}"
            self.store.revoke_slot(pj.parent, job["attempt"], pj.slot, reason)
            self.launcher.revoke_slot(pj.parent, job["attempt"], pj.slot, reason, preempt=False)

    @staticmethod
    def _waiting_by_job(waiting: dict[str, str], jobs: list[policy.Job]) -> dict[str, str]:
        """Why each job waits, in ``waiting``'s order: a slot's reason (a queued array job
        is its first slot) is its array job's, the first one's."""
        parents = {j.id: j.parent for j in jobs if j.parent is not None}
        out: dict[str, str] = {}
        for ident, why in waiting.items():
            out.setdefault(parents.get(ident, ident), why)
        return out

    # ---- admission -----------------------------------------------------------
    def _running(self, nodes: list[fit.NodeView]) -> list[policy.Job]:
        """The policy's view of the active jobs. Gangs admitted but not placed yet hold
        no Ray resources: they are subtracted from ``nodes`` here, on the nodes the
        scheduler gave them, so the same free nodes are not handed out twice."""
        running = []
        unplaced = {j["id"] for j in self._unplaced}
        for job in self._active:
            spec, attempt = self.spec_of(job), job["_attempt"]
            if spec.slots is not None:
                running += self._slot_views(job, spec, nodes)
                continue
            placed = list(attempt["nodes"]) if attempt else []
            if not placed:  # adopted from an older server: where its ranks run, else anywhere
                placed = [r["node_id"] for r in self.store.ranks(job["id"], job["attempt"])
                          if r["local_rank"] == 0 and r["node_id"]]
            bundle = spec.resources.as_ray_bundle()
            if job["id"] in unplaced:
                if len(placed) != spec.nodes:
                    placed = fit.gang_fit(nodes, bundle, spec.nodes, spec.placement.strategy) or []
                live = {n.node_id for n in nodes}
                fit.reserve(nodes, [p for p in placed if p in live], bundle)
            stop_at = job["cancel_requested"] or job["preempt_requested"]
            running.append(policy.job_from_spec(
                job["id"], job["seq"], spec,
                started_at=attempt["started_at"] if attempt else time.time(),
                nodes=tuple(placed),
                stopping_until=stop_at + spec.grace_period + STOP_SLACK_S if stop_at else None,
            ))
        return running

    def admit(self) -> None:
        self.load_policy()
        queued = self.queue.refresh()
        # keep parsed specs only for jobs still queued or running (the policy's view is enough)
        if len(self._specs) > len(self._active) + 1000:
            keep = {j["id"] for j in self._active}
            # list(): the API thread may add to _specs meanwhile (spec_of)
            self._specs = {k: v for k, v in list(self._specs.items()) if k in keep or k in self.queue}
            self.queue.cached_spec = self._specs.get
        self.stats["queued"], self.stats["active"] = len(queued), len(self._active)
        wanted = self._slot_requests()
        if not queued and not wanted:
            self.waiting = {}
            self.reservation = None
            if self.autoscaler is not None:
                self.autoscaler.update(self.cluster.snapshot() if self._unplaced else [], [],
                                       starting=bool(self._unplaced))
            return
        if time.monotonic() < self._submit_retry_at:  # the last Ray Job submission failed
            wait_s = self._submit_retry_at - time.monotonic()
            views = self.queue.views()
            why = f"Ray Job submission failed {self._submit_failures} time(s) in a row; retrying in {wait_s:.0f} s"
            self.waiting = self._waiting_by_job({j.id: why for j in views}, views)
            return
        nodes = self.cluster.snapshot()
        running = self._running(nodes)
        if wanted:  # an active array job's next slots wait in the queue at the job's place
            queued = policy.Queue([*self.queue.views(), *wanted])
        now = time.time()
        self.deadlines.apply(self, now, nodes)  # queued jobs with a deadline: their node class
        t0 = time.perf_counter()
        self._settling = {h: t for h, t in self._settling.items() if now - t < SETTLE_S}
        plan = policy.plan(now, nodes, running, queued, self.policy, settling=frozenset(self._settling))
        self.stats["last_plan_ms"] = (time.perf_counter() - t0) * 1000
        for victim, head in plan.preempt:
            self._preempt(victim, head)
        for job, placed in plan.start:
            if not self._start(job, placed):
                break
        waiting = [*wanted, *self.queue.views()]
        self.waiting = self._waiting_by_job(plan.waiting, waiting)
        self.reservation = plan.reservation
        if plan.reservation is not None:
            head = next((j for j in waiting if j.id == plan.reservation.job_id), None)
        else:
            head = None
        self._renew_leases(running, plan.reservation, head)
        self.last_inputs = (now, nodes, running)
        if self.autoscaler is not None:
            self.autoscaler.update(nodes, plan.unfit, starting=bool(self._unplaced or plan.start))

    def never_runs(self, spec: JobSpec) -> Optional[str]:
        """Why a job could never start (its experiment's quota, or the largest cluster the
        autoscaler may build), or None. Checked at submit."""
        pj = policy.job_from_spec("new", 0, spec)
        problem = policy.never_admissible(pj, self.policy)
        if problem is None and self.autoscaler is not None:
            # the last cycle's nodes (at most a tick old): no GCS round trip per submission
            nodes = self.last_inputs[1] if self.last_inputs else self.cluster.snapshot()
            problem = self.autoscaler.never_fits(pj, nodes)
        return problem

    def estimate_starts(self, job_ids: list[str]) -> dict[str, float]:
        """Start-by times for these queued jobs if every job ran to its max_wall_clock on
        the nodes of the last cycle (the real policy on a simulated clock)."""
        if self.last_inputs is None:
            return {}
        now, nodes, running = self.last_inputs
        queued: dict[str, policy.Job] = {}
        for j in self.queue.views():  # an array job starts with its first slot
            queued.setdefault(j.parent or j.id, j)
        jobs = [SimJob(queued[i], queued[i].limit) for i in job_ids if i in queued]
        if not jobs:
            return {}
        ends = [(r, r.expected_end(now)) for r in running]
        result = simulate(nodes, jobs, self.policy, now=now, running=ends,
                          stop_when_started={j.job.id for j in jobs}, max_cycles=10 * len(jobs) + 100)
        return {i: result.starts[queued[i].id] for i in job_ids if i in queued and queued[i].id in result.starts}

    def _preempt(self, victim: policy.Job, head: policy.Job) -> None:
        log.info("preempting %s (priority %d) for %s (priority %d)", victim.id, victim.priority,
                 head.id, head.priority)
        now = time.time()
        if victim.parent is not None:  # one slot of an array job: its task reruns elsewhere
            job = self.store.get_job(victim.parent)
            if job is not None and JobState(job["state"]).is_active:
                reason = f"preempted by {head.parent or head.id}, which has a higher priority"
                self.store.revoke_slot(job["id"], job["attempt"], victim.slot, reason, preempted_by=head.id)
                self.launcher.revoke_slot(job["id"], job["attempt"], victim.slot, reason, preempt=True)
                self.store.update_job(job["id"], preemptions=job["preemptions"] + 1,
                                      preempted_by=head.parent or head.id)
            return
        self.store.update_job(victim.id, preempt_requested=now, preempted_by=head.id)
        job = self.store.get_job(victim.id)
        if job is not None and JobState(job["state"]).is_active:
            self._stop(job, ray_job_id(job["id"], job["attempt"]), "preempt", now,
                       f"preempted by {head.id}, which has a higher priority")

    def _start(self, pj: policy.Job, placed: list[str]) -> bool:
        """Admit a job on the nodes the policy chose: record the attempt, then submit its
        Ray Job. False if the submission failed (the job is back in the queue, no retry
        budget charged). A slot of an array job starts the job's attempt (its first slot)
        or is granted to the attempt that runs."""
        job = self.store.get_job(pj.parent or pj.id)
        if job is None:
            return True
        if pj.parent is not None and JobState(job["state"]).is_active:
            if not job["cancel_requested"]:
                n = job["attempt"]
                self.store.add_slot(job["id"], n, pj.slot, placed)
                self.launcher.grant_slot(job["id"], n, pj.slot, placed)
            return True
        if job["state"] != JobState.QUEUED.value:
            return True  # cancelled since the snapshot was taken
        n = job["attempt"] + 1
        what = f"a slot of {pj.count} node(s)" if pj.parent else f"gang of {pj.count} node(s)"
        try:
            job = self.store.transition(job["id"], JobState.STARTING, f"{what} fits; starting attempt {n}",
                                        expect=JobState.QUEUED, attempt=n)
        except InvalidTransition:
            return True
        sid = ray_job_id(job["id"], n)
        self.store.add_attempt(job["id"], n, sid, nodes=placed)  # intent first: a crash here is reconciled
        extra: dict[str, Any] = {}
        if pj.parent is not None:
            self.store.add_slot(job["id"], n, pj.slot, placed)
            extra["slots"] = {pj.slot: placed}
            array = self.spec_of(job).array
            resume = array.resume_from if array is not None else None
            if resume:
                old = self.store.get_job(resume)
                extra["resume_dir"] = old["job_dir"] if old else None
        try:
            self.launcher.submit(job, n, nodes=placed, **extra)
        except AttemptSetupError as e:  # the job's configuration: retrying cannot help
            self.end_attempt(job, AttemptOutcome.START_FAILED, None, str(e))
            return True
        except Exception as e:  # noqa: BLE001 - the Ray dashboard may be down
            self._attempt_over(job["id"], n)
            log.warning("submitting %s attempt %d failed: %s", job["id"], n, e)
            message = f"could not submit the Ray job: {type(e).__name__}: {e}"
            self.store.chain(job["id"], [Step(JobState.RESTARTING, message), Step(JobState.QUEUED, "requeued")],
                             attempt=(n, dict(ended_at=time.time(), outcome=AttemptOutcome.START_FAILED.value,
                                              reason=message)))
            self._submit_failures += 1
            self._submit_retry_at = time.monotonic() + min(60.0, 2.0 ** self._submit_failures)
            return False
        self._submit_failures = 0
        return True
