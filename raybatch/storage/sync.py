"""Getting a node's files back while the job runs: outputs, checkpoints and logs.

When a job's outputs, checkpoints or logs live in blob storage, each node writes
them to a local mirror directory and a :class:`NodeSync` thread copies them out:

* logs: every ``LOG_INTERVAL_S``, the new bytes of each rank's stdout/stderr are
  appended to the remote file, so ``raybatch logs --follow`` reads them live;
* outputs and checkpoints: every ``sync_interval``, files whose size or mtime
  changed are uploaded (each upload replaces the blob whole: a reader never sees
  half a file). Deleted local files stay in storage.

:meth:`NodeSync.finish` runs after the user's processes have exited (also after
SIGTERM on cancel/preemption): a last pass that retries with backoff until every
file is out or the deadline passes. Transient failures during the run are only
retried later. Nothing local is deleted by the syncer; the driver removes a
mirror only when its final pass uploaded everything, so an upload that keeps
failing leaves the local copy, and the job names the files that are not out."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from raybatch.storage.backends import Backend, StorageError

LOG_INTERVAL_S = float(os.environ.get("RAYBATCH_LOG_SYNC_S", "1.0"))
LOG_CHUNK = 4 * 2**20
# An Azure append blob holds at most 50,000 blocks. A log is appended every second for its
# first 10,000 appends (~2.8 h), then every 5 s (~2.2 days more); past BLOCK_BUDGET it is
# uploaded whole every minute instead (the blob becomes a block blob of the same name).
LOG_SLOW_AFTER_BLOCKS, LOG_SLOW_INTERVAL_S = 10_000, 5.0
BLOCK_BUDGET, WHOLE_INTERVAL_S = 45_000, 60.0


def _ours(name: str) -> bool:
    """Our own temporary files in a mirror (never a user's file)."""
    return name.startswith(".upload-") or (name.startswith(".") and name.endswith(".download"))


class DirSync:
    """Mirror a local directory into a location (upload what changed)."""

    def __init__(self, local: Path, backend: Backend):
        self.local = Path(local)
        self.backend = backend
        self.sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) uploaded
        self.failed: dict[str, str] = {}            # rel path -> last error
        self._prime()

    def _prime(self) -> None:
        """Files already in the mirror that are the remote's copy (restored checkpoints:
        same size, same mtime) count as sent: a node never uploads a restored file, which
        could overwrite a newer version another node wrote since."""
        try:
            remote = {e.path: e for e in self.backend.list() if e.path}
        except StorageError:
            return  # nothing known: everything is uploaded as it changes
        for rel, sig in self.changed():
            e = remote.get(rel)
            if e is not None and e.size == sig[0] and abs(e.mtime - sig[1] / 1e9) < 0.01:
                self.sent[rel] = sig

    def changed(self) -> list[tuple[str, tuple[int, int]]]:
        out = []
        for dirpath, _dirs, files in os.walk(self.local):
            for name in files:
                if _ours(name):
                    continue
                p = Path(dirpath, name)
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                rel = p.relative_to(self.local).as_posix()
                sig = (st.st_size, st.st_mtime_ns)
                if self.sent.get(rel) != sig:
                    out.append((rel, sig))
        return out

    def push(self) -> int:
        """Upload what changed; returns how many files are still not out. A file the
        service rejects does not hold up the others; the first such error is raised
        after the pass."""
        rejected: Optional[StorageError] = None
        for rel, sig in self.changed():
            try:
                self.backend.upload(self.local / rel, rel)
            except FileNotFoundError:
                continue  # removed since the scan (a temp file renamed into place)
            except StorageError as e:
                self.failed[rel] = e.cause
                if not e.transient and rejected is None:
                    rejected = e
                continue
            self.failed.pop(rel, None)
            self.sent[rel] = sig
        if rejected is not None:
            raise rejected
        return len(self.changed())

    def pending(self) -> list[str]:
        return [f"{self.backend.uri.rstrip('/')}/{rel}" for rel, _ in self.changed()]


class LogSync:
    """Append a growing local file to a remote one."""

    def __init__(self, local: Path, backend: Backend, rel: str):
        self.local, self.backend, self.rel = Path(local), backend, rel
        self.offset = 0
        self.blocks = 0        # appends made (each at most LOG_CHUNK)
        self.whole = False     # past the block budget: upload the file whole instead
        self.last = float("-inf")

    def interval(self) -> float:
        if self.whole:
            return WHOLE_INTERVAL_S
        return LOG_INTERVAL_S if self.blocks < LOG_SLOW_AFTER_BLOCKS else max(LOG_INTERVAL_S, LOG_SLOW_INTERVAL_S)

    def push(self, force: bool = False) -> int:
        """Append the new bytes (at most once per ``interval()`` unless ``force``);
        returns how many are still not out."""
        try:
            size = self.local.stat().st_size
        except FileNotFoundError:
            return 0
        if self.offset >= size:
            return 0
        now = time.monotonic()
        if not force and now - self.last < self.interval():
            return 0  # not due yet: nothing is wrong
        self.last = now
        if not self.whole and self.blocks + -(-(size - self.offset) // LOG_CHUNK) > BLOCK_BUDGET:
            self.whole = True
        if self.whole:
            self.backend.upload(self.local, self.rel)
            self.offset = size
            return 0
        while self.offset < size:
            with open(self.local, "rb") as f:
                f.seek(self.offset)
                data = f.read(min(LOG_CHUNK, size - self.offset))
            if not data:
                break
            self.backend.append(self.rel, data, self.offset)
            self.offset += len(data)
            self.blocks += 1
        return size - self.offset

    def pending(self) -> list[str]:
        try:
            left = self.local.stat().st_size - self.offset
        except FileNotFoundError:
            return []
        return [f"{self.backend.uri.rstrip('/')}/{self.rel} ({left} bytes)"] if left > 0 else []


@dataclass
class SyncReport:
    unsynced: list[str] = field(default_factory=list)   # remote names not (fully) written
    error: Optional[str] = None                          # the last cause


class NodeSync:
    """The syncing thread of one rank actor."""

    def __init__(self, dirs: list[DirSync], logs: list[LogSync], interval: float):
        self.dirs, self.logs, self.interval = dirs, logs, interval
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raybatch-sync", daemon=True)
        self._lock = threading.Lock()  # one pass at a time

    def start(self) -> None:
        if self.dirs or self.logs:
            self._thread.start()

    def _pass(self, dirs: bool, force: bool = False) -> int:
        left = 0
        with self._lock:
            for log in self.logs:
                try:
                    left += log.push(force)
                except StorageError as e:
                    self.error, left = e.args[0], left + 1
            if dirs:
                for d in self.dirs:
                    try:
                        left += d.push()
                        if d.failed:  # transient failures are kept, not raised: report the cause
                            self.error = f"{d.backend.uri}: {next(reversed(d.failed.values()))}"
                    except StorageError as e:
                        self.error, left = e.args[0], left + 1
        return left

    def _run(self) -> None:
        next_dirs = time.monotonic() + self.interval
        backoff = 0.0
        while not self._stop.wait(max(LOG_INTERVAL_S, backoff)):
            now = time.monotonic()
            do_dirs = now >= next_dirs
            if do_dirs:
                next_dirs = now + self.interval
            left = self._pass(do_dirs)
            backoff = min(30.0, max(2.0, backoff * 2)) if left and self.error else 0.0

    def finish(self, timeout: float) -> SyncReport:
        """Stop the thread, then push everything, retrying with backoff until ``timeout``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        deadline = time.monotonic() + timeout
        delay = 1.0
        while True:
            self.error = None
            left = self._pass(True, force=True)
            if not left:
                return SyncReport()
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(15.0, delay * 2)
        unsynced = [p for d in self.dirs for p in d.pending()] + [p for lg in self.logs for p in lg.pending()]
        return SyncReport(unsynced, self.error)
