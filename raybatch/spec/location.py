"""Where files live: a parsed location string.

Accepted in job files (inputs, outputs, output_root) and in datastore definitions::

    /abs/path, ~/path, file:///abs/path      a local disk, or a mount present on every node
                                             (NFS, Azure Files over NFS/SMB, a parallel FS)
    az://container/path                      Azure Blob, in the default datastore's account
    abfs[s]://container@account.dfs.core.windows.net/path
    https://account.blob.core.windows.net/container/path
    datastore://name/path                    a datastore defined on the server
    azureml://datastores/name/paths/path     the same, Azure ML's spelling

A parsed location holds no secret: credentials belong to datastores and are
resolved when an attempt starts (``raybatch.storage.datastores``)."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")
DATASTORE_RE = re.compile(r"[A-Za-z0-9_][-A-Za-z0-9_]{0,63}")

AZURE_FILES_HELP = (
    "Azure Files is used through a mount: mount the share on every node (NFS 4.1 or SMB, in the "
    "cluster's setup commands; see docs/storage.md) and give the mount path"
)


class LocationError(ValueError):
    """A location string that cannot be used; the message says why and what is allowed."""


@dataclass(frozen=True)
class Location:
    """``kind`` 'local': ``path`` is an absolute local path. 'blob': ``container`` and
    ``path`` (no leading '/'), in ``account`` (None: the default datastore's). 'datastore':
    ``datastore`` and ``path`` relative to it, resolved on the server."""

    kind: str
    path: str
    container: Optional[str] = None
    account: Optional[str] = None
    datastore: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def join(self, *parts: str) -> "Location":
        clean = [p.strip("/") for p in parts if p and p.strip("/")]
        if self.kind == "local":
            return Location("local", str(Path(self.path, *clean)))
        path = posixpath.join(self.path, *clean) if self.path else posixpath.join(*clean) if clean else ""
        return Location(self.kind, path, self.container, self.account, self.datastore)

    @property
    def uri(self) -> str:
        if self.kind == "local":
            return self.path
        if self.kind == "datastore":
            return f"datastore://{self.datastore}/{self.path}".rstrip("/")
        host = f"{self.container}@{self.account}" if self.account else self.container
        return f"az://{host}/{self.path}".rstrip("/")

    def __str__(self) -> str:
        return self.uri


def _local(text: str, path: str) -> Location:
    """A local path with its '..' parts resolved as text: which datastore (and workspace) a
    path belongs to, and whether it is in the server's jobs root, are decided on its text, so
    '/data/b/../a' must be seen as '/data/a', not as a path below '/data/b'."""
    return Location("local", os.path.normpath(path))


def parse(text: str) -> Location:
    """Parse a location string; :class:`LocationError` names what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise LocationError("empty location; give a path, az://container/path or datastore://name/path")
    text = text.strip()
    if "://" not in text:
        if text.startswith("~") or text.startswith("/"):
            return _local(text, str(Path(text).expanduser()))
        raise LocationError(
            f"'{text}' is a relative path; use an absolute path (or ~/...), az://container/path, "
            "or datastore://name/path"
        )
    url = urlparse(text)
    scheme = url.scheme.lower()
    if scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise LocationError(f"'{text}': file:// URLs name no host; use file:///absolute/path")
        return _local(text, str(Path(url.path or "/")))
    if scheme == "az":
        container, _, account = url.netloc.partition("@")
        return _blob(text, container, account.split(".")[0] if account else None, url.path)
    if scheme in ("abfs", "abfss"):
        container, at, host = url.netloc.partition("@")
        if not at:
            return _blob(text, container, None, url.path)
        return _blob(text, container, _account_of(text, host, ("dfs", "blob")), url.path)
    if scheme in ("https", "http"):
        host = url.hostname or ""
        if ".file.core." in host:
            raise LocationError(f"'{text}': {AZURE_FILES_HELP}")
        if ".blob.core." not in host and ".dfs.core." not in host:
            raise LocationError(
                f"'{text}': only Azure Blob URLs (https://<account>.blob.core.windows.net/...) are "
                "locations; for another endpoint (Azurite, a sovereign cloud) define a datastore"
            )
        container, _, rest = url.path.lstrip("/").partition("/")
        return _blob(text, container, _account_of(text, host, ("blob", "dfs")), rest)
    if scheme == "datastore":
        return _datastore(text, url.netloc, url.path)
    if scheme == "azureml":
        m = re.fullmatch(r"azureml://datastores/([^/]+)(?:/paths(?:/(.*))?)?/?", text)
        if not m:
            raise LocationError(f"'{text}': expected azureml://datastores/<name>/paths/<path>")
        return _datastore(text, m.group(1), m.group(2) or "")
    if scheme in ("azfiles", "smb", "cifs"):
        raise LocationError(f"'{text}': {AZURE_FILES_HELP}")
    raise LocationError(
        f"'{text}': unsupported scheme '{scheme}://'; allowed: local paths, file://, az://, "
        "abfs[s]://, https://<account>.blob.core.windows.net/, datastore://, azureml://datastores/"
    )


def _account_of(text: str, host: str, services: tuple[str, ...]) -> str:
    account, _, rest = host.partition(".")
    if not rest.split(".")[0] in services or not ACCOUNT_RE.fullmatch(account):
        raise LocationError(f"'{text}': cannot read a storage account from host '{host}'")
    return account


def _blob(text: str, container: str, account: Optional[str], path: str) -> Location:
    if not CONTAINER_RE.fullmatch(container or ""):
        raise LocationError(
            f"'{text}': '{container}' is not a valid container name (3-63 lower-case letters, "
            "digits and single '-')"
        )
    if account is not None and not ACCOUNT_RE.fullmatch(account):
        raise LocationError(f"'{text}': '{account}' is not a storage account name (3-24 a-z, 0-9)")
    return Location("blob", _clean(text, path), container=container, account=account)


def _datastore(text: str, name: str, path: str) -> Location:
    if not DATASTORE_RE.fullmatch(name or ""):
        raise LocationError(f"'{text}': '{name}' is not a datastore name (letters, digits, '-', '_')")
    return Location("datastore", _clean(text, path), datastore=name)


def _clean(text: str, path: str) -> str:
    parts = [p for p in (path or "").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LocationError(f"'{text}': '..' is not allowed in a location")
    return "/".join(parts)
