"""An array job's items: the frozen listing and the record of each finished task, kept in
the job's directory (``items/``: a path or blob storage), so that a retry, a restarted
driver, a restarted server or ``submit --resume-from`` skips what is done.

    items/manifest.jsonl   one item per line: {"index", "key", "value", "size", "etag"}
    items/<task>.json      a finished task: done (exited 0, outputs out) or failed for good

A task is ``items_per_task`` consecutive items; task t holds items t*k .. t*k+k-1."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from raybatch.spec.array import ArraySpec, glob_match
from raybatch.storage.backends import Backend, StorageError

MANIFEST = "manifest.jsonl"
READ_CHUNK = 8 << 20


@dataclass(frozen=True)
class Item:
    index: int
    key: str     # unique and path-safe: the file's path below `over`'s base, or the index
    value: str   # what the process gets: that path (relative to the base), the value, or the index
    size: int = 0
    etag: str = ""


@dataclass
class Task:
    index: int
    items: list[Item]

    @property
    def key(self) -> str:
        """The task's output directory name: its first item's key."""
        return self.items[0].key


@dataclass
class Record:
    """A finished task."""

    task: int
    state: str                        # done | failed
    keys: list[str] = field(default_factory=list)
    exit_code: Optional[int] = None
    runs: int = 0                     # how many times its command ran (retries, reruns)
    job_id: str = ""                  # the job that ran it (another one's, when resumed)
    attempt: int = 0                  # ... and which attempt of that job
    slot: Optional[int] = None
    nodes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    at: float = 0.0
    message: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def list_items(array: ArraySpec, over: Optional[Backend]) -> list[Item]:
    """The items, in a stable order: files sorted by path, or the indices, or the values."""
    if array.count is not None:
        return [Item(i, str(i), str(i)) for i in range(array.count)]
    if array.values is not None:
        return [Item(i, str(i), _text(v)) for i, v in enumerate(array.values)]
    assert over is not None
    entries = sorted((e for e in over.list() if e.path and glob_match(e.path, array.pattern)
                      and not e.path.rsplit("/", 1)[-1].startswith(".")), key=lambda e: e.path)
    return [Item(i, e.path, e.path, e.size, e.etag or "") for i, e in enumerate(entries)]


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def tasks_of(items: list[Item], per_task: int) -> list[Task]:
    return [Task(t, items[i:i + per_task]) for t, i in enumerate(range(0, len(items), per_task))]


class ItemStore:
    """``items/`` of one job, through its storage backend."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def read_manifest(self) -> Optional[list[Item]]:
        text = self._read(MANIFEST)
        if text is None:
            return None
        return [Item(**json.loads(line)) for line in text.splitlines() if line.strip()]

    def write_manifest(self, items: list[Item]) -> None:
        self._write(MANIFEST, "".join(json.dumps(asdict(i)) + "\n" for i in items))

    def records(self) -> dict[int, Record]:
        """Every finished task's record."""
        out = {}
        for e in self.backend.list():
            name = e.path
            if "/" not in name and name.endswith(".json") and name[:-5].isdigit():
                rec = self.record(int(name[:-5]))
                if rec is not None:
                    out[rec.task] = rec
        return out

    def record(self, task: int) -> Optional[Record]:
        """One task's record (None: it has not finished)."""
        text = self._read(f"{task}.json")
        if not text:
            return None
        try:
            return Record.from_dict(json.loads(text))
        except (ValueError, TypeError):
            return None  # a torn write of an older raybatch: the task simply runs again

    def write_record(self, record: Record) -> None:
        record.at = record.at or time.time()
        self._write(f"{record.task}.json", json.dumps(asdict(record)))

    def _read(self, rel: str) -> Optional[str]:
        chunks, offset = [], 0
        while True:
            data, size = self.backend.read(rel, offset, READ_CHUNK)
            if not data and offset == 0 and size == 0:
                try:
                    exists = any(e.path == "" for e in self.backend.list(rel))
                except StorageError:
                    exists = False
                return "" if exists else None
            chunks.append(data)
            offset += len(data)
            if offset >= size or not data:
                return b"".join(chunks).decode()

    def _write(self, rel: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix="raybatch-items-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self.backend.upload(Path(tmp), rel)
        finally:
            os.unlink(tmp)
