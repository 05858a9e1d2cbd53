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
warm tree costs one listing. Staged files are read-only.

An input uploaded with the job (``mode: upload``) is a zip the server keeps by its
sha256; its tree is ``trees/upload-<sha>[-f]``, and its ``.done`` file lists the files, so a
node that has it needs no byte of the zip (``stage_upload``); one that lacks it unpacks
the zip the driver sends (``UploadedInput``) into the same objects and trees."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from raybatch.private_dir import ensure_private_parents
from raybatch.spec.job import split_package
from raybatch.storage.backends import (Backend, Entry, Progress, StorageError, local_target, parallel,
                                       unsafe_member, unsafe_rel)
from raybatch.storage.datastores import Access

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

    def stage(self, backend: Backend, progress: Optional[ProgressFn] = None,
              fingerprint: Optional[str] = None) -> StageResult:
        """The location's tree on this node, fetching only the objects the node lacks.
        ``fingerprint``: the tree's name, when the caller knows the content by another
        name (an uploaded input's sha256); its ``.done`` file then lists the files."""
        t0 = time.monotonic()
        entries = retried(backend.list)
        if not entries:
            raise StorageError(backend.uri, "no such file or directory (nothing is stored under this path)")
        check_names(backend, entries)
        keys = {e.path: object_key(backend, e) for e in entries}
        fp = fingerprint or hashlib.sha256(
            "\n".join([backend.uri, *(f"{p}\0{k}" for p, k in sorted(keys.items()))]).encode()
        ).hexdigest()[:32]
        tree = self.root / "trees" / fp
        done = tree.with_name(fp + ".done")
        single = len(entries) == 1 and entries[0].path == ""
        name = backend.uri.rstrip("/").rsplit("/", 1)[-1] or "input"
        if unsafe_rel(name):
            name = "input"  # a location ending in '..' or the like: the one file gets a plain name
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
                dest = local_target(partial, e.path, f"{backend.uri}/{e.path}") if e.path else partial / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self._object(keys[e.path]), dest)
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(partial, tree)
            if fingerprint:
                done.write_text(json.dumps({"name": name, "files": [[e.path, e.size] for e in entries]}))
            else:
                done.touch()
        return StageResult(target, len(entries), total, fetched, time.monotonic() - t0)

    def stage_upload(self, uri: str, fetch: Optional[Callable[[], bytes]],
                     progress: Optional[ProgressFn] = None) -> Optional[StageResult]:
        """An input uploaded with the job (``upload://<sha>[/<file name>]``): its tree on
        this node, unpacked from ``fetch()`` (the zip) only when the node lacks it; None
        when it lacks it and there is no ``fetch``."""
        t0 = time.monotonic()
        sha = upload_sha(uri)
        # a folder holding one file zips like that file: the tree of the file is another one
        fp = f"upload-{sha[:40]}" + ("-f" if "/" in uri[len("upload://"):] else "")
        tree = self.root / "trees" / fp
        done = tree.with_name(fp + ".done")
        warm = self._listed(done)
        if warm is not None:
            name, entries = warm
            if self._intact(tree, entries, name):
                done.touch()
                single = len(entries) == 1 and entries[0].path == ""
                return StageResult(str(tree / name) if single else str(tree), len(entries),
                                   sum(e.size for e in entries), 0, time.monotonic() - t0)
        if fetch is None:
            return None
        return self.stage(UploadedInput(uri, fetch()), progress, fingerprint=fp)

    @staticmethod
    def _listed(done: Path) -> Optional[tuple[str, list[Entry]]]:
        try:
            info = json.loads(done.read_text())
            return info["name"], [Entry(p, int(n), 0.0) for p, n in info["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

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


def check_names(backend: Backend, entries: list[Entry]) -> None:
    """Refuse the whole location when any listed name would be written outside the local
    directory it is copied into (``a//b``, ``../x``, ``/etc/x``, a NUL): a StorageError
    naming that blob or file, before a byte is written."""
    for e in entries:
        if e.path:
            local_target(Path("."), e.path, f"{backend.uri}/{e.path}")


def upload_sha(uri: str) -> str:
    """The sha256 in ``upload://<sha>[/<file name>]``."""
    return split_package(uri.removeprefix("upload://"))[0]


class UploadedInput(Backend):
    """An uploaded input's zip (as the client made it: ``raybatch.runtime.code.package_input``)
    as a location the cache stages from: a folder's files, or, when the URI names a file,
    that one file. Objects are keyed by each file's MD5, like blobs that have one."""

    def __init__(self, uri: str, data: bytes):
        self.access = Access("upload", "", uri=uri)
        self.zip = zipfile.ZipFile(io.BytesIO(data))
        for info in self.zip.infolist():  # the server checked them (and the size) on upload
            why = unsafe_member(info) or (None if info.is_dir() else unsafe_rel(info.filename))
            if why:
                raise StorageError(uri, f"unsafe entry {info.filename!r} in the uploaded input: {why}")
        self.file_name = split_package(uri.removeprefix("upload://"))[1]
        if self.file_name is not None and unsafe_rel(self.file_name):
            raise StorageError(uri, f"unsafe file name {self.file_name!r} in the uploaded input")

    def _member(self, rel: str) -> str:
        return self.file_name if rel == "" and self.file_name else rel

    def list(self, rel: str = "") -> list[Entry]:
        out = []
        for info in self.zip.infolist():
            if info.is_dir():
                continue
            md5 = hashlib.md5(self.zip.read(info)).hexdigest()
            path = "" if self.file_name else info.filename
            out.append(Entry(path, info.file_size, 0.0, md5=md5))
        return out

    def download(self, rel: str, dest: Path, progress: Progress = None) -> None:
        with self.zip.open(self._member(rel)) as src, open(dest, "wb") as out:
            while chunk := src.read(2**20):
                out.write(chunk)
                if progress:
                    progress(len(chunk))


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def download_tree(backend: Backend, dest: Path, progress: Optional[ProgressFn] = None) -> tuple[int, int]:
    """Everything under a location into ``dest`` (checkpoints before a restart): (files, bytes)."""
    ensure_private_parents(dest)  # an attempt's mirror (<tmp>/raybatch-<uid>/...): private before use
    entries = [e for e in retried(backend.list) if e.path]
    check_names(backend, entries)
    counter = _Counter(sum(e.size for e in entries), progress)

    def fetch(e: Entry) -> None:
        target = local_target(dest, e.path, f"{backend.uri}/{e.path}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.download")
        retried(lambda: backend.download(e.path, tmp, counter.add))
        os.replace(tmp, target)
        if e.mtime:
            os.utime(target, (e.mtime, e.mtime))

    parallel(fetch, entries)
    return len(entries), counter.total
