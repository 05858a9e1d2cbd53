"""Named datastores: a location and how to reach it, defined once on the server.

``<state dir>/datastores.yaml`` (or ``--datastores FILE``), re-read when it changes::

    default: training              # what a bare az://container/path uses (optional)
    datastores:
      training:
        url: az://data/team-a      # a container, optionally a path in it
        account: mystorageacct
        # endpoint: http://127.0.0.1:10000/devstoreaccount1   (Azurite, sovereign clouds)
        credential:
          account_key: {env: TRAINING_STORAGE_KEY}     # or {file: /etc/raybatch/key}
          # connection_string: {env: ...}
          # sas_token: {file: ...}
          # identity: default      # DefaultAzureCredential: managed identity, az login, ...
          # anonymous: true        # public containers
        workspace: vision          # only jobs of this workspace may name it (absent: every workspace)
      nfs:
        url: /mnt/nfs/datasets     # a mount present on every node

Job files name them: ``datastore://training/digits`` or
``azureml://datastores/training/paths/digits``.

Secrets are *references*: the file never holds a key, only where to read it. They
are read when an attempt starts, handed to its driver in a file only the server's
user can read (deleted once read), and never written to the store, the API, Ray's
job metadata or any log. :class:`Access` (what a node needs to reach a location)
redacts its secret in ``repr``."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raybatch.errors import SpecError, format_validation_error
from raybatch.spec.location import DATASTORE_RE, Location, LocationError, parse


class SecretRef(BaseModel):
    """Where a secret is read from: an environment variable of the server, or a file."""

    model_config = ConfigDict(extra="forbid")

    env: Optional[str] = Field(None, description="Environment variable of the server.")
    file: Optional[str] = Field(None, description="File on the server's machine.")

    @model_validator(mode="after")
    def _one(self) -> "SecretRef":
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file (a secret is never written here)")
        return self

    def read(self, what: str) -> str:
        if self.env is not None:
            value = (os.environ.get(self.env) or "").strip()
            if not value:
                raise CredentialError(f"{what}: environment variable {self.env} is not set on the server")
            return value
        path = Path(self.file or "").expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise CredentialError(f"{what}: cannot read {path}: {e.strerror or e}") from None
        if not value:
            raise CredentialError(f"{what}: {path} is empty")
        return value

    def describe(self) -> str:
        return f"env {self.env}" if self.env is not None else f"file {self.file}"


class CredentialSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_key: Optional[SecretRef] = None
    connection_string: Optional[SecretRef] = None
    sas_token: Optional[SecretRef] = None
    identity: Optional[Literal["default"]] = Field(
        None, description="'default': azure-identity's DefaultAzureCredential (managed identity on nodes)."
    )
    anonymous: bool = False

    @field_validator("account_key", "connection_string", "sas_token", mode="before")
    @classmethod
    def _no_inline(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError("secrets are not written in this file; give {env: VARIABLE} or {file: PATH}")
        return v

    @model_validator(mode="after")
    def _one(self) -> "CredentialSpec":
        given = [k for k in ("account_key", "connection_string", "sas_token", "identity")
                 if getattr(self, k) is not None] + (["anonymous"] if self.anonymous else [])
        if len(given) != 1:
            raise ValueError("give exactly one of account_key, connection_string, sas_token, "
                             f"identity: default, anonymous: true (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        for k in ("account_key", "connection_string", "sas_token", "identity"):
            if getattr(self, k) is not None:
                return k
        return "anonymous"

    def describe(self) -> str:
        ref = getattr(self, self.kind, None)
        return f"{self.kind} ({ref.describe()})" if isinstance(ref, SecretRef) else self.kind


class DatastoreSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., description="az://container[/path], abfs://..., or a path on every node.")
    account: Optional[str] = Field(None, description="Storage account (for az:// URLs).")
    endpoint: Optional[str] = Field(
        None, description="Blob endpoint; default https://<account>.blob.core.windows.net."
    )
    credential: Optional[CredentialSpec] = None
    workspace: Optional[str] = Field(
        None, pattern=r"^[-\w]{1,64}$",
        description="The workspace whose jobs may use it; absent: every workspace (shared).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        loc = parse(v)
        if loc.kind == "datastore":
            raise ValueError("a datastore cannot point at another datastore")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// URL")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _complete(self) -> "DatastoreSpec":
        loc = self.location
        if loc.kind == "blob":
            self.account = self.account or loc.account
            if loc.account and self.account != loc.account:
                raise ValueError(f"account '{self.account}' differs from the URL's '{loc.account}'")
            if not self.account and not (self.credential and self.credential.connection_string):
                raise ValueError("an Azure Blob datastore needs an account (or a connection_string)")
            if self.credential is None:
                raise ValueError("an Azure Blob datastore needs a credential "
                                 "(account_key, connection_string, sas_token, identity or anonymous)")
        elif self.credential is not None or self.endpoint or self.account:
            raise ValueError("a local/mounted datastore takes no account, endpoint or credential")
        return self

    @property
    def location(self) -> Location:
        return parse(self.url)


class DatastoresFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: Optional[str] = Field(None, description="The datastore a bare az://container/path uses.")
    datastores: dict[str, DatastoreSpec] = Field(default_factory=dict)

    @field_validator("datastores")
    @classmethod
    def _names(cls, v: dict[str, DatastoreSpec]) -> dict[str, DatastoreSpec]:
        for name in v:
            if not DATASTORE_RE.fullmatch(name):
                raise ValueError(f"'{name}' is not a datastore name (letters, digits, '-', '_')")
        return v

    @model_validator(mode="after")
    def _default(self) -> "DatastoresFile":
        if self.default is not None and self.default not in self.datastores:
            raise ValueError(f"default: no datastore named '{self.default}'")
        return self


class CredentialError(RuntimeError):
    """A credential reference that cannot be read (unset variable, unreadable file)."""


@dataclass(frozen=True)
class Access:
    """What a node needs to reach one location: picklable, secret redacted in repr."""

    kind: str                          # 'local' | 'blob'
    path: str                          # local: absolute path; blob: path inside the container
    container: Optional[str] = None
    account: Optional[str] = None
    endpoint: Optional[str] = None     # blob endpoint URL, account included
    credential_kind: str = "none"      # account_key | connection_string | sas_token | identity | anonymous
    secret: Optional[str] = field(default=None, repr=False)
    uri: str = ""                      # how users see it (no secret)

    def child(self, *parts: str) -> "Access":
        clean = [p.strip("/") for p in parts if p and p.strip("/")]
        if self.kind == "local":
            return replace(self, path=str(Path(self.path, *clean)), uri=str(Path(self.path, *clean)))
        path = "/".join([p for p in [self.path, *clean] if p])
        return replace(self, path=path, uri="/".join([self.uri.rstrip("/"), *clean]))

    def public(self) -> dict[str, Any]:
        """For attempt files and the API: no secret."""
        return {"kind": self.kind, "path": self.path, "container": self.container, "account": self.account,
                "endpoint": self.endpoint, "credential_kind": self.credential_kind, "uri": self.uri}

    def to_dict(self) -> dict[str, Any]:
        return {**self.public(), "secret": self.secret}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Access":
        return cls(**{k: d.get(k) for k in ("kind", "path", "container", "account", "endpoint",
                                             "credential_kind", "secret", "uri")})


class Datastores:
    """The server's datastores; resolves job-file locations to :class:`Access`."""

    def __init__(self, spec: Optional[DatastoresFile] = None):
        self.spec = spec or DatastoresFile()

    @classmethod
    def load(cls, path: Path) -> "Datastores":
        """Read the datastores file; a missing file means no datastores."""
        if not path.is_file():
            return cls()
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            # PyYAML quotes the offending line, which may hold a pasted secret: position only
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "cannot be parsed"
            raise SpecError(str(path), [f"not valid YAML{where}: {problem}"], "datastores file") from None
        if not isinstance(data, dict):
            raise SpecError(str(path), ["(top level): must be a YAML mapping"], "datastores file")
        try:
            return cls(DatastoresFile.model_validate(data))
        except ValidationError as err:
            # never echo a value from this file: any of them may be a pasted secret
            values = [str(e.get("input")) for e in err.errors()
                      if isinstance(e.get("input"), (str, int, float)) and len(str(e.get("input"))) >= 16]
            problems = []
            for p in format_validation_error(err, DatastoresFile):
                p = p.rsplit(" (got ", 1)[0]
                for v in values:
                    p = p.replace(v, "<the value given>")
                problems.append(p)
            raise SpecError(str(path), problems, "datastores file") from None

    @property
    def names(self) -> list[str]:
        return sorted(self.spec.datastores)

    def describe(self) -> list[dict[str, Any]]:
        """For `raybatch datastores` / the API: never a secret, only where it is read from."""
        out = []
        for name, ds in sorted(self.spec.datastores.items()):
            out.append({"name": name, "url": ds.url, "account": ds.account, "endpoint": ds.endpoint,
                        "credential": ds.credential.describe() if ds.credential else None,
                        "default": name == self.spec.default, "workspace": ds.workspace})
        return out

    def owner_of(self, text: str) -> Optional[tuple[str, str]]:
        """(datastore, workspace) when the location is a datastore's that belongs to one
        workspace; None for a shared datastore or no datastore at all."""
        loc = parse(text)
        if loc.kind == "local":
            p = Path(loc.path)
            for name, ds in sorted(self.spec.datastores.items()):
                root = ds.location
                if ds.workspace and root.kind == "local" and (p == Path(root.path) or Path(root.path) in p.parents):
                    return name, ds.workspace
            return None
        try:
            found = self._datastore_of(loc)
        except LocationError:
            return None  # check() reports it
        if found and found[1].workspace:
            return found[0], found[1].workspace
        if loc.kind == "blob" and found is not None:
            # reached through a shared datastore's credential (its account's, or the default's):
            # still a workspace's if one of its datastores describes this container and path
            account = found[1].account
            for name, ds in sorted(self.spec.datastores.items()):
                base = ds.location
                if ds.workspace and base.kind == "blob" and ds.account == account \
                        and base.container == loc.container and _below(loc.path, base.path):
                    return name, ds.workspace
        return None

    def workspace_problems(self, spec: Any) -> list[str]:
        """A job may name only its own workspace's datastores (and shared ones): one problem
        per field that names another workspace's (checked at submit)."""
        fields = [("output_root", spec.output_root)] if spec.output_root else []
        fields += [(f"inputs.{i}.path", inp.path) for i, inp in spec.inputs.items() if inp.mode != "upload"]
        fields += [(f"outputs.{i}.path", o.path) for i, o in spec.outputs.items() if o.path]
        if spec.array is not None and spec.array.over:
            fields.append(("array.over", spec.array.base))
        problems = []
        for field_name, text in fields:
            try:
                owner = self.owner_of(text)
            except (LocationError, ValueError):
                continue  # check_locations reports what does not parse
            if owner is not None and owner[1] != spec.workspace:
                problems.append(f"{field_name}: datastore '{owner[0]}' belongs to workspace '{owner[1]}'; a job of "
                                f"workspace '{spec.workspace}' may use only its own workspace's datastores and "
                                "shared ones (no `workspace:` in the datastores file)")
        return problems

    def check(self, text: str) -> Location:
        """Parse a job-file location and check that what it names exists here (at submit)."""
        loc = parse(text)
        self._datastore_of(loc)
        return loc

    def _datastore_of(self, loc: Location) -> Optional[tuple[str, DatastoreSpec]]:
        if loc.kind == "datastore":
            ds = self.spec.datastores.get(loc.datastore or "")
            if ds is None:
                known = ", ".join(self.names) or "none are defined"
                raise LocationError(f"'{loc.uri}': no datastore named '{loc.datastore}' (defined: {known})")
            return loc.datastore or "", ds
        if loc.kind == "blob":
            if loc.account is None:
                if self.spec.default is None:
                    raise LocationError(
                        f"'{loc.uri}' names no storage account and no default datastore is defined; "
                        "use datastore://name/path, abfs://container@account.dfs.core.windows.net/path, "
                        "or set 'default' in the server's datastores file")
                return self.spec.default, self.spec.datastores[self.spec.default]
            for name, ds in sorted(self.spec.datastores.items()):
                if ds.location.kind == "blob" and ds.account == loc.account:
                    return name, ds
            return None  # an account without a datastore: DefaultAzureCredential
        return None

    def covers(self, text: str) -> bool:
        """Is the location reached through a datastore (its own credential), or inside a
        local datastore's directory? What the server may read on a user's behalf."""
        loc = parse(text)
        if loc.kind == "local":
            p = Path(loc.path)
            return any(ds.location.kind == "local" and (p == Path(ds.location.path) or Path(ds.location.path) in p.parents)
                       for ds in self.spec.datastores.values())
        try:
            return self._datastore_of(loc) is not None
        except LocationError:
            return False

    def resolve(self, text: str) -> Access:
        """The location with its credential read (when an attempt starts, on the server)."""
        loc = parse(text)
        found = self._datastore_of(loc)
        if loc.kind == "local":
            return Access("local", loc.path, uri=loc.path)
        if found is None:  # blob in an account no datastore describes
            return Access("blob", loc.path, container=loc.container, account=loc.account,
                          endpoint=f"https://{loc.account}.blob.core.windows.net",
                          credential_kind="identity", uri=loc.uri)
        name, ds = found
        base = ds.location
        if loc.kind == "datastore":
            rel = loc.path
            if base.kind == "local":
                path = str(Path(base.path, rel)) if rel else base.path
                return Access("local", path, uri=path)
            container, path = base.container, "/".join(p for p in (base.path, rel) if p)
        else:
            if base.kind != "blob":
                raise LocationError(f"'{loc.uri}': the default datastore '{name}' is not Azure Blob")
            container, path = loc.container, loc.path
        cred = ds.credential
        assert cred is not None
        secret = None
        ref = getattr(cred, cred.kind, None)
        if isinstance(ref, SecretRef):
            secret = ref.read(f"datastore '{name}' credential {cred.kind}")
        account = ds.account or _account_from_connection_string(secret or "")
        endpoint = ds.endpoint or (_endpoint_from_connection_string(secret or "") if cred.kind == "connection_string"
                                   else None) or f"https://{account}.blob.core.windows.net"
        uri = f"datastore://{name}/{loc.path}".rstrip("/") if loc.kind == "datastore" else loc.uri
        return Access("blob", path, container=container, account=account, endpoint=endpoint,
                      credential_kind=cred.kind, secret=secret, uri=uri)


def _conn_fields(cs: str) -> dict[str, str]:
    out = {}
    for part in cs.split(";"):
        k, _, v = part.partition("=")
        if k:
            out[k.strip()] = v.strip()
    return out


def _account_from_connection_string(cs: str) -> Optional[str]:
    return _conn_fields(cs).get("AccountName")


def _endpoint_from_connection_string(cs: str) -> Optional[str]:
    f = _conn_fields(cs)
    if f.get("BlobEndpoint"):
        return f["BlobEndpoint"].rstrip("/")
    if f.get("AccountName"):
        return f"{f.get('DefaultEndpointsProtocol', 'https')}://{f['AccountName']}.blob.{f.get('EndpointSuffix', 'core.windows.net')}"
    return None


class DatastoresFileWatcher:
    """The server's datastores file, re-read when it changes (checked at most once a
    second); a bad file is reported and the last good definitions stay in force."""

    def __init__(self, path: Path):
        self.path = path
        self.error: Optional[str] = None
        self._mtime: Optional[float] = -1.0
        self._checked = 0.0
        self._current = Datastores()
        self._lock = threading.Lock()

    def __call__(self) -> Datastores:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= 1.0:
                self._checked = now
                try:
                    mtime: Optional[float] = self.path.stat().st_mtime
                except FileNotFoundError:
                    mtime = None
                if mtime != self._mtime:
                    self._mtime = mtime
                    try:
                        self._current = Datastores.load(self.path)
                        self.error = None
                    except SpecError as e:
                        self.error = str(e)
            return self._current


def _below(path: str, base: str) -> bool:
    """Is blob path ``path`` ``base`` or below it (both without a leading '/')?"""
    path, base = path.strip("/"), base.strip("/")
    return not base or path == base or path.startswith(base + "/")
