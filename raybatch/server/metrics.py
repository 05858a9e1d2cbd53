"""``GET /metrics``: the server's numbers in Prometheus' text format (docs/metrics.md).

One ``CollectorRegistry`` per server (not prometheus_client's global one: two servers in
one process, as the tests build them, must not share counters). Where each number comes
from decides whether it survives a restart:

- **From the store, at scrape time** (``StoreCollector``): jobs per state, submissions,
  finished jobs, attempts ended by outcome, preemptions, the cluster's nodes. They match
  the store after a restart because they *are* the store. The history tables only grow, so
  they are tallied incrementally: each scrape reads the rows added since the last one
  (by rowid) and re-reads the few rows still open (attempts running, slots granted); the
  first scrape reads the whole history once. A scrape's cost follows the change since the
  last scrape, not the history, and never the queue (10,000 queued jobs cost one indexed
  count).
- **From the scheduler's memory, at scrape time**: queue length by priority and
  experiment (the queue the scheduler follows, the same the queue view shows: counting
  it in SQLite costs a row lookup per queued job), cycle counts and times.
- **Observed as it happens** (histograms, since the server started): wait and run times
  (read from the store's new transitions and attempts at each scrape, so nothing is
  lost between scrapes), scheduler cycle time, staging and final upload (from the
  attempts' driver reports, in a cycle hook), API request latency (an ASGI middleware,
  labelled by route template).
- **Per running job**: the last value of each metric rank 0 logs (``log_metric``,
  ``RAYBATCH_METRIC`` lines, MLflow), tailed from its ``metrics.jsonl`` by a thread
  (``JobMetricTail``), dropped when the job stops running.

Nothing here may break the scheduler: the cycle hook catches its own errors.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from raybatch.state.states import FINAL_STATES, AttemptOutcome, JobState

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

log = logging.getLogger("raybatch.metrics")

NON_FINAL = tuple(s.value for s in JobState if s not in FINAL_STATES)
FINAL = tuple(sorted(s.value for s in FINAL_STATES))
NODE_LIVE_STATES = ("preparing", "idle", "running", "unusable", "leaving")   # raybatch.scheduler.nodes
NODE_ENDED_STATES = ("preempted", "terminated", "lost")
JOB_METRIC_POLL_S = 1.0       # how often running jobs' metric files on a local path are tailed
JOB_METRIC_REMOTE_S = 10.0    # ... in blob storage (a request each; Prometheus scrapes every 15 s or so)
JOB_METRIC_MAX_NAMES = 100    # metric names kept per job (label cardinality stays bounded)
JOB_METRIC_READ = 1 << 20     # bytes read per file per poll

WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
RUN_BUCKETS = (1, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
TRANSFER_BUCKETS = (0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
CYCLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Tally:
    """Rows of a table that grows (rows are never deleted once closed), counted by a
    label once they close (``closed`` is true and ``label`` no longer changes). ``refresh`` reads the rows past the last
    rowid seen and re-reads the open ones: its cost follows what changed, not the table.
    ``on_close(row)`` sees each row that closes after the first refresh."""

    def __init__(self, table: str, closed: str, label: str, extra: str = "NULL"):
        self.table, self.closed, self.label, self.extra = table, closed, label, extra
        self.upto = 0
        self.open: set[int] = set()
        self.counts: Counter = Counter()
        self.loaded = False

    def refresh(self, db: sqlite3.Connection, on_close: Optional[Callable[[tuple], None]] = None) -> None:
        cols = f"rowid, ({self.closed}), ({self.label}), ({self.extra})"
        rows = db.execute(f"SELECT {cols} FROM {self.table} WHERE rowid > ? ORDER BY rowid",
                          (self.upto,)).fetchall()
        recheck = sorted(self.open)
        for i in range(0, len(recheck), 500):
            chunk = recheck[i:i + 500]
            seen = db.execute(f"SELECT {cols} FROM {self.table} WHERE rowid IN ({','.join('?' * len(chunk))})",
                              chunk).fetchall()
            self.open.difference_update(chunk)  # an open row deleted (a node's ip: row) is dropped
            rows += seen
        for row in rows:
            rowid, closed, label, _extra = row
            if rowid > self.upto:
                self.upto = rowid
            if closed:
                self.open.discard(rowid)
                self.counts[label] += 1
                if on_close is not None and self.loaded:
                    on_close(row)
            else:
                self.open.add(rowid)
        self.loaded = True


class StoreCollector:
    """What the store knows, read at scrape time through a read-only connection of its
    own (WAL: a scrape never waits on the scheduler's writes, nor they on it)."""

    def __init__(self, db_path: str | Path, histograms: "Histograms"):
        self.db_path = str(db_path)
        self.histograms = histograms
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        # attempts: closed when they have an outcome; extra: run time (from running, else start)
        self.attempts = Tally("attempts", "outcome IS NOT NULL", "outcome",
                              "ended_at - COALESCE(running_at, started_at)")
        # slots of array jobs: closed when revoked or released; label: revoked for a higher-priority job
        self.slots = Tally("slots", "state != 'granted'", "preempted_by IS NOT NULL")
        # transitions: closed from the start; label: the new state, SUBMITTED for a job's first
        # (a requeue is a QUEUED too); extra: an admission's job, id and time (wait times)
        self.transitions = Tally("transitions", "1",
                                 "CASE WHEN from_state IS NULL THEN 'SUBMITTED' ELSE to_state END",
                                 "CASE WHEN to_state = 'STARTING' THEN job_id || ' ' || id || ' ' || at END")
        # nodes: closed when gone (a gone node's row no longer changes); label: how it went
        self.nodes_ended = Tally("nodes", "ended_at IS NOT NULL", "state")
        self.jobs: dict[str, int] = {}
        self.nodes: dict[str, int] = {}

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            uri = Path(self.db_path).resolve().as_uri() + "?mode=ro"  # as_uri: a path with ? or # in it
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=5)
        return self._db

    def refresh(self) -> None:
        """Read what changed since the last scrape, in one read transaction (one snapshot)."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            try:
                self.attempts.refresh(db, self._attempt_ended)
                self.slots.refresh(db)
                starts: list[tuple[str, int, float]] = []
                self.transitions.refresh(db, lambda row: self._transition(row, starts))
                for job_id, tid, at in starts:
                    self._observe_wait(db, job_id, tid, at)
                # non-final states: an index range, its size the number of unfinished jobs
                marks = ",".join("?" * len(NON_FINAL))
                rows = db.execute(f"SELECT state, COUNT(*) FROM jobs WHERE state IN ({marks}) GROUP BY state",
                                  NON_FINAL).fetchall()
                self.jobs = {s: 0 for s in NON_FINAL} | dict(rows)
                self.nodes_ended.refresh(db)
                self.nodes = dict(db.execute("SELECT state, COUNT(*) FROM nodes WHERE ended_at IS NULL "
                                             "GROUP BY state").fetchall())  # on the index nodes_live
            finally:
                db.execute("COMMIT")

    def _attempt_ended(self, row: tuple) -> None:
        _rowid, _closed, outcome, run_s = row
        if run_s is not None and run_s >= 0:
            self.histograms.run.labels(outcome=outcome).observe(run_s)

    @staticmethod
    def _transition(row: tuple, starts: list) -> None:
        _rowid, _closed, _to_state, extra = row
        if extra is not None:
            job_id, tid, at = extra.split(" ")
            starts.append((job_id, int(tid), float(at)))

    def _observe_wait(self, db: sqlite3.Connection, job_id: str, tid: int, at: float) -> None:
        """An attempt was admitted: how long its job waited since it was (re)queued."""
        row = db.execute("SELECT at FROM transitions WHERE job_id=? AND id<? AND to_state='QUEUED' "
                         "ORDER BY id DESC LIMIT 1", (job_id, tid)).fetchone()
        if row is not None:
            self.histograms.wait.observe(max(0.0, at - row[0]))

    def collect(self) -> Iterable[Any]:
        with self._lock:
            jobs = GaugeMetricFamily("raybatch_jobs", "Jobs in each unfinished state, now.", labels=["state"])
            for state, n in sorted(self.jobs.items()):
                jobs.add_metric([state], n)
            yield jobs
            sub = CounterMetricFamily("raybatch_jobs_submitted", "Jobs submitted.")
            sub.add_metric([], self.transitions.counts.get("SUBMITTED", 0))
            yield sub
            fin = CounterMetricFamily("raybatch_jobs_finished", "Jobs that reached a final state.", labels=["state"])
            for state in FINAL:
                fin.add_metric([state], self.transitions.counts.get(state, 0))
            yield fin
            ended = CounterMetricFamily("raybatch_attempts_ended", "Attempts ended, by outcome.",
                                        labels=["outcome"])
            for outcome in AttemptOutcome:
                ended.add_metric([outcome.value], self.attempts.counts.get(outcome.value, 0))
            yield ended
            pre = CounterMetricFamily("raybatch_preemptions", "Gangs stopped for a higher-priority job: "
                                      "whole jobs (kind=job) and array jobs' slots (kind=slot).", labels=["kind"])
            pre.add_metric(["job"], self.attempts.counts.get(AttemptOutcome.PREEMPTED.value, 0))
            pre.add_metric(["slot"], self.slots.counts.get(1, 0))
            yield pre
            live = GaugeMetricFamily("raybatch_nodes", "The cluster's nodes now, by state.", labels=["state"])
            for state in NODE_LIVE_STATES:
                live.add_metric([state], self.nodes.get(state, 0))
            yield live
            gone = CounterMetricFamily("raybatch_nodes_ended", "Nodes gone: preempted (drained, a spot "
                                       "eviction), terminated (on purpose), lost (without notice: node losses).",
                                       labels=["state"])
            for state in NODE_ENDED_STATES:
                gone.add_metric([state], self.nodes_ended.counts.get(state, 0))
            yield gone


class Histograms:
    """The histograms the server observes as things happen (since it started)."""

    def __init__(self, registry: CollectorRegistry):
        kw = {"registry": registry}
        self.wait = Histogram("raybatch_job_wait_seconds", "Time an attempt waited in the queue: from "
                              "(re)queued to admitted.", buckets=WAIT_BUCKETS, **kw)
        self.run = Histogram("raybatch_job_run_seconds", "An attempt's run time (from its ranks running, "
                             "else from its admission, to its end), by outcome.", ["outcome"],
                             buckets=RUN_BUCKETS, **kw)
        self.staging = Histogram("raybatch_staging_seconds", "Time an attempt spent staging inputs and "
                                 "checkpoints on its nodes (as its driver reported it).",
                                 buckets=TRANSFER_BUCKETS, **kw)
        self.final_sync = Histogram("raybatch_final_sync_seconds", "Time from an attempt's processes "
                                    "ending to its last upload done (its driver's syncing phase).",
                                    buckets=TRANSFER_BUCKETS, **kw)
        self.cycle = Histogram("raybatch_scheduler_cycle_seconds", "Scheduler cycle time (reconcile, plan, "
                               "act, hooks).", buckets=CYCLE_BUCKETS, **kw)
        self.api = Histogram("raybatch_api_request_seconds", "API request latency, by route template "
                             "(until the response's last byte).", ["method", "route", "status"],
                             buckets=API_BUCKETS, **kw)


class ReportObserver:
    """A scheduler cycle hook: reads the driver reports the cycle already read (no I/O
    of its own but a finished syncing attempt's last report) for staging, final uploads
    and the cycle's own time. It catches its own errors: metrics never stop a cycle."""

    __name__ = "metrics"

    def __init__(self, histograms: Histograms):
        self.h = histograms
        self.staging_bytes = 0
        self._staging: dict[tuple[str, int], Any] = {}   # attempt -> its last Staging report
        self._syncing: dict[tuple[str, int], float] = {}  # attempt -> when its final upload began
        self._cycles = 0
        self._failed: Optional[str] = None
        self._lock = threading.Lock()

    def __call__(self, sched: Any) -> None:
        try:
            self._observe(sched)
            self._failed = None
        except Exception as e:  # noqa: BLE001 - a metrics bug must not show as a scheduler problem
            error = f"{type(e).__name__}: {e}"
            if error != self._failed:
                log.exception("metrics: reading the cycle failed (the scheduler goes on)")
            self._failed = error

    def _observe(self, sched: Any) -> None:
        from raybatch.runtime.protocol import Phase  # noqa: PLC0415

        cycles = int(sched.stats.get("cycles", 0))
        if cycles != self._cycles and cycles > 0:  # the previous cycle's time (hooks run before it is set)
            self._cycles = cycles
            self.h.cycle.observe(sched.stats.get("last_cycle_ms", 0.0) / 1000)
        now = time.time()
        seen = set()
        with self._lock:
            for job in list(getattr(sched, "_active", [])):
                key = (job["id"], job["attempt"])
                seen.add(key)
                report = job.get("_report")
                if report is None:
                    continue
                if report.staging is not None and report.phase is Phase.STAGING:
                    self._staging[key] = report.staging
                elif key in self._staging:  # staging is over: done if the attempt went on
                    self._fold_staging(key, done=report.phase in (Phase.PREPARING, Phase.RUNNING))
                if report.phase is Phase.SYNCING:
                    self._syncing.setdefault(key, report.at or now)
            for key in [k for k in self._staging if k not in seen]:
                self._fold_staging(key, done=False)   # ended while staging
            for key in [k for k in self._syncing if k not in seen]:
                since = self._syncing.pop(key)
                last = sched.report(*key)
                end = last.at if last is not None and last.phase is Phase.DONE and last.at else now
                self.h.final_sync.observe(max(0.0, end - since))

    def _fold_staging(self, key: tuple[str, int], done: bool) -> None:
        st = self._staging.pop(key)
        self.staging_bytes += st.bytes_total if done else st.bytes_done
        self.h.staging.observe(st.seconds)

    def collect(self) -> Iterable[Any]:
        with self._lock:
            staged = CounterMetricFamily("raybatch_staging_bytes", "Bytes staged on nodes for attempts "
                                         "(inputs and checkpoints), as drivers reported them.")
            staged.add_metric([], self.staging_bytes)
            yield staged
            now = time.time()
            syncing = GaugeMetricFamily("raybatch_syncing_attempts", "Attempts whose processes ended and "
                                        "whose last upload is still running.")
            syncing.add_metric([], len(self._syncing))
            yield syncing
            lag = GaugeMetricFamily("raybatch_sync_lag_seconds", "How long the oldest final upload has been "
                                    "running (0: none): outputs not in storage yet this long after the job's "
                                    "processes ended.")
            lag.add_metric([], max((now - t for t in self._syncing.values()), default=0.0))
            yield lag


class SchedulerCollector:
    """The scheduler's own numbers (``GET /api/v1/scheduler``) and its queue, at scrape time."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def collect(self) -> Iterable[Any]:
        sched = self.scheduler
        stats = dict(sched.stats)
        cycles = CounterMetricFamily("raybatch_scheduler_cycles", "Scheduler cycles run.")
        cycles.add_metric([], stats.get("cycles", 0))
        yield cycles
        for name, key, what in (("raybatch_scheduler_last_cycle_seconds", "last_cycle_ms", "The last cycle's time."),
                                ("raybatch_scheduler_last_plan_seconds", "last_plan_ms",
                                 "The last cycle's policy time (priorities, fit, backfill, preemption).")):
            g = GaugeMetricFamily(name, what)
            g.add_metric([], stats.get(key, 0.0) / 1000)
            yield g
        err = GaugeMetricFamily("raybatch_scheduler_error", "1 while the last cycle (or a cycle hook) failed.")
        err.add_metric([], 1 if sched.last_cycle_error else 0)
        yield err
        queue = GaugeMetricFamily("raybatch_queue_length", "Queued jobs by priority and experiment (the "
                                  "scheduler's queue, as of its last cycle).", labels=["priority", "experiment"])
        counts: Counter = Counter()
        follower = getattr(sched, "queue", None)
        for _attempt, views in list(getattr(follower, "jobs", {}).values()):  # list(): the loop changes it
            if views:  # an array job is several views (one per slot it wants): one job
                counts[(views[0].priority, views[0].group)] += 1
        for (prio, exp), n in sorted(counts.items()):
            queue.add_metric([str(prio), exp], n)
        yield queue


class JobMetricTail:
    """The last value of each metric rank 0 of each running job logged, tailed from its
    metric store (``metrics.jsonl``, where ``GET /jobs/{id}/metrics`` reads it) by a
    thread, ``JOB_METRIC_POLL_S`` apart (``JOB_METRIC_REMOTE_S`` for a file in blob
    storage: one request each time): a scrape only copies a dict. Sweeps (their trials
    have metrics of their own) and array jobs (their items) are left out."""

    def __init__(self, ctx: "ServerContext", poll_s: float = JOB_METRIC_POLL_S):
        self.ctx = ctx
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self.values: dict[str, tuple[str, dict[str, float]]] = {}  # job -> (experiment, name -> value)
        self._tails: dict[str, dict[str, Any]] = {}  # job -> attempt, offset, backend, rel
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._errors: dict[str, str] = {}

    def start(self) -> "JobMetricTail":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrics-tail", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the next poll tries again
                log.exception("metrics: tailing jobs' metrics failed")

    def poll(self) -> None:
        running = {j["id"]: j for j in self.ctx.store.list_jobs(states=[JobState.RUNNING], limit=100_000)}
        for job_id in [j for j in self._tails if j not in running]:
            self._tails.pop(job_id, None)
        with self._lock:
            for job_id in [j for j in self.values if j not in running]:
                del self.values[job_id]
        for job_id, job in running.items():
            try:
                self._tail(job)
                self._errors.pop(job_id, None)
            except Exception as e:  # noqa: BLE001 - one job's storage must not hide the others'
                error = f"{type(e).__name__}: {e}"
                if self._errors.get(job_id) != error:
                    log.warning("metrics: reading %s's metrics: %s", job_id, error)
                self._errors[job_id] = error

    def _tail(self, job: dict[str, Any]) -> None:
        from raybatch.runtime.launch import METRICS_STORE  # noqa: PLC0415
        from raybatch.server.common import job_backend  # noqa: PLC0415
        from raybatch.spec.job import JobSpec  # noqa: PLC0415
        from raybatch.storage import plan as storage_plan  # noqa: PLC0415

        tail = self._tails.get(job["id"])
        if tail is None:
            spec = JobSpec.model_validate_json(job["spec"])
            if spec.sweep is not None or spec.array is not None:
                tail = {"skip": True}
            else:
                logs = storage_plan.job_locations(spec, job["job_dir"])["stdouterr"]
                # the routes' backend: a job that made its metrics file a link (to the db,
                # another job's metrics, a FIFO) is not read through it
                backend = job_backend(self.ctx, job, logs)
                tail = {"backend": backend, "attempt": 0, "offset": 0, "next": 0.0,
                        "every": 0.0 if backend.access.kind == "local" else JOB_METRIC_REMOTE_S}
            self._tails[job["id"]] = tail
        if tail.get("skip") or time.monotonic() < tail["next"]:
            return
        tail["next"] = time.monotonic() + tail["every"]
        if tail["attempt"] != job["attempt"]:  # a new attempt writes a new file
            tail.update(attempt=job["attempt"], offset=0)
        rel = f"{storage_plan.rank_logs(job['attempt'], 0)}/{METRICS_STORE}"
        data, _size = tail["backend"].read(rel, tail["offset"], JOB_METRIC_READ)
        end = data.rfind(b"\n")
        if end < 0:
            return
        tail["offset"] += end + 1
        latest: dict[str, float] = {}
        for raw in data[:end].splitlines():
            try:
                event = json.loads(raw)
                latest[str(event["name"])] = float(event["value"])
            except (ValueError, KeyError, TypeError):
                continue
        with self._lock:
            _exp, values = self.values.setdefault(job["id"], (job["experiment"], {}))
            for name, value in latest.items():
                if name in values or len(values) < JOB_METRIC_MAX_NAMES:
                    values[name] = value

    def collect(self) -> Iterable[Any]:
        g = GaugeMetricFamily("raybatch_job_metric", "The last value of each metric rank 0 of a running job "
                              "logged (log_metric, RAYBATCH_METRIC lines, MLflow); gone when it stops running.",
                              labels=["job_id", "experiment", "name"])  # not "job": Prometheus' target label
        with self._lock:
            for job_id, (exp, values) in sorted(self.values.items()):
                for name, value in sorted(values.items()):
                    g.add_metric([job_id, exp, name], value)
        yield g


class ServerMetrics:
    """Everything ``/metrics`` shows, in the server's own registry."""

    def __init__(self, ctx: "ServerContext"):
        self.registry = CollectorRegistry(auto_describe=False)
        self.histograms = Histograms(self.registry)
        self.store = StoreCollector(ctx.store.path, self.histograms)
        self.observer = ReportObserver(self.histograms)
        self.tail = JobMetricTail(ctx)
        for collector in (self.store, self.observer, SchedulerCollector(ctx.scheduler), self.tail):
            self.registry.register(collector)
        ProcessCollector(registry=self.registry)  # the server's CPU, memory, open files
        ctx.scheduler.cycle_hooks.append(self.observer)

    def start(self) -> "ServerMetrics":
        """Start tailing running jobs' metrics, and read the store's history once (so that
        the first scrape is as cheap as the others)."""
        self.tail.start()
        try:
            self.store.refresh()
        except sqlite3.Error as e:
            log.warning("metrics: reading the store: %s (the first scrape tries again)", e)
        return self

    def scrape(self) -> bytes:
        self.store.refresh()
        return generate_latest(self.registry)

    def middleware(self, app: Any) -> "LatencyMiddleware":
        return LatencyMiddleware(app, self.histograms.api)


class LatencyMiddleware:
    """Times each HTTP request to its response's end, labelled by the route's template
    (``/api/v1/jobs/{job_id}``, never the path itself: label values stay few)."""

    def __init__(self, app: Any, histogram: Histogram):
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            try:
                route = route_template(scope)
                self.histogram.labels(method=scope.get("method", ""), route=route,
                                      status=f"{status[0] // 100}xx").observe(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - never fail a request for its metric
                log.exception("metrics: timing a request failed")


_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def route_template(scope: dict) -> str:
    """The template of the route that served a request, with the prefix it was included
    under: ``/api/v1/jobs/{job_id}``. A request no route matched is ``unmatched`` (random
    paths must not become label values). The route knows its path below its router's
    prefix only; the prefix is what the request's path has before the route's part."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not path:
        return "unmatched"
    params = scope.get("path_params") or {}
    try:
        rendered = _PARAM.sub(lambda m: str(params[m.group(1)]), path)
    except KeyError:
        return path
    full = scope.get("path", "")
    if rendered and full.endswith(rendered):
        return full[:len(full) - len(rendered)] + path
    return path


def router(ctx: "ServerContext", metrics: ServerMetrics, auth: list) -> Any:
    """``GET /metrics`` (at the root, as Prometheus expects), with the API's bearer token."""
    from fastapi import APIRouter, Response  # noqa: PLC0415

    api = APIRouter()

    # response_model=None: the return annotation is a string here (postponed annotations) naming
    # a local import FastAPI cannot resolve; inferring a model from it made /openapi.json a 500
    @api.get("/metrics", dependencies=auth, include_in_schema=True, response_model=None,
             summary="Prometheus metrics (text format); needs the bearer token")
    def metrics_route() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    return api
