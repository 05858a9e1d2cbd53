"""What the web pages show, read the way the API reads it.

The pages reuse the API's own route functions (the queue with its reasons and start
estimates, a job's files, logs, metrics, a sweep's trials, an array's items) by taking them
from the route modules' routers: one implementation of each, and no HTTP hop from the server
to itself. The one query of their own is the job list's, because the list page needs what the
API's list has no use for: keyset paging (``before`` a submission number, never OFFSET, so
page 200 costs what page 1 does) and a name search."""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from raybatch.state.states import JobState
from raybatch.state.store import Store

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

# a state with more jobs than this is read along the submission order (it fills a page
# quickly); a rarer one through the state index (few rows to sort)
COMMON_STATE = 2000
LIST_COLUMNS = ("seq, id, name, experiment, workspace, priority, state, attempt, submitted_at, started_at, ended_at, "
                "exit_code, reason, json_extract(spec, '$.nodes') AS nodes")


def endpoint(module: Any, ctx: ServerContext, path: str, method: str = "GET") -> Callable[..., Any]:
    """The function behind ``method path`` of a route module (raybatch.server.routes.*).
    Call it with every parameter given: its defaults are FastAPI's ``Query`` markers."""
    for route in module.router(ctx).routes:
        if getattr(route, "path", None) == path and method in getattr(route, "methods", ()):
            return route.endpoint
    raise LookupError(f"{module.__name__} has no route {method} {path}")


class JobList:
    """The job list's query, on a read-only connection of its own per thread: the list
    never waits for the store's lock (the scheduler's writes hold it), and WAL lets it read
    while they write."""

    def __init__(self, store: Store):
        self.path = str(store.path)
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA query_only=1")
            db.execute("PRAGMA busy_timeout=5000")
            self._local.db = db
        return db

    def page(self, *, state: Optional[JobState] = None, experiment: Optional[str] = None,
             search: Optional[str] = None, before: Optional[int] = None,
             limit: int = 50, workspaces: Optional[frozenset[str]] = None) -> tuple[list[dict[str, Any]], Optional[int]]:
        """Newest first: up to ``limit`` jobs submitted before the job numbered ``before``,
        and the ``before`` of the next page (None on the last page). ``search``: a part of the
        name or id (case-insensitive)."""
        sql, args = f"SELECT {LIST_COLUMNS} FROM jobs WHERE 1=1", []
        if state is not None:
            # 10,000 QUEUED through the state index is 10,000 rows sorted for 50 shown (6 ms);
            # "+state" keeps SQLite on the primary key, newest first, stopping at the 51st match
            common = self._db().execute("SELECT COUNT(*) FROM jobs WHERE state=?", (state.value,)).fetchone()[0]
            sql += " AND +state=?" if common > COMMON_STATE else " AND state=?"
            args.append(state.value)
        if experiment:
            sql += " AND experiment=?"
            args.append(experiment)
        sql, args = _in_workspaces(sql, args, workspaces)
        if search:
            like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += " AND (name LIKE ? ESCAPE '\\' OR id LIKE ? ESCAPE '\\')"
            args += [like, like]
        if before is not None:
            sql += " AND seq < ?"
            args.append(before)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = [dict(r) for r in self._db().execute(sql, args).fetchall()]
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1]["seq"] if more else None)

    def counts(self, workspaces: Optional[frozenset[str]] = None) -> dict[str, int]:
        """Jobs per state (one pass over the state index, not the table); ``workspaces``:
        only theirs (None: every workspace)."""
        sql, args = _in_workspaces("SELECT state, COUNT(*) AS n FROM jobs WHERE 1=1", [], workspaces)
        rows = self._db().execute(sql + " GROUP BY state", args).fetchall()
        return {r["state"]: r["n"] for r in rows}

    def experiments(self, limit: int = 200, workspaces: Optional[frozenset[str]] = None) -> list[str]:
        """The experiments of the newest jobs (for the filter's suggestions; bounded)."""
        sql, args = _in_workspaces("SELECT experiment FROM jobs WHERE 1=1", [], workspaces)
        rows = self._db().execute(
            f"SELECT DISTINCT experiment FROM ({sql} ORDER BY seq DESC LIMIT 2000) "
            "ORDER BY experiment LIMIT ?", (*args, limit)).fetchall()
        return [r["experiment"] for r in rows]


def _in_workspaces(sql: str, args: list[Any], workspaces: Optional[frozenset[str]]) -> tuple[str, list[Any]]:
    """``sql`` narrowed to jobs of these workspaces (None: no narrowing; empty: none)."""
    if workspaces is None:
        return sql, args
    ws = sorted(workspaces) or [""]
    return sql + f" AND workspace IN ({','.join('?' * len(ws))})", [*args, *ws]


def failing_ranks(attempt: Any) -> tuple[Optional[int], set[int]]:
    """The rank that failed the attempt (its exit code is the attempt's; else the first with
    a non-zero code) and every rank that exited non-zero (the others were stopped after it)."""
    nonzero = {r.rank for r in attempt.ranks if r.exit_code not in (None, 0)}
    if not nonzero:
        return None, nonzero
    same = [r.rank for r in attempt.ranks if r.rank in nonzero and r.exit_code == attempt.exit_code]
    return (same[0] if same else min(nonzero)), nonzero


def metric_series(events: list[Any], max_metrics: int = 8) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Metric name -> {"run N": [(step, value)]}: one chart per metric, one line per attempt."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for e in events:
        if e.name not in out and len(out) >= max_metrics:
            continue
        out.setdefault(e.name, {}).setdefault(f"run {e.run or 1}", []).append((e.step, e.value))
    return out
