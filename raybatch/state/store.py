"""SQLite store (WAL) of jobs, attempts, ranks and state transitions.

The server owns this file; everything else reads it through the server's API.
A queued job is a row here and nothing in Ray. Writes go through one connection
guarded by a lock (SQLite serialises writers anyway); WAL lets readers proceed.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Iterable, Optional

from raybatch.state.states import FINAL_STATES, InvalidTransition, JobState, check_transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order, never changes
    id             TEXT NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    experiment     TEXT NOT NULL,
    priority       INTEGER NOT NULL,
    state          TEXT NOT NULL,
    spec           TEXT NOT NULL,          -- JobSpec as JSON
    code_package   TEXT,                   -- sha256 of the shipped code, if any
    job_dir        TEXT NOT NULL,          -- logs, outputs, checkpoints
    submitted_at   REAL NOT NULL,
    updated_at     REAL NOT NULL,
    started_at     REAL,
    ended_at       REAL,
    exit_code      INTEGER,
    reason         TEXT,
    attempt        INTEGER NOT NULL DEFAULT 0,  -- number of the latest attempt
    user_retries   INTEGER NOT NULL DEFAULT 0,  -- retries used, per budget
    infra_retries  INTEGER NOT NULL DEFAULT 0,
    cancel_requested REAL,
    preempt_requested REAL,                -- a higher-priority job needs its nodes
    preempted_by   TEXT,                   -- ... this one
    preemptions    INTEGER NOT NULL DEFAULT 0,
    evictions      INTEGER NOT NULL DEFAULT 0,  -- attempts ended by a spot eviction with notice
    deadline_at    REAL,                   -- the job's deadline (epoch s), if it has one
    progress_s     REAL NOT NULL DEFAULT 0, -- a deadline job's compute time up to its newest checkpoint
    workspace      TEXT NOT NULL DEFAULT 'default',  -- roles, quotas and datastores belong to it
    secrets        TEXT                    -- the job's secret values, sealed (raybatch.runtime.secrets)
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
-- covers the scheduler's per-cycle read of the queue (no table lookups at 10k queued)
CREATE INDEX IF NOT EXISTS jobs_queue_keys ON jobs (state, priority DESC, seq, id, attempt);
-- the scheduler's per-cycle read of the jobs with a deadline that are not over (few among
-- many; finished ones leave it). The WHERE must read as Store.deadline_jobs's, word for
-- word, for SQLite to use it. (It replaces jobs_deadline, which kept finished jobs too.)
DROP INDEX IF EXISTS jobs_deadline;
CREATE INDEX IF NOT EXISTS jobs_deadline_open ON jobs (seq)
    WHERE deadline_at IS NOT NULL AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED');
CREATE TABLE IF NOT EXISTS transitions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL,
    at         REAL NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions (job_id, id);
CREATE TABLE IF NOT EXISTS attempts (
    job_id      TEXT NOT NULL,
    n           INTEGER NOT NULL,
    ray_job_id  TEXT NOT NULL,
    started_at  REAL NOT NULL,
    running_at  REAL,
    ended_at    REAL,
    outcome     TEXT,
    exit_code   INTEGER,
    reason      TEXT,
    lost_nodes  TEXT,            -- JSON list of node ids where a rank was lost
    nodes       TEXT,            -- JSON list: the node the scheduler gave each bundle
    progress_start REAL,         -- a deadline job's progress when this attempt started running
    checkpoint_at  REAL,         -- ... the newest checkpoint file's time seen while it ran
    deadline_rule  INTEGER,      -- ... the rule that chose its node class (raybatch.scheduler.deadline)
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS ranks (
    job_id     TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    rank       INTEGER NOT NULL,
    node_rank  INTEGER NOT NULL,
    local_rank INTEGER NOT NULL,
    node_id    TEXT,
    node_ip    TEXT,
    hostname   TEXT,
    pid        INTEGER,
    exit_code  INTEGER,
    role       TEXT,             -- rank, chief, worker, ps, mpirun, mpi-node, launcher, idle
    PRIMARY KEY (job_id, attempt, rank)
);
-- an array job's slots: each a gang the policy admitted for one attempt of the job
CREATE TABLE IF NOT EXISTS slots (
    job_id      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    slot        INTEGER NOT NULL,
    nodes       TEXT NOT NULL,     -- JSON list: the node of each bundle
    state       TEXT NOT NULL,     -- granted | revoked (draining or preempted) | released
    granted_at  REAL NOT NULL,
    revoked_at  REAL,
    reason      TEXT,              -- why it was revoked
    preempted_by TEXT,
    released_at REAL,
    PRIMARY KEY (job_id, attempt, slot)
);
CREATE INDEX IF NOT EXISTS slots_live ON slots (state, job_id);
-- the cluster's nodes as the server saw them (raybatch.scheduler.nodes): one row per Ray
-- node id (or "ip:<address>" for a node the autoscaler set up before it joined Ray)
CREATE TABLE IF NOT EXISTS nodes (
    node_id     TEXT PRIMARY KEY,
    node_type   TEXT,
    vm_size     TEXT,
    spot        INTEGER NOT NULL DEFAULT 0,
    head        INTEGER NOT NULL DEFAULT 0,
    ip          TEXT,
    state       TEXT NOT NULL,     -- preparing|idle|running|unusable|leaving; ended: preempted|terminated|lost
    state_since REAL NOT NULL,
    reason      TEXT,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    ended_at    REAL,
    end_reason  TEXT,
    idle_s      REAL NOT NULL DEFAULT 0,  -- seconds spent idle before state_since (cost: idle hours)
    running_s   REAL NOT NULL DEFAULT 0   -- seconds spent running before state_since
);
CREATE INDEX IF NOT EXISTS nodes_live ON nodes (ended_at, node_id);
-- a workspace's job list, newest first (the API's list for a non-admin caller)
CREATE INDEX IF NOT EXISTS jobs_workspace ON jobs (workspace, seq);
-- API tokens (raybatch.server.identity): only the SHA-256 of each, never the token
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    user        TEXT NOT NULL,
    workspace   TEXT NOT NULL,     -- '*' for an admin token
    role        TEXT NOT NULL,     -- reader | contributor | owner | admin
    created_at  REAL NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  REAL,
    revoked_at  REAL
);
-- every state-changing request (raybatch.server.access): who, what, when, from where, result
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,
    user       TEXT,               -- NULL: no valid token
    token_id   TEXT,               -- NULL: the owner token (or none)
    workspace  TEXT,               -- the workspace the request acted in, when it names one
    method     TEXT NOT NULL,
    path       TEXT NOT NULL,
    client     TEXT,
    status     INTEGER NOT NULL,
    target     TEXT                -- what it made, when the path does not say (a submit's job ids)
);
CREATE INDEX IF NOT EXISTS audit_workspace ON audit (workspace, id);
"""

SLOT_GRANTED, SLOT_REVOKED, SLOT_RELEASED = "granted", "revoked", "released"
# the final states as SQL, literally (a partial index is used only for a WHERE that repeats
# its own: bound parameters do not)
_FINAL_SQL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
assert {s.value for s in FINAL_STATES} == {"SUCCEEDED", "FAILED", "CANCELLED"}

_JOB_COLUMNS = (
    "seq", "id", "name", "experiment", "priority", "state", "spec", "code_package", "job_dir",
    "submitted_at", "updated_at", "started_at", "ended_at", "exit_code", "reason", "attempt",
    "user_retries", "infra_retries", "cancel_requested", "preempt_requested", "preempted_by",
    "preemptions", "evictions", "deadline_at", "progress_s", "workspace",
)
# Columns added after the first release: (table, column, declaration), added to older files.
_ADDED_COLUMNS = (
    ("jobs", "preempt_requested", "REAL"),
    ("jobs", "preempted_by", "TEXT"),
    ("jobs", "preemptions", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "evictions", "INTEGER NOT NULL DEFAULT 0"),
    ("attempts", "nodes", "TEXT"),
    ("ranks", "role", "TEXT"),
    ("jobs", "deadline_at", "REAL"),
    ("jobs", "progress_s", "REAL NOT NULL DEFAULT 0"),
    ("attempts", "progress_start", "REAL"),
    ("attempts", "checkpoint_at", "REAL"),
    ("attempts", "deadline_rule", "INTEGER"),
    ("nodes", "idle_s", "REAL NOT NULL DEFAULT 0"),
    ("nodes", "running_s", "REAL NOT NULL DEFAULT 0"),
    ("jobs", "workspace", "TEXT NOT NULL DEFAULT 'default'"),
    ("jobs", "secrets", "TEXT"),
)
_MUTABLE_JOB_FIELDS = frozenset(_JOB_COLUMNS) - {"seq", "id", "spec", "submitted_at"}


BUSY_TIMEOUT_MS = 1000


class StoreBusy(sqlite3.OperationalError):
    """The store cannot take a write now (another thread holds it, or another process
    holds the database): nothing was written. The API answers 503."""


def new_job_id() -> str:
    return "rb-" + secrets.token_hex(4)


def _row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row)}


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._changed: set[str] = set()  # jobs created or moved since take_changed()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = _row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL
        # another process holding the database (a locked file, a backup) fails a write after
        # this long, not 5 s: the scheduler retries next cycle, the API answers 503
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._migrate()
        self._db.executescript(SCHEMA)

    def _migrate(self) -> None:
        """Bring a store written by an older raybatch up to this schema (adds columns)."""
        for table, column, decl in _ADDED_COLUMNS:
            cols = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
            if cols and column not in cols:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- helpers ----------------------------------------------------------
    def _tx(self, wait: Optional[float] = None):
        return _Transaction(self, wait)

    def _one(self, sql: str, args: Iterable[Any] = ()) -> Optional[dict[str, Any]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchone()

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _by_ids(self, columns: str, job_ids: list[str], tuples: bool = False) -> list[Any]:
        """``SELECT columns FROM jobs`` for these ids (500 per query: SQLite's variable
        limit); rows as dicts, or plain tuples for the scheduler's hot path."""
        out: list[Any] = []
        with self._lock:
            cur = self._db.cursor()
            if tuples:
                cur.row_factory = None
            for i in range(0, len(job_ids), 500):
                chunk = job_ids[i:i + 500]
                out += cur.execute(f"SELECT {columns} FROM jobs WHERE id IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()
        return out

    def workspaces_of(self, job_ids: list[str]) -> dict[str, str]:
        """job id -> its workspace, for these jobs."""
        return dict(self._by_ids("id, workspace", job_ids, tuples=True))

    def jobs_by_id(self, job_ids: list[str]) -> list[dict[str, Any]]:
        """These jobs' rows, in the order given (unknown ids left out)."""
        rows = {r["id"]: r for r in self._by_ids("*", job_ids)}
        return [rows[i] for i in job_ids if i in rows]

    # ---- jobs -------------------------------------------------------------
    def create_job(
        self, *, name: str, experiment: str, priority: int, spec: dict[str, Any],
        job_dir_for: Any, code_package: Optional[str] = None, reason: str = "submitted",
        deadline_at: Optional[float] = None, wait: Optional[float] = None, workspace: str = "default",
        secrets: Optional[str] = None,
    ) -> dict[str, Any]:
        """Insert a QUEUED job. ``job_dir_for(job_id)`` gives its directory; ``deadline_at``:
        its absolute deadline (epoch s), if it has one; ``wait``: as in ``create_jobs``;
        ``secrets``: its secret values, already sealed (the store never sees them in clear)."""
        return self.create_jobs([dict(name=name, experiment=experiment, priority=priority, spec=spec,
                                      job_dir_for=job_dir_for, code_package=code_package,
                                      deadline_at=deadline_at, workspace=workspace, secrets=secrets)],
                                reason, wait)[0]

    def create_jobs(self, jobs: list[dict[str, Any]], reason: str = "submitted",
                    wait: Optional[float] = None) -> list[dict[str, Any]]:
        """Insert QUEUED jobs in one transaction (all or none), in order. Each item has
        the keyword arguments of ``create_job``. ``wait``: at most this many seconds for the
        store (0: not at all, for callers on the event loop), else ``StoreBusy``; None: as
        every other write."""
        now = time.time()
        ids = []
        with self._tx(wait) as db:
            for j in jobs:
                for _ in range(10):
                    job_id = new_job_id()
                    if not db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
                        break
                db.execute(
                    "INSERT INTO jobs (id, name, experiment, priority, state, spec, code_package, job_dir,"
                    " submitted_at, updated_at, deadline_at, workspace, secrets)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (job_id, j["name"], j["experiment"], j["priority"], JobState.QUEUED.value,
                     json.dumps(j["spec"]), j.get("code_package"), str(j["job_dir_for"](job_id)), now, now,
                     j.get("deadline_at"), j.get("workspace") or "default", j.get("secrets")),
                )
                db.execute(
                    "INSERT INTO transitions (job_id, at, from_state, to_state, reason) VALUES (?,?,?,?,?)",
                    (job_id, now, None, JobState.QUEUED.value, reason),
                )
                ids.append(job_id)
            self._changed.update(ids)
            return self.jobs_by_id(ids)  # still holding the (reentrant) lock: no second wait

    def get_job(self, job_id: str) -> Optional[dict[str, Any]]:
        return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def job_workspace(self, job_id: str) -> Optional[str]:
        """The workspace of a job (None: no such job): what the API's access check reads."""
        row = self._one("SELECT workspace FROM jobs WHERE id=?", (job_id,))
        return row["workspace"] if row else None

    def list_jobs(
        self, *, states: Optional[Iterable[JobState]] = None, experiment: Optional[str] = None,
        limit: int = 1000, workspaces: Optional[Iterable[str]] = None,
    ) -> list[dict[str, Any]]:
        """Newest first; ``workspaces``: only jobs of these (None: every workspace)."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if workspaces is not None:
            ws = sorted(set(workspaces))
            if not ws:
                return []
            sql += f" AND workspace IN ({','.join('?' * len(ws))})"
            args += ws
        if states:
            st = [s.value for s in states]
            sql += f" AND state IN ({','.join('?' * len(st))})"
            args += st
        if experiment:
            sql += " AND experiment=?"
            args.append(experiment)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return self._all(sql, args)

    def queued_jobs(self) -> list[dict[str, Any]]:
        """The queue: priority (high first), then submission order."""
        return self._all(
            "SELECT * FROM jobs WHERE state=? ORDER BY priority DESC, seq ASC", (JobState.QUEUED.value,),
        )

    def queue_keys(self) -> list[tuple[str, int, int]]:
        """(id, seq, attempt) of each queued job, in queue order: the scheduler's hot
        path, as plain tuples (at 10k queued jobs, building a dict per row and
        reading the specs would cost more than the policy itself)."""
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = None
            return cur.execute(
                "SELECT id, seq, attempt FROM jobs WHERE state=? ORDER BY priority DESC, seq ASC",
                (JobState.QUEUED.value,),
            ).fetchall()

    def take_changed(self) -> set[str]:
        """Ids of the jobs created or moved to another state (by this Store object)
        since the last call: lets the scheduler follow the queue without reading it
        whole every cycle."""
        with self._lock:
            changed, self._changed = self._changed, set()
        return changed

    def changed_peek(self) -> set[str]:
        """The ids ``take_changed`` would return now, left for it (the deadline scheduler's
        hook: which of the rows it read before the plan the cycle has moved since)."""
        with self._lock:
            return set(self._changed)

    def queue_rows(self, job_ids: list[str]) -> list[tuple[str, str, int, int]]:
        """(id, state, seq, attempt) of the given jobs."""
        return self._by_ids("id, state, seq, attempt", job_ids, tuples=True)

    def specs(self, job_ids: list[str]) -> dict[str, str]:
        """Job id -> spec JSON, for the given jobs."""
        return dict(self._by_ids("id, spec", job_ids, tuples=True))

    def active_jobs(self) -> list[dict[str, Any]]:
        return self._all(
            "SELECT * FROM jobs WHERE state IN (?,?) ORDER BY seq",
            (JobState.STARTING.value, JobState.RUNNING.value),
        )

    # the columns the deadline scheduler reads each cycle (no spec: it is cached, parsed)
    DEADLINE_COLUMNS = ("id", "seq", "state", "attempt", "submitted_at", "deadline_at", "progress_s", "job_dir")

    def deadline_jobs(self, job_ids: Optional[Iterable[str]] = None) -> list[dict[str, Any]]:
        """The jobs with a deadline that are not over (raybatch.scheduler.deadline_jobs), in
        submission order (``job_ids``: only these): ``DEADLINE_COLUMNS`` of the job, and of
        its latest attempt (``attempt``) ``last_running_at`` and ``last_rule`` (its
        ``deadline_rule``). One query, on the partial index ``jobs_deadline_open``."""
        cols = ", ".join(f"j.{c}" for c in self.DEADLINE_COLUMNS)
        sql = (f"SELECT {cols}, a.running_at AS last_running_at, a.deadline_rule AS last_rule "
               f"FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id AND a.n = j.attempt "
               f"WHERE j.deadline_at IS NOT NULL AND j.state NOT IN {_FINAL_SQL}")
        if job_ids is None:
            return self._all(sql + " ORDER BY j.seq")
        ids, out = sorted(set(job_ids)), []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out += self._all(sql + f" AND j.id IN ({','.join('?' * len(chunk))})", chunk)
        return sorted(out, key=lambda r: r["seq"])

    def count_by_state(self) -> dict[str, int]:
        rows = self._all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def transition(
        self, job_id: str, to: JobState, reason: str, *, expect: Optional[JobState] = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Move a job to ``to`` and record why, atomically (compare-and-set on the
        current state). Extra ``fields`` update job columns in the same transaction."""
        return self.chain(job_id, [Step(to, reason, fields)], expect=expect)

    def chain(self, job_id: str, steps: list["Step"], *, expect: Optional[JobState] = None,
              attempt: Optional[tuple[int, dict[str, Any]]] = None) -> dict[str, Any]:
        """Several transitions (e.g. RESTARTING -> QUEUED), and the ended attempt's fields
        (``attempt``: (n, fields)), in ONE transaction: a crash or a failed write leaves
        the job where it was, never half way (a job left RESTARTING would never run)."""
        for step in steps:
            bad = set(step.fields) - _MUTABLE_JOB_FIELDS
            if bad:
                raise ValueError(f"not job fields: {sorted(bad)}")
        attempt_sets = _attempt_sets(attempt[1]) if attempt else None
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            src = JobState(row["state"])
            if expect is not None and src != expect:
                raise InvalidTransition(f"{job_id} is {src.value}, expected {expect.value}")
            if attempt_sets is not None:
                sets, values = attempt_sets
                db.execute(f"UPDATE attempts SET {sets} WHERE job_id=? AND n=?", (*values, job_id, attempt[0]))
            for step in steps:
                check_transition(src, step.to)
                fields = {**step.fields, "state": step.to.value, "updated_at": now, "reason": step.reason}
                if step.to in FINAL_STATES:
                    fields.setdefault("ended_at", now)
                sets = ", ".join(f"{k}=?" for k in fields)
                db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job_id))
                db.execute(
                    "INSERT INTO transitions (job_id, at, from_state, to_state, reason) VALUES (?,?,?,?,?)",
                    (job_id, now, src.value, step.to.value, step.reason),
                )
                src = step.to
            self._changed.add(job_id)
        return self.get_job(job_id)  # type: ignore[return-value]

    def requeue_stranded(self) -> list[str]:
        """The start-up sweep: jobs a crash left between two states of a chain that ends in
        QUEUED (written before chains were one transaction, or by a store edited by hand)
        go on to QUEUED. Returns their ids."""
        rows = self._all("SELECT id, state FROM jobs WHERE state IN (?, ?)",
                         (JobState.RESTARTING.value, JobState.PREEMPTED.value))
        done = []
        for row in rows:
            try:
                self.transition(row["id"], JobState.QUEUED, f"requeued at server start (it was left {row['state']})",
                                expect=JobState(row["state"]))
                done.append(row["id"])
            except InvalidTransition:
                pass  # moved meanwhile
        return done

    def update_job(self, job_id: str, **fields: Any) -> None:
        bad = set(fields) - _MUTABLE_JOB_FIELDS - {"state"}
        if bad or "state" in fields:
            raise ValueError(f"use transition() for state; not updatable: {sorted(bad)}")
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job_id))

    def transitions(self, job_id: str) -> list[dict[str, Any]]:
        return self._all(
            "SELECT at, from_state, to_state, reason FROM transitions WHERE job_id=? ORDER BY id",
            (job_id,),
        )

    # ---- attempts and ranks ----------------------------------------------
    def add_attempt(self, job_id: str, n: int, ray_job_id: str, nodes: Optional[list[str]] = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO attempts (job_id, n, ray_job_id, started_at, nodes) VALUES (?,?,?,?,?)",
                (job_id, n, ray_job_id, time.time(), json.dumps(nodes) if nodes else None),
            )

    def update_attempt(self, job_id: str, n: int, **fields: Any) -> None:
        sets, values = _attempt_sets(fields)
        with self._tx() as db:
            db.execute(f"UPDATE attempts SET {sets} WHERE job_id=? AND n=?", (*values, job_id, n))

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM attempts WHERE job_id=? ORDER BY n", (job_id,))
        return [_decode_attempt(r) for r in rows]

    def lost_nodes(self, job_id: str) -> set[str]:
        """Nodes on which any attempt of this job lost a rank."""
        return {node for a in self.attempts(job_id) for node in a["lost_nodes"]}

    def get_attempt(self, job_id: str, n: int) -> Optional[dict[str, Any]]:
        return _decode_attempt(self._one("SELECT * FROM attempts WHERE job_id=? AND n=?", (job_id, n)))

    def set_ranks(self, job_id: str, attempt: int, ranks: list[dict[str, Any]]) -> None:
        cols = ("rank", "node_rank", "local_rank", "node_id", "node_ip", "hostname", "pid", "exit_code", "role")
        with self._tx() as db:
            for r in ranks:
                db.execute(
                    f"INSERT OR REPLACE INTO ranks (job_id, attempt, {', '.join(cols)})"
                    f" VALUES (?,?,{','.join('?' * len(cols))})",
                    (job_id, attempt, *(r.get(c) for c in cols)),
                )

    def ranks(self, job_id: str, attempt: Optional[int] = None) -> list[dict[str, Any]]:
        if attempt is None:
            return self._all("SELECT * FROM ranks WHERE job_id=? ORDER BY attempt, rank", (job_id,))
        return self._all(
            "SELECT * FROM ranks WHERE job_id=? AND attempt=? ORDER BY rank", (job_id, attempt)
        )


    # ---- slots of array jobs ---------------------------------------------------------
    def add_slot(self, job_id: str, attempt: int, slot: int, nodes: list[str]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO slots (job_id, attempt, slot, nodes, state, granted_at) VALUES (?,?,?,?,?,?)",
                       (job_id, attempt, slot, json.dumps(list(nodes)), SLOT_GRANTED, time.time()))

    def revoke_slot(self, job_id: str, attempt: int, slot: int, reason: str,
                    preempted_by: Optional[str] = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE slots SET state=?, revoked_at=?, reason=?, preempted_by=? "
                       "WHERE job_id=? AND attempt=? AND slot=? AND state=?",
                       (SLOT_REVOKED, time.time(), reason, preempted_by, job_id, attempt, slot, SLOT_GRANTED))

    def release_slots(self, job_id: str, attempt: int, slots: Optional[Iterable[int]] = None) -> None:
        """Mark these slots (default: every slot of the attempt) as given back."""
        with self._tx() as db:
            if slots is None:
                db.execute("UPDATE slots SET state=?, released_at=? WHERE job_id=? AND attempt=? AND state!=?",
                           (SLOT_RELEASED, time.time(), job_id, attempt, SLOT_RELEASED))
            else:
                for k in slots:
                    db.execute("UPDATE slots SET state=?, released_at=? WHERE job_id=? AND attempt=? AND slot=? "
                               "AND state!=?", (SLOT_RELEASED, time.time(), job_id, attempt, k, SLOT_RELEASED))

    def next_slot(self, job_id: str, attempt: int) -> int:
        """The number the attempt's next slot gets (slot numbers are never reused)."""
        row = self._all("SELECT MAX(slot) AS m FROM slots WHERE job_id=? AND attempt=?", [job_id, attempt])
        return 0 if not row or row[0]["m"] is None else row[0]["m"] + 1

    def slots(self, job_id: str, attempt: Optional[int] = None, live: bool = False) -> list[dict[str, Any]]:
        """An array job's slots (of one attempt), oldest first; ``live``: not released yet."""
        sql, args = "SELECT * FROM slots WHERE job_id=?", [job_id]
        if attempt is not None:
            sql += " AND attempt=?"
            args.append(attempt)
        if live:
            sql += " AND state!=?"
            args.append(SLOT_RELEASED)
        rows = self._all(sql + " ORDER BY attempt, slot", args)
        for r in rows:
            r["nodes"] = json.loads(r["nodes"])
        return rows

    # ---- the cluster's nodes (raybatch.scheduler.nodes writes them) ------------------
    NODE_FIELDS = ("node_type", "vm_size", "spot", "head", "ip", "state", "state_since", "reason",
                   "first_seen", "last_seen", "ended_at", "end_reason", "idle_s", "running_s")

    def put_node(self, node_id: str, **fields: Any) -> None:
        """Insert or update one node's row (only the fields given change)."""
        bad = set(fields) - set(self.NODE_FIELDS)
        if bad:
            raise ValueError(f"not node fields: {sorted(bad)}")
        with self._tx() as db:
            cur = db.execute(f"UPDATE nodes SET {', '.join(f'{k}=?' for k in fields)} WHERE node_id=?",
                             (*fields.values(), node_id))
            if cur.rowcount == 0:
                db.execute(f"INSERT INTO nodes (node_id, {', '.join(fields)}) VALUES (?{',?' * len(fields)})",
                           (node_id, *fields.values()))

    def touch_nodes(self, node_ids: Iterable[str], at: float) -> None:
        """Set last_seen of these nodes in one transaction."""
        with self._tx() as db:
            db.executemany("UPDATE nodes SET last_seen=? WHERE node_id=?", [(at, i) for i in node_ids])

    def delete_node(self, node_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM nodes WHERE node_id=?", (node_id,))

    def nodes(self, ended: bool = False, since: Optional[float] = None) -> list[dict[str, Any]]:
        """The live nodes (``ended``: also those gone, newest end first; ``since``: only those
        gone after this time), oldest first."""
        if not ended:
            return self._all("SELECT * FROM nodes WHERE ended_at IS NULL ORDER BY first_seen, node_id")
        if since is None:
            return self._all("SELECT * FROM nodes ORDER BY ended_at IS NOT NULL, first_seen, node_id")
        return self._all("SELECT * FROM nodes WHERE ended_at IS NULL OR ended_at >= ? "
                         "ORDER BY ended_at IS NOT NULL, first_seen, node_id", (since,))

    # ---- what the cost report reads (raybatch.scheduler.cost) -------------------------
    def cost_attempts(self, since: Optional[float] = None) -> list[dict[str, Any]]:
        """Every attempt not over before ``since``, with its job's name, experiment, spec'd
        node count and state (``job_*``), oldest first."""
        rows = self._all(
            "SELECT a.*, j.name AS job_name, j.experiment AS job_experiment, j.state AS job_state, "
            "j.attempt AS job_attempt, j.ended_at AS job_ended_at, j.updated_at AS job_updated_at, "
            "json_extract(j.spec, '$.nodes') AS job_nodes "
            "FROM attempts a JOIN jobs j ON j.id = a.job_id "
            "WHERE a.ended_at IS NULL OR a.ended_at >= ? ORDER BY a.started_at, a.job_id, a.n",
            (since if since is not None else float("-inf"),))
        return [_decode_attempt(r) for r in rows]

    def cost_slots(self, since: Optional[float] = None) -> list[dict[str, Any]]:
        """Array jobs' slots not given back before ``since``."""
        rows = self._all("SELECT job_id, attempt, slot, nodes, granted_at, released_at FROM slots "
                         "WHERE released_at IS NULL OR released_at >= ? ORDER BY granted_at",
                         (since if since is not None else float("-inf"),))
        for r in rows:
            r["nodes"] = json.loads(r["nodes"])
        return rows

    # ---- API tokens and the audit log (raybatch.server.identity, raybatch.server.access) --
    def add_token(self, token_hash: str, *, user: str, workspace: str, role: str,
                  expires_at: Optional[float], created_by: str) -> dict[str, Any]:
        """Store a new token's hash; its row."""
        token_id = "tok-" + secrets.token_hex(6)
        with self._tx() as db:
            db.execute("INSERT INTO tokens (id, token_hash, user, workspace, role, created_at, created_by, "
                       "expires_at) VALUES (?,?,?,?,?,?,?,?)",
                       (token_id, token_hash, user, workspace, role, time.time(), created_by, expires_at))
        return self._one("SELECT * FROM tokens WHERE id=?", (token_id,))  # type: ignore[return-value]

    def tokens(self, workspace: Optional[str] = None) -> list[dict[str, Any]]:
        """Every token's row (with its hash: for the server's registry), oldest first."""
        if workspace is None:
            return self._all("SELECT * FROM tokens ORDER BY created_at, id")
        return self._all("SELECT * FROM tokens WHERE workspace=? ORDER BY created_at, id", (workspace,))

    def get_token(self, token_id: str) -> Optional[dict[str, Any]]:
        return self._one("SELECT * FROM tokens WHERE id=?", (token_id,))

    def revoke_token(self, token_id: str) -> Optional[dict[str, Any]]:
        """Mark a token revoked (kept, for the audit log's sake); its row, None if unknown."""
        with self._tx() as db:
            db.execute("UPDATE tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (time.time(), token_id))
        return self.get_token(token_id)

    AUDIT_FIELDS = ("at", "user", "token_id", "workspace", "method", "path", "client", "status", "target")

    def add_audit(self, records: list[tuple]) -> None:
        """Append audit records (tuples in ``AUDIT_FIELDS`` order) in one transaction."""
        with self._tx() as db:
            db.executemany(f"INSERT INTO audit ({', '.join(self.AUDIT_FIELDS)}) VALUES "
                           f"({','.join('?' * len(self.AUDIT_FIELDS))})", records)

    def prune_audit(self, before: float, batch: int = 10_000) -> int:
        """Delete audit records made before ``before`` (a time), oldest first, ``batch`` per
        transaction (other writers wait for one batch at most); how many were deleted. Ids
        follow time, so each batch reads the oldest ids only and no index on ``at`` is needed."""
        deleted = 0
        while True:
            with self._tx() as db:
                n = db.execute("DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?) AND at < ?",
                               (batch, before)).rowcount
            deleted += n
            if n < batch:
                return deleted

    def audit(self, workspace: Optional[str] = None, limit: int = 200,
              before: Optional[int] = None) -> list[dict[str, Any]]:
        """Audit records, newest first (``workspace``: only that one's; ``before``: ids below)."""
        sql, args = "SELECT * FROM audit WHERE 1=1", []
        if workspace is not None:
            sql += " AND workspace=?"
            args.append(workspace)
        if before is not None:
            sql += " AND id<?"
            args.append(before)
        return self._all(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))


def _decode_attempt(row: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if row is not None:
        row["lost_nodes"] = json.loads(row["lost_nodes"]) if row["lost_nodes"] else []
        row["nodes"] = json.loads(row["nodes"]) if row.get("nodes") else []
    return row


@dataclass(frozen=True)
class Step:
    """One transition of a ``Store.chain``."""
    to: JobState
    reason: str
    fields: dict[str, Any] = dataclass_field(default_factory=dict)


_ATTEMPT_FIELDS = {"running_at", "ended_at", "outcome", "exit_code", "reason", "lost_nodes", "nodes",
                   "progress_start", "checkpoint_at", "deadline_rule"}


def _attempt_sets(fields: dict[str, Any]) -> tuple[str, list[Any]]:
    """``SET`` clause and values for attempt columns (lists stored as JSON)."""
    fields = dict(fields)
    if "lost_nodes" in fields:
        fields["lost_nodes"] = json.dumps(sorted(fields["lost_nodes"] or []))
    if "nodes" in fields:
        fields["nodes"] = json.dumps(list(fields["nodes"] or []))
    if set(fields) - _ATTEMPT_FIELDS:
        raise ValueError(f"not attempt fields: {sorted(set(fields) - _ATTEMPT_FIELDS)}")
    return ", ".join(f"{k}=?" for k in fields), list(fields.values())


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the store's lock. With ``wait`` (seconds),
    neither the lock nor the database is waited for longer: ``StoreBusy``, nothing written."""

    def __init__(self, store: Store, wait: Optional[float] = None):
        self.store = store
        self.wait = wait

    def __enter__(self) -> sqlite3.Connection:
        db, wait, lock = self.store._db, self.wait, self.store._lock
        if not lock.acquire(timeout=-1 if wait is None else wait):  # 0: not at all
            raise StoreBusy("the job store is busy (another request holds it)")
        try:  # whatever fails here, the lock goes back: no later write may wait on it forever
            if wait is None:
                db.execute("BEGIN IMMEDIATE")
            else:
                db.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
                try:
                    db.execute("BEGIN IMMEDIATE")
                finally:
                    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.OperationalError as e:
            lock.release()
            raise StoreBusy(f"the job store is unavailable: {e}") from None
        except BaseException:
            lock.release()
            raise
        return db

    def __exit__(self, exc_type, exc, tb) -> None:
        db = self.store._db
        try:
            if exc_type is None:
                try:
                    db.execute("COMMIT")
                    return
                except sqlite3.Error:  # a full disk at commit: never leave the transaction open
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            if db.in_transaction:
                db.execute("ROLLBACK")
        finally:
            self.store._lock.release()
