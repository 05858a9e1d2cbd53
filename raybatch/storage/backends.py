"""Reading and writing one location: a local/mounted directory, or Azure Blob.

Azure Blob goes through azure-storage-blob directly rather than adlfs: we need
per-request retry and timeout settings (adlfs keeps the SDK defaults, which spend
~80 s on an unreachable endpoint before failing), append blobs with a position
condition for live logs, blob ETags and Content-MD5 for the download cache, and
the service's error codes to tell a missing container from a bad key.

Every failure is a :class:`StorageError` that names the location and says whether
retrying can help (``transient``)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from raybatch.storage.datastores import Access

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
SDK_RETRIES = 2                  # per request, inside the SDK (1 s, 3 s backoff)
APPEND_MAX = 4 * 2**20           # Azure's largest append block
TRANSFER_THREADS = 8             # blobs moved at once
PER_BLOB_CONCURRENCY = 4         # ranged GETs per large blob
COPY_CHUNK = 4 * 2**20
WRITE_CHECK = ".raybatch-write-check"   # written by check(write=True); not a user's file

Progress = Optional[Callable[[int], None]]  # called with bytes just moved


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be unpacked, or None: an absolute name, a '..' part, a
    NUL, or a symbolic link (the unpacked tree must stay below its directory)."""
    name = info.filename
    if "\0" in name:
        return "a NUL byte in its name"
    if name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' part"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


class StorageError(RuntimeError):
    def __init__(self, uri: str, cause: str, transient: bool = False):
        super().__init__(f"{uri}: {cause}")
        self.uri = uri
        self.cause = cause
        self.transient = transient


class LinkRefused(StorageError):
    """A symbolic link on the way to (or at) a file the server was asked to read: never
    followed, whatever it points at (a job can plant one to ``/`` or to the server's
    database in its own outputs)."""


@dataclass(frozen=True)
class Entry:
    path: str              # relative to the location, '/'-separated
    size: int
    mtime: float           # seconds since the epoch
    etag: Optional[str] = None
    md5: Optional[str] = None
    kind: str = "file"     # "link": a symbolic link, listed as such (size 0, never followed)


def unsafe_rel(rel: str) -> Optional[str]:
    """Why a listed path must not be written below a local directory, or None. Names come
    from storage (blob names, a server's listing) and may be anything: ``a//b``, ``/etc``,
    ``../x`` or a NUL would land outside the destination or fail oddly."""
    if "\0" in rel:
        return "it contains a NUL byte"
    if rel.startswith("/"):
        return "it is an absolute path"
    parts = rel.split("/")
    if any(p in (".", "..") for p in parts):
        return "it contains a '.' or '..' part"
    if any(p == "" for p in parts):
        return "it contains an empty part ('//' or a trailing '/')"
    return None


def local_target(dest: Path, rel: str, what: str) -> Path:
    """``dest / rel`` for a listed ``rel`` that is safe to write (``unsafe_rel``); else a
    StorageError naming ``what`` (the blob or file) and why it is refused."""
    why = unsafe_rel(rel)
    if why:
        raise StorageError(what, f"refused: its name {rel!r} would be written outside {dest} ({why})")
    return dest / rel


class Backend:
    access: Access

    @property
    def uri(self) -> str:
        return self.access.uri

    def list(self, rel: str = "") -> list[Entry]:
        """Every file under ``rel`` (recursively), paths relative to ``rel``. A missing
        prefix lists nothing; a location that is one file lists one entry with path ''."""
        raise NotImplementedError

    def download(self, rel: str, dest: Path, progress: Progress = None) -> None:
        raise NotImplementedError

    def upload(self, src: Path, rel: str) -> None:
        """Replace ``rel`` with the file ``src``; readers never see a partial file."""
        raise NotImplementedError

    def append(self, rel: str, data: bytes, offset: int, durable: bool = False) -> None:
        """Write ``data`` at ``offset`` of a growing file (a log); ``offset`` is the
        size it must have now, so a retried append is never written twice. ``durable``:
        on disk before this returns (a committed append blob always is)."""
        raise NotImplementedError

    def read(self, rel: str, offset: int, length: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes from ``offset``, and the file's size (0, b'' if missing)."""
        raise NotImplementedError

    def stream(self, rel: str, length: Optional[int] = None) -> Iterator[bytes]:
        """The file's bytes in chunks; at most ``length`` of them (a file that grows
        while it is read is served as it was listed)."""
        raise NotImplementedError

    def check(self, write: bool) -> None:
        """Fail now, with the cause, if the location cannot be reached (or written)."""
        raise NotImplementedError


def open_backend(access: Access, anchor: Optional[str] = None) -> Backend:
    """A backend for ``access``; ``anchor`` (local locations only): see LocalBackend."""
    if access.kind == "local":
        return LocalBackend(access, anchor)
    if access.kind == "blob":
        return BlobBackend(access)
    raise ValueError(f"unknown location kind {access.kind!r}")


# ---- local directories (local disk, NFS, Azure Files mounts) ----------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR_FLAGS | os.O_NOFOLLOW
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never hangs


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class LocalBackend(Backend):
    """A local (or mounted) directory.

    Reading (``read``, ``stream``) never follows a symbolic link below the location: every
    part of the path is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so
    a link (or a directory swapped for one while we walk) fails with ``LinkRefused``
    instead of leaving the tree. With ``anchor`` (a trusted directory above the location:
    the server's jobs root or a datastore's root), the location's own parts below the
    anchor are walked the same way, and ``list`` reports links as links (``kind="link"``,
    size 0) without following them: what the server uses to serve a job's files. Without
    an anchor, ``list`` follows links as before (a node staging a user's own data)."""

    def __init__(self, access: Access, anchor: Optional[str] = None):
        self.access = access
        self.root = Path(access.path)
        self.anchor = anchor

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    # ---- link-safe walking (the server's reads) ------------------------------------------
    def _walk_parts(self, rel: str) -> tuple[str, list[str]]:
        """(where the walk starts, opened normally; the parts below it, opened with
        O_NOFOLLOW one by one). ``rel`` is '/'-separated; '.', '..' and NUL are refused."""
        rel_parts = [p for p in rel.split("/") if p]
        if "\0" in rel or any(p in (".", "..") for p in rel_parts):
            raise StorageError(self.access.child(rel).uri, "path with '.', '..' or a NUL byte; not served")
        if self.anchor is None:
            return str(self.root), rel_parts
        root, anchor = os.path.abspath(self.root), os.path.abspath(self.anchor)
        try:
            between = [] if root == anchor else list(Path(root).relative_to(anchor).parts)
        except ValueError:
            raise StorageError(self.uri, f"is not below {anchor}; not served") from None
        if any(p in (".", "..") for p in between):
            raise StorageError(self.uri, "path with '.' or '..' parts; not served")
        return anchor, [*between, *rel_parts]

    def _refuse(self, rel: str, err: OSError) -> StorageError:
        uri = self.access.child(rel).uri if rel else self.uri
        if err.errno in (errno.ELOOP, errno.EMLINK):
            return LinkRefused(uri, "a part of this path is a symbolic link (or not a directory); "
                                    "links in a job's files are never followed: not served")
        return StorageError(uri, f"cannot read: {err.strerror or err}")

    def _open_dir(self, start: str, parts: list[str]) -> int:
        """A descriptor of ``start``/``parts``, no part of ``parts`` followed if it is a link."""
        fd = os.open(start, _DIR_FLAGS)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
                except OSError as e:  # a link fails with ENOTDIR or ELOOP: say which it is
                    if e.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(part, fd):
                        raise OSError(errno.ELOOP, "a symbolic link", part) from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, rel: str) -> int:
        """A read descriptor of the regular file ``rel``, every part walked without
        following links. FileNotFoundError/IsADirectoryError when there is no such file."""
        start, parts = self._walk_parts(rel)
        if not parts:
            raise IsADirectoryError(rel)
        try:
            dfd = self._open_dir(start, parts[:-1])
            try:
                fd = os.open(parts[-1], _NOFOLLOW_FILE, dir_fd=dfd)
            finally:
                os.close(dfd)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except NotADirectoryError:  # a file on the way: no such file
            raise FileNotFoundError(rel) from None
        except OSError as e:
            raise self._refuse(rel, e) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(rel)
            raise StorageError(self.access.child(rel).uri, "not a regular file; not served")
        os.set_blocking(fd, True)
        return fd

    def _list_confined(self, rel: str) -> list[Entry]:
        start, parts = self._walk_parts(rel)
        try:
            if parts:
                dfd = self._open_dir(start, parts[:-1])
                try:
                    st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        return [Entry("", 0, st.st_mtime, kind="link")]
                    if stat.S_ISREG(st.st_mode):
                        return [Entry("", st.st_size, st.st_mtime)]  # the location is this one file
                    if not stat.S_ISDIR(st.st_mode):
                        return []
                    fd = os.open(parts[-1], _NOFOLLOW_DIR, dir_fd=dfd)
                finally:
                    os.close(dfd)
            else:
                fd = os.open(start, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return []  # a missing prefix lists nothing (a file on the way: nothing below it)
        except OSError as e:
            raise self._refuse(rel, e) from None
        out: list[Entry] = []
        stack = [(fd, "")]
        try:
            while stack:
                dfd, prefix = stack.pop()
                try:
                    with os.scandir(dfd) as it:
                        for entry in it:
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except OSError:
                                continue  # gone meanwhile
                            path = prefix + entry.name
                            if stat.S_ISLNK(st.st_mode):
                                out.append(Entry(path, 0, st.st_mtime, kind="link"))
                            elif stat.S_ISREG(st.st_mode):
                                out.append(Entry(path, st.st_size, st.st_mtime))
                            elif stat.S_ISDIR(st.st_mode):
                                try:
                                    stack.append((os.open(entry.name, _NOFOLLOW_DIR, dir_fd=dfd), path + "/"))
                                except OSError:
                                    continue  # gone, or swapped for a link meanwhile: not walked
                finally:
                    os.close(dfd)
        finally:
            for dfd, _ in stack:
                os.close(dfd)
        return sorted(out, key=lambda e: e.path)

    def list(self, rel: str = "") -> list[Entry]:
        if self.anchor is not None:
            return self._list_confined(rel)
        base = self._p(rel)
        if base.is_file():
            st = base.stat()
            return [Entry("", st.st_size, st.st_mtime)]  # the location is this one file
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                p = Path(dirpath, name)
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append(Entry(p.relative_to(base).as_posix(), st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.path)

    def download(self, rel: str, dest: Path, progress: Progress = None) -> None:
        src = self._p(rel)
        try:
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                while chunk := fin.read(COPY_CHUNK):
                    fout.write(chunk)
                    if progress:
                        progress(len(chunk))
        except OSError as e:
            raise StorageError(self.access.child(rel).uri, f"cannot copy: {e.strerror or e}") from None

    def upload(self, src: Path, rel: str) -> None:
        dest = self._p(rel)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except OSError as e:
            raise StorageError(self.access.child(rel).uri, f"cannot write: {e.strerror or e}",
                               transient=True) from None

    def append(self, rel: str, data: bytes, offset: int, durable: bool = False) -> None:
        dest = self._p(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "ab") as f:
            if f.tell() != offset:
                f.truncate(offset)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    def read(self, rel: str, offset: int, length: int) -> tuple[bytes, int]:
        """A job's symlink (to /etc/passwd, to the server's database) anywhere on the way
        is refused (``LinkRefused``), never followed."""
        try:
            fd = self._open_file(rel)
        except (FileNotFoundError, IsADirectoryError):
            return b"", 0
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            return f.read(length), size

    def stream(self, rel: str, length: Optional[int] = None) -> Iterator[bytes]:
        left = float("inf") if length is None else length
        with open(self._open_file(rel), "rb") as f:
            while left > 0 and (chunk := f.read(int(min(COPY_CHUNK, left)))):
                left -= len(chunk)
                yield chunk

    def check(self, write: bool) -> None:
        root = self.root
        if write:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(self.uri, f"cannot create the directory: {e.strerror or e}") from None
            if not os.access(root, os.W_OK):
                raise StorageError(self.uri, "the directory is not writable")
        elif not root.exists():
            raise StorageError(self.uri, "does not exist")


# ---- Azure Blob --------------------------------------------------------------------------
class BlobBackend(Backend):
    def __init__(self, access: Access):
        self.access = access
        self.prefix = access.path.strip("/")
        self._container = None

    @property
    def container(self):
        if self._container is None:
            self._container = _service_client(self.access).get_container_client(self.access.container)
        return self._container

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    @contextmanager
    def _storage_errors(self, rel: str = "", passing: tuple[type[Exception], ...] = (),
                        missing: Optional[type[Exception]] = None) -> Iterator[None]:
        """Raise what fails in the block as a StorageError about ``rel`` (see classify).
        A StorageError, already in words, goes through as it is, and so do the exception
        types in ``passing``; a blob that does not exist raises ``missing(rel)`` instead,
        if given (a missing container is still a StorageError)."""
        try:
            yield
        except (StorageError, *passing):
            raise
        except Exception as e:  # noqa: BLE001
            if missing is not None and _is_blob_missing(e):
                raise missing(rel) from None
            raise classify(e, self.access.child(rel).uri if rel else self.uri, self.access) from None

    def list(self, rel: str = "") -> list[Entry]:
        key = self._key(rel)
        out = []
        with self._storage_errors(rel):
            for b in self.container.list_blobs(name_starts_with=f"{key}/" if key else None, include=["metadata"]):
                if (b.metadata or {}).get("hdi_isfolder") == "true" or b.name.rsplit("/", 1)[-1] == WRITE_CHECK:
                    continue
                out.append(_entry(b, b.name[len(key) + 1:] if key else b.name))
            if not out and key:
                try:
                    props = self.container.get_blob_client(key).get_blob_properties()
                    out.append(_entry(props, ""))  # the location is this one blob
                except Exception as e:  # noqa: BLE001
                    if not _is_blob_missing(e):
                        raise
        return sorted(out, key=lambda e: e.path)

    def download(self, rel: str, dest: Path, progress: Progress = None) -> None:
        with self._storage_errors(rel):
            stream = self.container.get_blob_client(self._key(rel)).download_blob(
                max_concurrency=PER_BLOB_CONCURRENCY,
                progress_hook=_hook(progress) if progress else None,
            )
            with open(dest, "wb") as f:
                stream.readinto(f)

    def upload(self, src: Path, rel: str) -> None:
        with self._storage_errors(rel, passing=(FileNotFoundError,)):  # no ``src``: the caller's error
            with open(src, "rb") as f:
                self.container.get_blob_client(self._key(rel)).upload_blob(
                    f, overwrite=True, max_concurrency=PER_BLOB_CONCURRENCY,
                    length=os.fstat(f.fileno()).st_size,
                )

    def append(self, rel: str, data: bytes, offset: int, durable: bool = False) -> None:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError  # noqa: PLC0415

        blob = self.container.get_blob_client(self._key(rel))
        pos = 0
        with self._storage_errors(rel):
            while pos < len(data):
                block = data[pos:pos + APPEND_MAX]
                try:
                    blob.append_block(block, appendpos_condition=offset + pos)
                except ResourceNotFoundError as e:
                    if "ContainerNotFound" in str(getattr(e, "error_code", "") or e):
                        raise
                    blob.create_append_blob()
                    continue
                except HttpResponseError as e:
                    if getattr(e, "error_code", None) != "AppendPositionConditionNotMet":
                        raise
                    # an earlier try of this block was written after all (a timed-out
                    # response): skip what is there already
                    size = blob.get_blob_properties().size
                    if not offset + pos < size <= offset + len(data):
                        raise
                    pos = size - offset
                    continue
                pos += len(block)

    def read(self, rel: str, offset: int, length: int) -> tuple[bytes, int]:
        blob = self.container.get_blob_client(self._key(rel))
        try:
            with self._storage_errors(rel, missing=FileNotFoundError):
                size = blob.get_blob_properties().size
                if offset >= size:
                    return b"", size
                data = blob.download_blob(offset=offset, length=min(length, size - offset)).readall()
                return data, size
        except FileNotFoundError:  # no such blob (raised by missing= only): read as empty
            return b"", 0

    def stream(self, rel: str, length: Optional[int] = None) -> Iterator[bytes]:
        with self._storage_errors(rel, missing=FileNotFoundError):
            downloader = self.container.get_blob_client(self._key(rel)).download_blob(
                offset=0 if length is not None else None, length=length)
        yield from downloader.chunks()  # errors while streaming are not translated

    def check(self, write: bool) -> None:
        with self._storage_errors():
            if not self.container.exists():
                raise StorageError(self.uri, f"the container '{self.access.container}' does not exist in "
                                   f"storage account '{self.access.account}'")
            if write:
                # a real write: a key without write permission (read-only SAS) fails here
                probe = self.container.get_blob_client(self._key(WRITE_CHECK))
                probe.upload_blob(b"", overwrite=True)
                try:
                    probe.delete_blob()  # leave nothing in the user's directory
                except Exception:  # noqa: BLE001 - may write but not delete: listings skip it
                    pass


def _entry(b, rel: str) -> Entry:
    md5 = None
    settings = getattr(b, "content_settings", None)
    if settings is not None and settings.content_md5:
        md5 = bytes(settings.content_md5).hex()
    lm = getattr(b, "last_modified", None)
    return Entry(rel, int(b.size), lm.timestamp() if lm else 0.0, (b.etag or "").strip('"'), md5)


def _hook(progress: Callable[[int], None]) -> Callable[[int, Optional[int]], None]:
    seen = [0]

    def hook(current: int, _total: Optional[int]) -> None:
        if current > seen[0]:
            progress(current - seen[0])
            seen[0] = current
    return hook


def _is_blob_missing(e: Exception) -> bool:
    from azure.core.exceptions import ResourceNotFoundError  # noqa: PLC0415

    return isinstance(e, ResourceNotFoundError) and "ContainerNotFound" not in str(getattr(e, "error_code", ""))


_clients: dict[tuple, object] = {}


def _service_client(access: Access):
    """One BlobServiceClient per account and credential in this process."""
    from azure.storage.blob import BlobServiceClient, ExponentialRetry  # noqa: PLC0415

    key = (access.endpoint, access.account, access.credential_kind, access.secret)
    client = _clients.get(key)
    if client is not None:
        return client
    kw = dict(retry_policy=ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=SDK_RETRIES,
                                            random_jitter_range=1),
              connection_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)
    kind, secret, url = access.credential_kind, access.secret, access.endpoint
    if kind == "connection_string":
        client = BlobServiceClient.from_connection_string(secret, **kw)
    elif kind == "account_key":
        client = BlobServiceClient(url, credential={"account_name": access.account, "account_key": secret}, **kw)
    elif kind == "sas_token":
        client = BlobServiceClient(f"{url}?{(secret or '').lstrip('?')}", **kw)
    elif kind == "identity":
        from azure.identity import DefaultAzureCredential  # noqa: PLC0415

        client = BlobServiceClient(url, credential=DefaultAzureCredential(), **kw)
    else:
        client = BlobServiceClient(url, **kw)
    _clients[key] = client
    return client


def classify(err: Exception, uri: str, access: Access) -> StorageError:
    """An SDK exception as a StorageError in words: which location, what went wrong."""
    from azure.core.exceptions import (  # noqa: PLC0415
        ClientAuthenticationError, HttpResponseError, ResourceNotFoundError, ServiceRequestError,
        ServiceResponseError,
    )

    code = getattr(err, "error_code", None) or ""
    status = getattr(err, "status_code", None)
    account = access.account or "?"
    if isinstance(err, ResourceNotFoundError) and "ContainerNotFound" in str(code or err):
        return StorageError(uri, f"the container '{access.container}' does not exist in storage account '{account}'")
    if isinstance(err, ClientAuthenticationError) or status in (401, 403) or "Authoriz" in str(code) \
            or "Authentication" in str(code):
        what = f"credential {access.credential_kind}"
        return StorageError(uri, f"storage account '{account}' refused the {what} ({code or status}): "
                            "check the datastore's credential and its permissions")
    if isinstance(err, (ServiceRequestError, ServiceResponseError)):
        msg = str(err).split("\n")[0][:200]
        return StorageError(uri, f"cannot reach {access.endpoint}: {msg}", transient=True)
    if isinstance(err, HttpResponseError):
        transient = status is None or status >= 500 or status in (408, 429)
        msg = str(getattr(err, "reason", "") or err).split("\n")[0][:200]
        return StorageError(uri, f"{status} {code}: {msg}".strip(), transient=transient)
    if isinstance(err, OSError):
        return StorageError(uri, f"{type(err).__name__}: {err}", transient=True)
    return StorageError(uri, f"{type(err).__name__}: {str(err)[:200]}")


def parallel(fn: Callable, items: list, threads: int = TRANSFER_THREADS) -> None:
    """Run ``fn(item)`` for every item on a thread pool; the first exception is raised."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass
