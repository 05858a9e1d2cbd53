"""A sweep's trials, as records in its job directory (a path or blob storage):

    trials/trials.jsonl      the journal: one line per trial that ended (done, failed, early
                             terminated), appended and flushed (fsync on a path) as it ends;
                             the last line of a trial wins
    trials/ids.jsonl         Tune's trial id -> raybatch's trial number, as each trial starts

A trial's id is ``<job id>.t<n>``. Its files: ``stdouterr/trials/<n>/attempt-<run>/rank-<r>/``,
``checkpoints/trials/<n>/``, ``outputs/<id>/trials/<n>/``.

After a lost driver, the next attempt restores Tune's experiment; a trial Tune did not see
end but the journal did is not run again: its recorded metrics are replayed."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from raybatch.storage.backends import Backend
from raybatch.sweep import split_trial_id, trial_id  # noqa: F401 - part of this module's interface

JOURNAL = "trials.jsonl"
IDS = "ids.jsonl"
FINAL_STATES = ("done", "failed", "early_terminated", "cancelled")  # cancelled: limits.timeout came
TRIAL_STATES = ("pending", "running", *FINAL_STATES)


@dataclass
class TrialRecord:
    n: int
    params: dict[str, Any]
    state: str = "pending"            # one of TRIAL_STATES
    tune_id: str = ""
    runs: int = 0                      # how many times its command ran (a preempted trial runs again)
    best: Optional[float] = None       # the primary metric: its best value ...
    last: Optional[float] = None       # ... its last one
    reports: int = 0                   # ... how many times it was reported
    exit_code: Optional[int] = None
    message: str = ""
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    attempt: int = 0                   # the sweep's attempt that ran it
    events: list[dict[str, Any]] = field(default_factory=list)  # every metric event (journal only)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def note(self, value: float, maximize: bool) -> None:
        """One report of the primary metric."""
        self.reports += 1
        self.last = value
        if self.best is None or (value > self.best if maximize else value < self.best):
            self.best = value


class TrialJournal:
    """``trials/`` of one sweep, through its storage backend: appended, never rewritten.
    Slots end trials from their own threads: one append at a time (each appends at the
    size the last one left)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def _append(self, rel: str, line: str) -> None:
        with self._lock:
            if rel not in self._sizes:
                self._sizes[rel] = self.backend.read(rel, 0, 1)[1]
            data = line.encode() + b"\n"
            self.backend.append(rel, data, self._sizes[rel], durable=True)  # before the trial counts as ended
            self._sizes[rel] += len(data)

    def _lines(self, rel: str) -> list[dict[str, Any]]:
        data, size = self.backend.read(rel, 0, 1 << 30)
        out = []
        for raw in data.decode("utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue  # a line cut by a crash: the trial simply did not end
        return out

    def ended(self, record: TrialRecord) -> None:
        record.ended_at = record.ended_at or time.time()
        self._append(JOURNAL, json.dumps(asdict(record)))

    def started(self, tune_id: str, n: int) -> None:
        self._append(IDS, json.dumps({"tune_id": tune_id, "n": n}))

    def records(self) -> dict[int, TrialRecord]:
        """Every trial that ended, by number (its last line)."""
        return {d["n"]: TrialRecord.from_dict(d) for d in self._lines(JOURNAL)}

    def ids(self) -> dict[str, int]:
        return {d["tune_id"]: d["n"] for d in self._lines(IDS)}


def ranked(records: list[TrialRecord], maximize: bool) -> list[TrialRecord]:
    """Best first: trials with a metric by their best value, then the rest by number."""
    def key(r: TrialRecord) -> tuple:
        if r.best is None or not math.isfinite(r.best):
            return (1, 0.0, r.n)
        return (0, -r.best if maximize else r.best, r.n)

    return sorted(records, key=key)
