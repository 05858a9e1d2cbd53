"""Deadline-aware spot use, applied to the jobs of the queue (the policy itself, a pure
function, is ``raybatch.scheduler.deadline.choose``).

A job file with ``deadline`` and ``runtime_estimate`` C (raybatch.spec.job) gets its node
class chosen by the scheduler: the absolute deadline is stored on the job's row at submit;
t and D are measured from the submit. Each cycle:

- **before the plan** (``apply``, called by ``Scheduler.admit``): for each queued job with a
  deadline, ``choose(t, D, C, p, d, where, spot available)``; the policy's view of the job
  gets ``low_priority_nodes`` = the decision's (rules 1, 3, 4: avoid; 2, 0: require).
  "Where" is queued, except for a job whose previous attempt ran on dedicated nodes: it is
  evaluated as on dedicated nodes, so rule 3 keeps it there at this restart until p is
  ahead of the line at t + 2d (raybatch does not migrate a running job, so rule 3 acts at
  the job's next start). Nothing else changes: queue order, quotas, preemption and backfill
  treat it as any job, and autoscaling demand (``autoscale.Demand``) plans new nodes of the
  same class. A failure here (the store, a spec) skips the adjustment for this cycle,
  never the plan: it is logged and shown as this hook's error;
- **after the cycle** (as a cycle hook): the bookkeeping of progress p and restart overhead
  d, and the decision of each running job, shown only: raybatch does not migrate a running
  job, so a decision acts at its next start (after an eviction or a preemption).

Cost per cycle, with many queued deadline jobs: one read of the store (``Store.deadline_jobs``:
the few columns needed, on a partial index of the jobs not over), shared by ``apply`` and
the hook (which re-reads only the rows the cycle moved); specs come from the scheduler's
cache of parsed specs; "spot available" is computed once per job shape (``policy.Job.shape``).

"Spot available": a free spot node fits the gang now (``policy.place`` with
``low_priority_nodes: require`` on the live nodes' free resources), or a spot node type can
still launch it (with the autoscaler: below its ``max_workers`` and not in its back-off after
a failed launch). "Where": queued, or for a running job the class of the nodes it was pinned
to (spot if any of them is low-priority).

Progress p, kept on the job's row (``progress_s``): the compute time up to the job's newest
checkpoint, 0 before the first. While an attempt runs, its checkpoint location is listed
through the storage layer (local or blob, ``Backend.list``) at most every
``PROGRESS_EVERY_S`` on a worker thread (a slow listing never holds up the cycle); when a
file newer than the last one seen appears, with time c, p = p at the attempt's start
(``attempts.progress_start``) + (c − the attempt's ``running_at``). When an attempt ends,
its checkpoint location is read once more (files up to its ``ended_at``: the checkpoint a
stopped gang writes in its grace period counts) before the next attempt's start is recorded.

Restart overhead d: the mean, over the job's restarts (attempt k running after attempt
k−1 ended), of start-up (k's ``running_at`` − its ``started_at``: admission, staging and
starting the gang; the time it waited in the queue before is not overhead) plus work lost
(k−1's ``ended_at`` − its newest checkpoint seen, or its ``running_at`` without one:
``raybatch.scheduler.cost.work_lost``); ``deadline.DEFAULT_RESTART_OVERHEAD_S`` until there
is one. A checkpoint listing that takes longer than ``LISTING_TIMEOUT_S`` is abandoned (its
thread is left to finish; an error says so), and no new listing starts while
``MAX_ABANDONED`` abandoned ones are still running. The rule that chose an
attempt's node class is written on the attempt (``attempts.deadline_rule``)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

from raybatch.scheduler import fit, policy
from raybatch.scheduler.autoscale import NEW_PREFIX
from raybatch.scheduler.cost import work_lost
from raybatch.scheduler.deadline import DEFAULT_RESTART_OVERHEAD_S, Decision, Where, choose
from raybatch.state.states import JobState
from raybatch.state.store import Store
from raybatch.storage import plan as storage_plan
from raybatch.storage.backends import open_backend
from raybatch.storage.datastores import Datastores

if TYPE_CHECKING:
    from raybatch.scheduler.loop import Scheduler
    from raybatch.spec.job import JobSpec

log = logging.getLogger("raybatch.deadline")

PROGRESS_EVERY_S = 5.0   # a running deadline job's checkpoints are listed at most this often
NODES_EVERY_S = 5.0      # the running jobs' shown decisions read the cluster at most this often
MAX_LISTINGS = 4         # checkpoint listings in flight at once (each on its own thread)
FINAL_READ_TRIES = 3     # an ended attempt's last listing, then its progress is taken as known
LISTING_TIMEOUT_S = 6 * PROGRESS_EVERY_S  # a listing running longer is abandoned (its slot freed)
MAX_ABANDONED = 8        # abandoned listings still running: no new listing starts while this many
DEDICATED_RULES = frozenset({1, 3, 4})  # rules that put a job on dedicated nodes (avoid)

_ACTIVE = (JobState.STARTING.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class Shown:
    """The decision in force for a job, as the cycle that made it saw things."""

    decision: Decision
    where: Where
    spot_available: bool
    at: float


def spot_available(job: policy.Job, nodes: list[fit.NodeView], autoscaler: Any, now: float) -> bool:
    """Could the job's gang go on spot nodes now: it fits free spot nodes, or (with an
    autoscaler) spot node types that may still launch, not in their back-off, can hold it."""
    want = replace(job, low_priority_nodes="require")
    if policy.place(nodes, want) is not None:
        return True
    types = getattr(autoscaler, "types", None)
    if types is None:
        return False
    live, new, room = types.largest(nodes)
    backed_off = getattr(autoscaler, "backed_off", None) or {}
    spot_new = [n for n in new if types.types[n.node_type].spot and backed_off.get(n.node_type, 0.0) <= now]
    if not spot_new or room == 0:
        return False
    placed = policy.place([*live, *spot_new], want)
    if placed is None:
        return False
    fresh = sum(p.startswith(NEW_PREFIX) for p in placed)
    return room is None or fresh <= room


def restart_overhead(attempts: list[dict[str, Any]]) -> tuple[float, int]:
    """(d, how many restarts it was measured on) from a job's attempts, oldest first: per
    restart (an attempt that ran, after one that ended), its own start-up (``running_at`` −
    ``started_at``) plus the work the attempt before it lost (``cost.work_lost``)."""
    samples = []
    for prev, cur in zip(attempts, attempts[1:]):
        if cur["running_at"] is None or prev["ended_at"] is None:
            continue
        start_up = max(0.0, cur["running_at"] - cur["started_at"])
        samples.append(start_up + work_lost(prev))
    if not samples:
        return DEFAULT_RESTART_OVERHEAD_S, 0
    return sum(samples) / len(samples), len(samples)


def newest_checkpoint(list_files: Callable[[], list[Any]], after: float, until: Optional[float]) -> Optional[float]:
    """The newest file time in a checkpoint listing that is after ``after`` (the attempt's
    start: restored files do not count) and not after ``until`` (None: no bound)."""
    times = [e.mtime for e in list_files()
             if e.kind == "file" and e.mtime > after and (until is None or e.mtime <= until)]
    return max(times, default=None)


@dataclass
class _Listing:
    future: Future
    final: bool
    started: float  # monotonic


class DeadlineJobs:
    """The scheduler's part for jobs with a deadline: ``apply`` before each plan, and a cycle
    hook (``__call__``) for progress, restart overhead and the running jobs' decisions."""

    def __init__(self, store: Store, datastores: Optional[Callable[[], Datastores]] = None,
                 every_s: float = PROGRESS_EVERY_S, listing_timeout_s: float = LISTING_TIMEOUT_S):
        self.store = store
        self.datastores = datastores or Datastores  # () -> the server's current Datastores
        self.every_s = every_s
        self.listing_timeout_s = listing_timeout_s
        self.max_abandoned = MAX_ABANDONED
        self.decisions: dict[str, Shown] = {}          # job id -> the decision in force
        self._admitting: dict[str, Decision] = {}      # queued job -> this cycle's decision
        self._listing: dict[tuple[str, int], _Listing] = {}  # (job, attempt) -> its listing in flight
        self._abandoned: list[Future] = []             # listings given up on, their threads still running
        self._polled: dict[tuple[str, int], float] = {}  # (job, attempt) -> last listing started (monotonic)
        self._final: set[tuple[str, int]] = set()      # ended attempts whose last checkpoint was read
        self._final_tries: dict[tuple[str, int], int] = {}
        self._where: dict[tuple[str, int], Where] = {}  # attempt -> the class of its nodes
        self._overhead: dict[str, tuple[tuple, tuple[float, int]]] = {}
        self._nodes: tuple[float, list[fit.NodeView]] = (-1e18, [])
        self._errors: dict[str, str] = {}              # job id -> its last checkpoint listing's error
        self._apply_error: Optional[str] = None        # the last apply's failure (it skipped the adjustment)
        self._rows: Optional[list[dict[str, Any]]] = None  # apply's read of the store, for this cycle's hook
        self._moved: set[str] = set()                  # jobs whose progress moved since that read

    @property
    def error(self) -> Optional[str]:
        """What went wrong in the last cycles (the scheduler shows it as a hook's error)."""
        errors = sorted(self._errors.items())
        if self._apply_error:
            errors.insert(0, ("apply", self._apply_error))
        hung = sum(not f.done() for f in self._abandoned)
        if hung >= self.max_abandoned:
            errors.append(("checkpoint listings", f"{hung} abandoned listing(s) still running: no new listing "
                                                  "starts until one returns"))
        if not errors:
            return None
        return "; ".join(f"{k}: {v}" for k, v in errors)

    # ---- the numbers of one job -------------------------------------------------------
    def overhead(self, row: dict[str, Any]) -> tuple[float, int]:
        """(d, restarts measured) of a job, cached until its attempt, state or progress change."""
        key = (row["attempt"], row["state"], row["progress_s"])
        cached = self._overhead.get(row["id"])
        if cached is not None and cached[0] == key:
            return cached[1]
        value = restart_overhead(self.store.attempts(row["id"])) if row["attempt"] > 1 else \
            (DEFAULT_RESTART_OVERHEAD_S, 0)
        self._overhead[row["id"]] = (key, value)
        return value

    def decide(self, row: dict[str, Any], spec: "JobSpec", now: float, where: Where, spot: bool) -> Decision:
        t = now - row["submitted_at"]
        D = row["deadline_at"] - row["submitted_at"]
        d, _ = self.overhead(row)
        return choose(t, D, float(spec.runtime_estimate or 0.0), float(row["progress_s"] or 0.0), d, where, spot)

    def queued_where(self, row: dict[str, Any]) -> Where:
        """Where a queued job is, for the rules: dedicated when its previous attempt ran on
        dedicated nodes (rule 3 keeps it there at this restart until it is ahead of the line
        at t + 2d), else queued. The class of that attempt is the one its rule chose (rules 1,
        3, 4 are ``avoid``: dedicated nodes only), or, without a recorded rule, the class of
        the nodes it was seen on."""
        n = row["attempt"]
        if not n or row.get("last_running_at") is None:
            return Where.QUEUED
        rule = row.get("last_rule")
        if rule is not None:
            return Where.DEDICATED if rule in DEDICATED_RULES else Where.QUEUED
        return Where.DEDICATED if self._where.get((row["id"], n)) is Where.DEDICATED else Where.QUEUED

    # ---- specs -------------------------------------------------------------------------
    @staticmethod
    def _cached_spec(sched: "Scheduler", job_id: str) -> Optional["JobSpec"]:
        queue = getattr(sched, "queue", None)
        cached = getattr(queue, "cached_spec", None)
        return cached(job_id) if cached is not None else None

    def _spec(self, sched: "Scheduler", row: dict[str, Any]) -> "JobSpec":
        """The job's parsed spec: the scheduler's cache, or read from the store (a row of
        ``Store.deadline_jobs`` has no spec column) and cached there."""
        if "spec" in row:
            return sched.spec_of(row)
        spec = self._cached_spec(sched, row["id"])
        if spec is not None:
            return spec
        text = self.store.specs([row["id"]]).get(row["id"])
        if text is None:
            raise LookupError(f"{row['id']}: no such job")
        return sched.spec_of({"id": row["id"], "spec": text})

    def _specs(self, sched: "Scheduler", rows: list[dict[str, Any]]) -> dict[str, "JobSpec"]:
        """The parsed specs of these rows: from the scheduler's cache, those missing read in
        one query (500 per query) and cached there."""
        out: dict[str, "JobSpec"] = {}
        missing = []
        for row in rows:
            spec = self._cached_spec(sched, row["id"])
            if spec is None:
                missing.append(row["id"])
            else:
                out[row["id"]] = spec
        if missing:
            for job_id, text in self.store.specs(missing).items():
                out[job_id] = sched.spec_of({"id": job_id, "spec": text})
        return out

    # ---- before the plan: queued jobs -----------------------------------------------------
    def apply(self, sched: "Scheduler", now: float, nodes: list[fit.NodeView]) -> None:
        """Set the effective ``low_priority_nodes`` of each queued job with a deadline
        (``nodes``: the free resources the plan is about to use). Never raises: a failure
        skips the adjustment this cycle (logged; this hook's ``error``), not the plan."""
        self._admitting = {}
        self._rows = None
        try:
            self._apply(sched, now, nodes)
        except Exception as e:  # noqa: BLE001 - the plan must go on without the adjustment
            error = f"deadline adjustment skipped: {type(e).__name__}: {e}"
            if error != self._apply_error:
                log.exception("deadline adjustment failed (the plan goes on without it)")
            self._apply_error = error
        else:
            self._apply_error = None

    def _apply(self, sched: "Scheduler", now: float, nodes: list[fit.NodeView]) -> None:
        rows = self.store.deadline_jobs()
        self._rows, self._moved = rows, set()
        queued = [r for r in rows if r["state"] == JobState.QUEUED.value and r["id"] in sched.queue.jobs]
        specs = self._specs(sched, queued)
        spot_by_shape: dict[int, bool] = {}
        for row in queued:
            job_id = row["id"]
            entry = sched.queue.jobs.get(job_id)
            spec = specs.get(job_id)
            if entry is None or spec is None or spec.runtime_estimate is None:
                continue
            views = entry[1]
            try:
                shape = views[0].shape
                spot = spot_by_shape.get(shape)
                if spot is None:
                    spot = spot_by_shape[shape] = spot_available(views[0], nodes, sched.autoscaler, now)
                decision = self.decide(row, spec, now, self.queued_where(row), spot)
            except Exception as e:  # noqa: BLE001 - one job's numbers must not stop the others
                log.exception("deadline decision for %s failed", job_id)
                self._errors[job_id] = f"deadline decision: {type(e).__name__}: {e}"
                continue
            for pj in views:
                pj.set_node_class(decision.low_priority_nodes)
            self._admitting[job_id] = decision
            self.decisions[job_id] = Shown(decision, Where.QUEUED, spot, now)

    # ---- after the cycle: progress, overhead, running jobs ----------------------------------
    def _cycle_rows(self) -> list[dict[str, Any]]:
        """This cycle's rows: apply's read, with the rows the cycle moved since (started,
        cancelled, progress) read again; a read of its own when apply did not run."""
        rows, self._rows = self._rows, None
        if rows is None:
            self._moved = set()
            return self.store.deadline_jobs()
        ids = {r["id"] for r in rows}
        again = (self.store.changed_peek() | self._moved) & ids
        self._moved = set()
        if not again:
            return rows
        fresh = {r["id"]: r for r in self.store.deadline_jobs(again)}
        return [fresh[r["id"]] if r["id"] in again else r for r in rows if r["id"] not in again or r["id"] in fresh]

    def __call__(self, sched: "Scheduler") -> None:
        now = time.time()
        self._collect()
        rows = self._cycle_rows()
        running = [r for r in rows if r["state"] in _ACTIVE]
        nodes = self._live_nodes(sched) if running else []
        for row in rows:
            if row["state"] in _ACTIVE:
                self._running(sched, row, now, nodes)
            elif row["attempt"] and (row["id"], row["attempt"]) not in self._final:
                attempts = self.store.attempts(row["id"])
                if attempts:
                    self._final_read(sched, row, attempts[-1])
        self._forget({r["id"] for r in rows})

    def _running(self, sched: "Scheduler", row: dict[str, Any], now: float, nodes: list[fit.NodeView]) -> None:
        job_id, n = row["id"], row["attempt"]
        attempts = self.store.attempts(job_id)
        current = next((a for a in attempts if a["n"] == n), None)
        if current is None:
            return
        decided = self._admitting.pop(job_id, None)
        if decided is not None and current["deadline_rule"] is None:
            self.store.update_attempt(job_id, n, deadline_rule=decided.rule)
        prev = next((a for a in reversed(attempts) if a["n"] < n), None)
        if prev is not None and (job_id, prev["n"]) not in self._final:
            self._final_read(sched, row, prev)
        if current["running_at"] is not None:
            if current["progress_start"] is None:
                if prev is not None and (job_id, prev["n"]) not in self._final:
                    return  # its last attempt's final checkpoint first
                self.store.update_attempt(job_id, n, progress_start=row["progress_s"])
            if time.monotonic() - self._polled.get((job_id, n), -1e18) >= self.every_s:
                self._read(sched, row, current, final=False)
        self._show_running(sched, row, current, now, nodes)

    def _show_running(self, sched: "Scheduler", row: dict[str, Any], attempt: dict[str, Any], now: float,
                      nodes: list[fit.NodeView]) -> None:
        """The decision for a running job: shown, not acted on (raybatch does not migrate)."""
        key = (row["id"], attempt["n"])
        where = self._where.get(key)
        if where is None:
            by_id = {v.node_id: v for v in nodes}
            pinned = [by_id[i] for i in attempt["nodes"] if i in by_id]
            if not pinned:
                self.decisions.pop(row["id"], None)
                return
            where = self._where[key] = (Where.SPOT if any(fit.is_low_priority(v) for v in pinned)
                                        else Where.DEDICATED)
        spec = self._spec(sched, row)
        pj = policy.job_from_spec(row["id"], row["seq"], spec)
        spot = spot_available(pj, nodes, sched.autoscaler, now)
        self.decisions[row["id"]] = Shown(self.decide(row, spec, now, where, spot), where, spot, now)

    def _live_nodes(self, sched: "Scheduler") -> list[fit.NodeView]:
        """The free resources of the last plan, or (no plan lately: an empty queue) a fresh
        read of the cluster at most every NODES_EVERY_S."""
        if sched.last_inputs is not None and time.time() - sched.last_inputs[0] < NODES_EVERY_S:
            return sched.last_inputs[1]
        at, nodes = self._nodes
        if time.monotonic() - at >= NODES_EVERY_S:
            nodes = sched.cluster.snapshot()
            self._nodes = (time.monotonic(), nodes)
        return nodes

    # ---- reading checkpoints ------------------------------------------------------------------
    def _final_read(self, sched: "Scheduler", row: dict[str, Any], attempt: dict[str, Any]) -> None:
        key = (row["id"], attempt["n"])
        if attempt["running_at"] is None or attempt["ended_at"] is None:
            if attempt["ended_at"] is not None or attempt["n"] < row["attempt"]:
                self._final.add(key)  # never ran: nothing to read
            return
        if time.monotonic() - self._polled.get(key, -1e18) >= min(self.every_s, 1.0):
            self._read(sched, row, attempt, final=True)

    def _read(self, sched: "Scheduler", row: dict[str, Any], attempt: dict[str, Any], final: bool) -> None:
        """List the job's checkpoint location on a worker thread (``_collect`` takes the result)."""
        key = (row["id"], attempt["n"])
        if key in self._listing or len(self._listing) >= MAX_LISTINGS:
            return
        self._abandoned = [f for f in self._abandoned if not f.done()]
        if len(self._abandoned) >= self.max_abandoned:
            return  # hung storage: no more threads until one returns (``error`` says so)
        self._polled[key] = time.monotonic()
        location = storage_plan.job_locations(self._spec(sched, row), row["job_dir"])["checkpoints"]
        after, until = attempt["running_at"], attempt["ended_at"] if final else None
        job_dir = row["job_dir"]
        datastores = self.datastores
        future: Future = Future()

        def run() -> None:
            try:
                # anchored at the job's directory: a job that replaced its checkpoints directory
                # with a link (to /) does not make the server walk what the link points to
                backend = open_backend(datastores().resolve(location), anchor=job_dir)
                future.set_result(newest_checkpoint(backend.list, after, until))
            except BaseException as e:  # noqa: BLE001 - handed to the loop thread
                future.set_exception(e)

        self._listing[key] = _Listing(future, final, time.monotonic())
        threading.Thread(target=run, name=f"raybatch-checkpoints-{row['id']}", daemon=True).start()

    def _collect(self) -> None:
        """Take the listings that are done: newer checkpoints move the job's progress. One
        running longer than ``listing_timeout_s`` is abandoned: its slot is freed, an error
        says so, and the job's checkpoints are listed again later."""
        mono = time.monotonic()
        for key, listing in list(self._listing.items()):
            job_id, n = key
            future, final = listing.future, listing.final
            if not future.done():
                if mono - listing.started <= self.listing_timeout_s:
                    continue
                del self._listing[key]
                self._abandoned.append(future)
                log.warning("%s attempt %d: listing its checkpoints took over %g s; abandoned", job_id, n,
                            self.listing_timeout_s)
                self._failed(key, final, f"listing its checkpoints took over {self.listing_timeout_s:g} s: "
                             "abandoned (tried again later)")
                continue
            del self._listing[key]
            try:
                newest = future.result()
            except Exception as e:  # noqa: BLE001 - storage unreachable: tried again later
                self._failed(key, final, f"listing its checkpoints failed: {type(e).__name__}: {e}")
                continue
            self._errors.pop(job_id, None)
            self.progress(job_id, n, newest)
            if final:
                self._final.add(key)

    def _failed(self, key: tuple[str, int], final: bool, error: str) -> None:
        job_id, n = key
        self._errors[job_id] = error
        if final:
            tries = self._final_tries[key] = self._final_tries.get(key, 0) + 1
            if tries >= FINAL_READ_TRIES:
                log.warning("%s attempt %d: its last checkpoints could not be read (%s); its progress "
                            "stays at the last one seen", job_id, n, error)
                self._final.add(key)

    def progress(self, job_id: str, n: int, newest: Optional[float]) -> None:
        """Attempt ``n`` of the job has a checkpoint file of time ``newest`` (None: none new):
        move its progress when that is newer than the last one seen."""
        attempt, job = self.store.get_attempt(job_id, n), self.store.get_job(job_id)
        if attempt is None or job is None or attempt["running_at"] is None or newest is None:
            return
        if newest <= (attempt["checkpoint_at"] or attempt["running_at"]):
            return
        start = attempt["progress_start"]
        fields: dict[str, Any] = {"checkpoint_at": newest}
        if start is None:  # its start was not seen (a server restart): p had not counted it yet
            start = fields["progress_start"] = job["progress_s"] or 0.0
        self.store.update_attempt(job_id, n, **fields)
        self.store.update_job(job_id, progress_s=start + (newest - attempt["running_at"]))
        self._overhead.pop(job_id, None)
        self._moved.add(job_id)

    def _forget(self, live: set[str]) -> None:
        for job_id in [k for k in list(self.decisions) if k not in live]:
            self.decisions.pop(job_id, None)
        for key in [k for k in self._listing if k[0] not in live]:
            listing = self._listing.pop(key)
            if not listing.future.done():
                self._abandoned.append(listing.future)
        for d in (self._polled, self._where, self._final_tries):
            for key in [k for k in d if k[0] not in live]:
                del d[key]
        self._final = {k for k in self._final if k[0] in live}
        # list(): the API thread (info) may add to it meanwhile
        self._overhead = {k: v for k, v in list(self._overhead.items()) if k in live}
        self._errors = {k: v for k, v in self._errors.items() if k in live}

    # ---- what queue and show print ----------------------------------------------------------
    def info(self, row: dict[str, Any], spec: "JobSpec", now: Optional[float] = None) -> Optional[dict[str, Any]]:
        """A job's deadline numbers and the decision in force (None: it has no deadline):
        the fields of ``raybatch.models.DeadlineInfo``."""
        if row.get("deadline_at") is None or spec.runtime_estimate is None:
            return None
        now = time.time() if now is None else now
        C, p = float(spec.runtime_estimate), float(row["progress_s"] or 0.0)
        d, measured = self.overhead(row)
        out: dict[str, Any] = dict(deadline_at=row["deadline_at"], runtime_estimate_s=C, progress_s=p,
                                   restart_overhead_s=d, restarts_measured=measured)
        state = JobState(row["state"])
        if state.is_final:
            if state is JobState.SUCCEEDED and row["ended_at"] is not None:
                out["met"] = row["ended_at"] <= row["deadline_at"]
            return out
        out["slack_s"] = row["deadline_at"] - now - max(0.0, C - p)
        shown = self.decisions.get(row["id"])
        if shown is not None:
            out.update(rule=shown.decision.rule, words=shown.decision.words, nodes=shown.decision.nodes,
                       low_priority_nodes=shown.decision.low_priority_nodes, where=shown.where.value,
                       spot_available=shown.spot_available, decided_at=shown.at)
        return out
