"""The job's code on the nodes.

The server keeps each uploaded code package as the zip it was sent,
``<code root>/<sha>.zip`` (checked, not unpacked). The driver runs on the server's
machine (it already shares the state dir): it asks each node's first rank actor for the
package, which is there when the node's cache (``<cache dir>/code/<sha>``) has it; only
for nodes that lack it does the driver read the zip and put it in Ray's object store,
and those nodes unpack it. A node fetches a given package once, whatever the number of
jobs that use it.

Why not Ray's ``working_dir``: a worker whose runtime_env is not empty starts through
Ray's ``setup_worker.py``, one more Python start (about 0.9 s per rank actor measured on
2 cores), and an actor cannot drop a field it inherits from its job's runtime_env. With
the code shipped here, rank actors of jobs without ``packages``/``image`` start as plain
Ray workers."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Optional

from raybatch.spec.loader import upload_files
from raybatch.storage.backends import unsafe_member

MAX_CODE_BYTES = 500 * 2**20  # unpacked, like Ray's working_dir limit
MAX_ZIP_ENTRIES = 100_000     # entries of one package (code or uploaded input): a real tree has far fewer
SHA256_RE = re.compile(r"[0-9a-f]{64}")  # how a package is named everywhere (64 lowercase hex digits)
KEEP_PACKAGES = 32            # a node keeps at least this many of its newest packages ...
KEEP_SECONDS = 24 * 3600      # ... and every package used within this time


_SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache"}


def package_code(directory: str | Path) -> tuple[str, bytes]:
    """A deterministic zip of ``directory`` (same content -> same sha256)."""
    root = Path(directory)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [(Path(dirpath, n).relative_to(root).as_posix(), Path(dirpath, n))
                  for n in sorted(filenames) if not n.endswith(".pyc")]
    return _zip(files)


def _zip(files: list[tuple[str, Path]]) -> tuple[str, bytes]:
    """(sha256, bytes) of a zip of these (name, file) pairs, in order: no time stamps, so
    the same content always makes the same bytes; the permission bits are kept."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in files:
            if not path.is_file():
                continue
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (path.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def package_input(path: str | Path) -> tuple[str, bytes, Optional[str]]:
    """A file or folder to upload with the job (an input's ``mode: upload``) as a
    deterministic zip: (sha256, zip, the file's name when ``path`` is one file, else None).
    A folder's files keep their paths below it; none is skipped (it is data). Check its
    size first: ``raybatch.spec.loader.upload_problem``."""
    p = Path(path)
    sha, data = _zip(upload_files(p))
    return sha, data, (p.name if p.is_file() else None)


class CodePackageError(ValueError):
    """A code package that cannot be unpacked safely."""


class CodePackageTooLarge(CodePackageError):
    """A code package that unpacks to more than the limit."""


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256_RE.fullmatch(value) is not None


def require_sha256(value: object, what: str = "code_package") -> str:
    """``value`` if it is a sha256 (64 lowercase hex digits), else CodePackageError. A
    package is only ever named by its sha256: a path there (``/``, ``../..``) would make
    the driver zip and ship any directory of the head, or a node unpack outside its cache."""
    if not is_sha256(value):
        shown = repr(value)[:80]
        raise CodePackageError(f"{what} {shown}: not a sha256 (64 lowercase hex digits)")
    return value  # type: ignore[return-value]


def package_zip(code_root: str | Path, sha: str) -> Path:
    return Path(code_root) / f"{require_sha256(sha)}.zip"


def has_package(code_root: str | Path, sha: str) -> bool:
    """Was this package uploaded? (Servers before the zip was kept unpacked it instead.)
    False for anything that is not a sha256."""
    if not is_sha256(sha):
        return False
    return package_zip(code_root, sha).is_file() or (Path(code_root) / sha).is_dir()


def open_package(file: str | Path | io.BufferedIOBase, max_entries: int = MAX_ZIP_ENTRIES) -> zipfile.ZipFile:
    """The zip, its entries counted before ``ZipFile`` reads the central directory (a
    500 MiB zip of empty entries would otherwise be millions of ZipInfo objects in memory
    first). BadZipFile, or CodePackageTooLarge."""
    with open(file, "rb") if isinstance(file, (str, Path)) else _keep_open(file) as f:
        _count_entries(f, max_entries)
    return zipfile.ZipFile(file)


_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # signature; name, extra, comment lengths at 28/30/32
_CENTRAL_SIGNATURE = b"PK\x01\x02"


def _count_entries(f: io.BufferedIOBase, max_entries: int) -> int:
    """The number of entries ``ZipFile`` would read, at most ``max_entries`` (else
    CodePackageTooLarge), by walking the central directory's file headers. The end
    record's entry count is not enough: ``ZipFile`` ignores it and reads headers for as
    many bytes as the end record's directory size says, so an end record saying 1 entry
    can front a directory of a million. The walk starts where ``ZipFile`` starts
    (``_RealGetContents``: the end record's location less the directory's size, and less
    the zip64 records when ``_EndRecData`` found them) and reads 46 bytes per entry."""
    end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # stable since Python 2; reads zip64 too
    if end is None:
        raise zipfile.BadZipFile("File is not a zip file")
    claimed = end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    if claimed > max_entries:  # an honest count: refused without the walk
        raise CodePackageTooLarge(f"package has {claimed} entries, more than the limit of {max_entries}")
    size = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    start = end[zipfile._ECD_LOCATION] - size  # type: ignore[attr-defined]
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    if start < 0:
        raise zipfile.BadZipFile("Bad offset for central directory")
    f.seek(start)
    count = walked = 0
    while walked < size:
        if count == max_entries:
            raise CodePackageTooLarge(
                f"package has at least {max_entries + 1} entries, more than the limit of {max_entries}")
        head = f.read(_CENTRAL_HEADER.size)
        if len(head) != _CENTRAL_HEADER.size:
            raise zipfile.BadZipFile("Truncated central directory")
        signature, name, extra, comment = _CENTRAL_HEADER.unpack(head)
        if signature != _CENTRAL_SIGNATURE:
            raise zipfile.BadZipFile("Bad magic number for central directory")
        f.seek(name + extra + comment, io.SEEK_CUR)
        walked += _CENTRAL_HEADER.size + name + extra + comment
        count += 1
    return count


class _keep_open:
    """``with`` for a caller's file object, without closing it."""

    def __init__(self, f: io.BufferedIOBase):
        self.f = f

    def __enter__(self) -> io.BufferedIOBase:
        return self.f

    def __exit__(self, *exc: object) -> None:
        self.f.seek(0)


def check_package(zf: zipfile.ZipFile, limit: int = MAX_CODE_BYTES,
                  max_entries: int = MAX_ZIP_ENTRIES) -> None:
    """Refuse entries that would land outside the directory (or are links), more than
    ``max_entries`` entries, and trees over ``limit`` bytes, before anything is written."""
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise CodePackageTooLarge(f"package has {len(infos)} entries, more than the limit of {max_entries}")
    total = 0
    for info in infos:
        why = unsafe_member(info)
        if why:
            raise CodePackageError(f"unsafe path in package: {info.filename} ({why})")
        total += info.file_size
        if total > limit:
            raise CodePackageTooLarge(f"code package unpacks to more than {limit // 2**20} MiB")


def unpack_package(data: bytes, dest: Path, limit: int = MAX_CODE_BYTES) -> None:
    """Unpack a zip into ``dest`` (created by an atomic rename, so a reader never sees a
    half-written tree), keeping the executable bits. If another process got ``dest``
    there first, its copy (the same content: the name is the sha256) is kept."""
    tmp = dest.with_name(f"{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        with open_package(io.BytesIO(data)) as zf:
            check_package(zf, limit)
            zf.extractall(tmp)
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0o777
                if mode and not info.is_dir():
                    (tmp / info.filename).chmod(mode)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CodeCache:
    """A node's unpacked code packages, one directory per sha256."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir) / "code"

    def ensure(self, sha: str, fetch: Optional[Callable[[], bytes]]) -> Optional[str]:
        """The package's directory on this node; without ``fetch``, None when the node
        lacks it. A new package makes room by evicting old ones. ``sha`` must be a
        sha256 (CodePackageError otherwise): the directory is named by it."""
        dest = self.root / require_sha256(sha)
        if dest.is_dir():
            os.utime(dest)  # last use, for the eviction
            return str(dest)
        if fetch is None:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        unpack_package(fetch(), dest)
        self.evict(keep=sha)
        return str(dest)

    def evict(self, keep: str) -> None:
        """Remove packages beyond the newest KEEP_PACKAGES that no job used for a day."""
        now = time.time()
        entries = []
        for p in self.root.iterdir():
            if ".partial-" in p.name:
                try:  # a crashed unpack's leftovers
                    if now - p.stat().st_mtime > KEEP_SECONDS:
                        shutil.rmtree(p, ignore_errors=True)
                except OSError:
                    pass
                continue
            try:
                entries.append((p.stat().st_mtime, p))
            except OSError:
                continue
        entries.sort(reverse=True)
        for mtime, p in entries[KEEP_PACKAGES:]:
            if p.name != keep and now - mtime > KEEP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
