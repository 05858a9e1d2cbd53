"""Reading and writing one location: a local/mounted directory, or Azure Blob.

Azure Blob goes through azure-storage-blob directly rather than adlfs: we need
per-request retry and timeout settings (adlfs keeps the SDK defaults, which spend
~80 s on an unreachable endpoint before failing), append blobs with a position
condition for live logs, blob ETags and Content-MD5 for the download cache, and
the service's error codes to tell a missing container from a bad key.

Every failure is a :class:`StorageError` that names the location and says whether
retrying can help (``transient``)."""

from __future__ import annotations

import os
import shutil
import tempfile
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


class StorageError(RuntimeError):
    def __init__(self, uri: str, cause: str, transient: bool = False):
        super().__init__(f"{uri}: {cause}")
        self.uri = uri
        self.cause = cause
        self.transient = transient


@dataclass(frozen=True)
class Entry:
    path: str              # relative to the location, '/'-separated
    size: int
    mtime: float           # seconds since the epoch
    etag: Optional[str] = None
    md5: Optional[str] = None


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


def open_backend(access: Access) -> Backend:
    if access.kind == "local":
        return LocalBackend(access)
    if access.kind == "blob":
        return BlobBackend(access)
    raise ValueError(f"unknown location kind {access.kind!r}")


# ---- local directories (local disk, NFS, Azure Files mounts) ----------------------------
class LocalBackend(Backend):
    def __init__(self, access: Access):
        self.access = access
        self.root = Path(access.path)

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def list(self, rel: str = "") -> list[Entry]:
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

    def _inside(self, rel: str) -> Path:
        """The file to serve, refusing one that resolves outside the location: a job's
        symlink to /etc/passwd in its outputs must not be readable through the server."""
        p = self._p(rel)
        real, root = p.resolve(), self.root.resolve()
        if real != root and root not in real.parents:
            raise StorageError(self.access.child(rel).uri, "is a link to outside the location; not served")
        return p

    def read(self, rel: str, offset: int, length: int) -> tuple[bytes, int]:
        p = self._inside(rel)
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                return f.read(length), size
        except (FileNotFoundError, IsADirectoryError):
            return b"", 0

    def stream(self, rel: str, length: Optional[int] = None) -> Iterator[bytes]:
        left = float("inf") if length is None else length
        with open(self._inside(rel), "rb") as f:
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
