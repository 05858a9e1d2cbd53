"""A rank's metrics, from three places, as one stream of events (in the rank's actor):

1. ``raybatch.log_metric`` / ``raybatch_metrics.log_metric``: JSON lines appended to
   ``RAYBATCH_METRICS_FILE`` (a file in the rank's scratch directory), read as they grow;
2. stdout lines ``RAYBATCH_METRIC name=value [name=value ...] [step=N]`` and, with the
   job's ``metrics.stdout_regex``, lines that regex matches (each named group a metric),
   parsed by the thread that tees the rank's stdout;
3. MLflow: ``mlflow.log_metric`` and autolog write to a per-rank SQLite tracking store
   (``MLFLOW_TRACKING_URI=sqlite:///...`` unless the job sets its own), read with stdlib
   ``sqlite3``.

Every event is appended to the rank's metric store, ``metrics.jsonl`` next to its
stdout (synced to the job's storage like the logs): ``GET /jobs/{id}/metrics`` reads it.
``since(cursor, timeout)`` blocks until there are events past ``cursor`` (a sweep's trial
turns them into ``tune.report`` calls as they come)."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

LINE_PREFIX = "RAYBATCH_METRIC"
_PREFIX_BYTES = LINE_PREFIX.encode()
FILE_POLL_S = 0.2
MLFLOW_POLL_S = 0.5
_PAIR = re.compile(r"([A-Za-z_][\w./-]*)=(\S+)")


def parse_line(line: str, regex: Optional[re.Pattern] = None) -> list[tuple[str, float, Optional[int]]]:
    """(name, value, step) of the metrics one stdout line carries."""
    out: list[tuple[str, float, Optional[int]]] = []
    text = line.strip()
    if text.startswith(LINE_PREFIX + " "):
        pairs = dict(_PAIR.findall(text[len(LINE_PREFIX):]))
        step = _int(pairs.pop("step", None))
        for name, raw in pairs.items():
            value = _float(raw)
            if value is not None:
                out.append((name, value, step))
    if regex is not None:
        m = regex.search(line)
        if m:
            groups = m.groupdict()
            step = _int(groups.pop("step", None))
            for name, raw in groups.items():
                value = _float(raw)
                if value is not None:
                    out.append((name, value, step))
    return out


def _float(raw: Any) -> Optional[float]:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _int(raw: Any) -> Optional[int]:
    try:
        return None if raw is None else int(float(raw))
    except (TypeError, ValueError):
        return None


def read_mlflow(db: Path, after_rowid: int = 0) -> tuple[list[tuple[str, float, Optional[int], float]], int]:
    """Metrics MLflow wrote to a SQLite tracking store since ``after_rowid``: (name, value,
    step, time) and the last rowid read. Read-only; a store MLflow has not created yet (or
    is migrating) reads as empty."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return [], after_rowid
    try:
        rows = con.execute("SELECT rowid, key, value, step, timestamp FROM metrics WHERE rowid > ? "
                           "ORDER BY rowid", (after_rowid,)).fetchall()
    except sqlite3.Error:
        return [], after_rowid
    finally:
        con.close()
    out = []
    for rowid, key, value, step, ts in rows:
        after_rowid = rowid
        if value is not None and math.isfinite(value):
            out.append((key, float(value), step, (ts or 0) / 1000.0))
    return out, after_rowid


class MetricCollector:
    def __init__(self, store: str, metrics_file: str, mlflow_db: Optional[str], regex: Optional[str]):
        self.store = Path(store)
        self.metrics_file = Path(metrics_file)
        self.mlflow_db = Path(mlflow_db) if mlflow_db else None
        self.regex = re.compile(regex) if regex else None
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.done = False
        self._steps: dict[str, int] = {}
        self._file_offset = 0
        self._rowid = 0
        self._stop = threading.Event()
        self._out = None
        self._thread: Optional[threading.Thread] = None
        self._finishing = threading.Lock()

    def start(self) -> "MetricCollector":
        self.store.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.store, "a", buffering=1)
        self._thread = threading.Thread(target=self._poll, name="metrics", daemon=True)
        self._thread.start()
        return self

    def add(self, name: str, value: float, step: Optional[int], source: str, t: Optional[float] = None) -> None:
        with self.cond:
            if step is None:
                step = self._steps.get(name, -1) + 1
            self._steps[name] = max(step, self._steps.get(name, -1))
            event = {"name": name, "value": value, "step": step, "t": t or time.time(), "source": source}
            self.events.append(event)
            if self._out is not None:
                try:
                    self._out.write(json.dumps(event) + "\n")
                except (OSError, ValueError):
                    pass
            self.cond.notify_all()

    def raw_line(self, raw: bytes) -> None:
        """One line of the rank's stdout as it came: decoded only when it may hold a metric."""
        if self.regex is not None or _PREFIX_BYTES in raw:
            self.line(raw.decode("utf-8", errors="replace"))

    def line(self, text: str) -> None:
        """One line of the rank's stdout."""
        if LINE_PREFIX in text or self.regex is not None:
            for name, value, step in parse_line(text, self.regex):
                self.add(name, value, step, "stdout")

    def _read_file(self) -> None:
        try:
            with open(self.metrics_file, "rb") as f:
                f.seek(self._file_offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._file_offset += end + 1
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
                value = _float(rec["value"])
            except (ValueError, KeyError, TypeError):
                continue
            if value is not None:
                self.add(str(rec["name"]), value, _int(rec.get("step")), "log_metric", rec.get("t"))

    def _read_mlflow(self) -> None:
        if self.mlflow_db is None or not self.mlflow_db.exists():
            return
        rows, self._rowid = read_mlflow(self.mlflow_db, self._rowid)
        for name, value, step, t in rows:
            self.add(name, value, step, "mlflow", t)

    def _poll(self) -> None:
        last_mlflow = 0.0
        while not self._stop.wait(FILE_POLL_S):
            self._read_file()
            if time.monotonic() - last_mlflow > MLFLOW_POLL_S:
                last_mlflow = time.monotonic()
                self._read_mlflow()

    def finish(self) -> None:
        """The process ended: read what is left, and wake every waiter. Once: the rank's
        wait and a terminate may both call it, and the tail must not be read twice."""
        with self._finishing:
            if self.done:
                return
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._read_file()
            self._read_mlflow()
            with self.cond:
                self.done = True
                if self._out is not None:
                    self._out.close()
                    self._out = None
                self.cond.notify_all()

    def since(self, cursor: int, timeout: float) -> tuple[list[dict[str, Any]], bool]:
        """Events past ``cursor``, waiting up to ``timeout`` for one; and whether the stream ended."""
        with self.cond:
            if len(self.events) <= cursor and not self.done:
                self.cond.wait(timeout)
            return self.events[cursor:], self.done
