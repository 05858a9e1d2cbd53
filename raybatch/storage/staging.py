"""Inputs in ``download`` mode: staged onto a node before the user's process starts.

The node's cache (``<cache>/inputs``) is content-addressed and shared by every job
on that node::

    objects/<ab>/<key>        one file's bytes; key = its Content-MD5 and size when the
                              service has one, else a hash of (location, ETag)
    trees/<fingerprint>/      an input as the job sees it: hard links into objects/
    trees/<fingerprint>.done  the tree is complete
    locks/<fingerprint>       flock: one stager per tree per node

The fingerprint hashes the location and every file's path and object key, so a
changed dataset is a new tree, and only its changed files are downloaded again. A
warm tree costs one listing. Staged files are read-only."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from raybatch.storage.backends import Backend, Entry, StorageError, parallel

T = TypeVar("T")
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
TRIES = 4                 # a transient error (connection reset, 503) is retried ...
BACKOFF_S = (1.0, 3.0, 9.0)  # ... after these pauses


def retried(fn: Callable[[], "T"]) -> "T":
    """``fn()``, retrying transient StorageErrors with backoff."""
    for attempt in range(TRIES):
        try:
            return fn()
        except StorageError as e:
            if not e.transient or attempt == TRIES - 1:
                raise
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
    raise AssertionError("unreachable")


@dataclass
class StageResult:
    path: str               # what RAYBATCH_INPUT_<ID> points at
    files: int
    bytes_total: int
    bytes_downloaded: int   # 0 when the cache was warm
    seconds: float


def object_key(backend: Backend, e: Entry) -> str:
    if e.md5:
        return f"md5-{e.md5}-{e.size}"
    ident = f"{backend.uri}/{e.path}|{e.etag or ''}|{e.size}|{e.mtime if not e.etag else ''}"
    return "loc-" + hashlib.sha256(ident.encode()).hexdigest()[:40]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Counter:
    def __init__(self, total: int, progress: Optional[ProgressFn]):
        self.total, self.done, self.progress = total, 0, progress
        self.lock = threading.Lock()
        self.last = 0.0

    def add(self, n: int) -> None:
        with self.lock:
            self.done = min(self.total, self.done + n)  # a retried download counts once
            now = time.monotonic()
            if self.progress and (now - self.last > 0.5 or self.done >= self.total):
                self.last = now
                self.progress(self.done, self.total)


class InputCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser() / "inputs"

    def stage(self, backend: Backend, progress: Optional[ProgressFn] = None) -> StageResult:
        t0 = time.monotonic()
        entries = retried(backend.list)
        if not entries:
            raise StorageError(backend.uri, "no such file or directory (nothing is stored under this path)")
        keys = {e.path: object_key(backend, e) for e in entries}
        fp = hashlib.sha256(
            "\n".join([backend.uri, *(f"{p}\0{k}" for p, k in sorted(keys.items()))]).encode()
        ).hexdigest()[:32]
        tree = self.root / "trees" / fp
        done = tree.with_name(fp + ".done")
        single = len(entries) == 1 and entries[0].path == ""
        name = backend.uri.rstrip("/").rsplit("/", 1)[-1] or "input"
        target = str(tree / name) if single else str(tree)
        total = sum(e.size for e in entries)
        if done.exists() and self._intact(tree, entries, name):
            done.touch()  # for a future least-recently-used eviction
            return StageResult(target, len(entries), total, 0, time.monotonic() - t0)
        with _locked(self.root / "locks" / fp):
            if done.exists() and self._intact(tree, entries, name):  # staged by another job meanwhile
                return StageResult(target, len(entries), total, 0, time.monotonic() - t0)
            done.unlink(missing_ok=True)
            fetched = self._fetch_objects(backend, entries, keys, progress)
            partial = tree.with_name(fp + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            for e in entries:
                dest = partial / (e.path or name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self._object(keys[e.path]), dest)
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(partial, tree)
            done.touch()
        return StageResult(target, len(entries), total, fetched, time.monotonic() - t0)

    def _intact(self, tree: Path, entries: list[Entry], name: str) -> bool:
        """Is every file of the tree there with its size? A job may have deleted or
        rewritten its input (it is shared by later jobs on the node): then it is rebuilt."""
        for e in entries:
            try:
                if (tree / (e.path or name)).stat().st_size != e.size:
                    return False
            except OSError:
                return False
        return True

    def _object(self, key: str) -> Path:
        return self.root / "objects" / key[-2:] / key

    def _fetch_objects(self, backend: Backend, entries: list[Entry], keys: dict[str, str],
                       progress: Optional[ProgressFn]) -> int:
        missing: dict[str, Entry] = {}
        for e in entries:
            k = keys[e.path]
            obj = self._object(k)
            if k not in missing and not (obj.exists() and obj.stat().st_size == e.size):
                missing[k] = e
        need = sum(e.size for e in missing.values())
        counter = _Counter(need, progress)

        def fetch(item: tuple[str, Entry]) -> None:
            key, e = item
            obj = self._object(key)
            obj.parent.mkdir(parents=True, exist_ok=True)
            tmp = obj.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}")
            try:
                retried(lambda: backend.download(e.path, tmp, counter.add))
                got = tmp.stat().st_size
                if got != e.size:
                    raise StorageError(f"{backend.uri}/{e.path}", f"downloaded {got} bytes, expected {e.size}",
                                       transient=True)
                tmp.chmod(0o444)
                os.replace(tmp, obj)
            finally:
                tmp.unlink(missing_ok=True)

        # biggest first: the long transfers overlap the many small ones
        parallel(fetch, sorted(missing.items(), key=lambda kv: -kv[1].size))
        if progress and need == 0:
            progress(0, 0)
        return need


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def download_tree(backend: Backend, dest: Path, progress: Optional[ProgressFn] = None) -> tuple[int, int]:
    """Everything under a location into ``dest`` (checkpoints before a restart): (files, bytes)."""
    entries = [e for e in retried(backend.list) if e.path]
    counter = _Counter(sum(e.size for e in entries), progress)

    def fetch(e: Entry) -> None:
        target = dest / e.path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.download")
        retried(lambda: backend.download(e.path, tmp, counter.add))
        os.replace(tmp, target)
        if e.mtime:
            os.utime(target, (e.mtime, e.mtime))

    parallel(fetch, entries)
    return len(entries), counter.total
