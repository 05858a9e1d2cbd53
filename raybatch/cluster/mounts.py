"""Batch AI's cluster ``mountVolumes`` on a raybatch node (``raybatch node-setup --mounts
FILE``, which every cluster YAML's setup commands run on every node).

The mounts file uses Batch AI's field names, optionally wrapped in ``mountVolumes:`` (or a
whole Batch AI cluster document's ``properties.nodeSetup.mountVolumes``)::

    root: /mnt/raybatch                 # optional; where everything is mounted (DEFAULT_MOUNT_ROOT)
    azureFileShares:
      - accountName: myaccount
        azureFileUrl: https://myaccount.file.core.windows.net/myshare
        relativeMountPath: afs           # -> /mnt/raybatch/afs
        credentials: {accountKey: ...}   # written to a 0600 credentials file, never on a command line
        directoryMode: "0777"            # Batch AI's defaults
        fileMode: "0777"
    azureBlobFileSystems:
      - accountName: myaccount
        containerName: data
        relativeMountPath: data
        # credentials: {accountKey: ...} # without: the node's managed identity (blobfuse2 mode: msi)
        mountOptions: "-o attr_timeout=240"
    unmanagedFileSystems:
      - mountCommand: mount -t nfs 10.0.0.4:/export   # Batch AI appends the mount path; so do we
        relativeMountPath: nfs

How each is mounted:

- ``azureFileShares``: ``mount -t cifs //<host>/<share> <dir> -o vers=3.0,credentials=<file>,
  dir_mode=..,file_mode=..,serverino,nosharesock,actimeo=30,uid=<user>,gid=<group>``; the
  credentials file (``username=``, ``password=``) is written with mode 0600 under
  ``/etc/raybatch/mounts/`` when run as root, else ``~/.raybatch/mounts/`` (mode 0700).
- ``azureBlobFileSystems``: ``blobfuse2 mount <dir> --config-file=<file>`` with a generated
  0600 config: ``azstorage: {type: block, account-name, container, endpoint, mode: msi}`` (the
  VM's managed identity: Ray's Azure provider gives every node the cluster's user-assigned
  identity; grant it "Storage Blob Data Contributor" on the account) or ``mode: key`` with the
  account key; ``mountOptions`` are appended to the command line.
- ``unmanagedFileSystems``: ``mountCommand`` run by ``bash -c`` as root, with
  ``$AZ_BATCHAI_MOUNT_ROOT``/``$AZ_BATCHAI_JOB_MOUNT_ROOT``/``$AZ_BATCHAI_NODE_MOUNT_ROOT``/
  ``$RAYBATCH_MOUNT_ROOT`` (also in ``${...}`` form) replaced by the root and, as Batch AI
  did, the mount directory appended (``appendMountPath: false``, a raybatch addition, leaves
  it off; the command then finds it in ``$RAYBATCH_MOUNT_PATH``, substituted the same way).
- ``fileServers`` (Batch AI's managed NFS VMs) do not exist in raybatch: an error says to use
  ``unmanagedFileSystems`` with an NFS mount command.
- ``credentials.accountKeySecretReference`` (Key Vault) is not supported on nodes yet: an
  error, never silently ignored.

Idempotent: a directory listed in ``/proc/mounts`` is skipped, so the setup commands can
rerun (Ray reruns them on ``ray up`` of a running cluster). Privileged steps run under
``sudo -n`` unless already root. Every step is logged to ``~/.raybatch/setup.log``
(``RAYBATCH_HOME``) with the account keys replaced by ``***``; ``--dry-run`` prints the same
lines and runs nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from raybatch.contract import NODE_MOUNT_ROOT
from raybatch import config as rb_config
from raybatch.errors import SpecError, format_validation_error

DEFAULT_MOUNT_ROOT = NODE_MOUNT_ROOT
SECRET_MASK = "***"
ROOT_VARS = ("AZ_BATCHAI_MOUNT_ROOT", "AZ_BATCHAI_JOB_MOUNT_ROOT", "AZ_BATCHAI_NODE_MOUNT_ROOT",
             "RAYBATCH_MOUNT_ROOT")
PATH_VAR = "RAYBATCH_MOUNT_PATH"
BLOBFUSE_CACHE_ROOT = "/mnt/raybatch-blobfuse2-cache"
# tool -> what provides it (Ubuntu package)
TOOLS = {
    "mount.cifs": "cifs-utils (sudo apt-get install -y cifs-utils)",
    "blobfuse2": "blobfuse2 from packages.microsoft.com (sudo apt-get install -y blobfuse2 fuse3; "
                 "https://learn.microsoft.com/azure/storage/blobs/blobfuse2-how-to-deploy)",
    "sudo": "sudo (or run node-setup as root)",
    "bash": "bash",
    "mkdir": "coreutils",
}

_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_MODE = re.compile(r"^0?[0-7]{3}$")
_REL = re.compile(r"^[\w.-]+(/[\w.-]+)*$")


def _account_name(v: str) -> str:
    if not _ACCOUNT.match(v):
        raise ValueError("a storage account name: 3-24 lowercase letters and digits")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShareCredentials(_Model):
    accountKey: Optional[SecretStr] = None
    accountKeySecretReference: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _one(self) -> "ShareCredentials":
        if self.accountKeySecretReference is not None:
            raise ValueError("accountKeySecretReference (Key Vault) is not supported on nodes yet; give "
                             "accountKey (keep the mounts file private: it is copied to every node)")
        return self


class _Mount(_Model):
    relativeMountPath: str

    @field_validator("relativeMountPath")
    @classmethod
    def _relative(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not _REL.match(v) or any(p in ("..", ".") for p in v.split("/")):
            raise ValueError("a relative path under the mount root: letters, digits, '_', '-', '.' and '/' "
                             "(no leading '/', no '..')")
        return v


class AzureFileShare(_Mount):
    accountName: str
    azureFileUrl: str
    credentials: ShareCredentials
    directoryMode: str = "0777"
    fileMode: str = "0777"

    @field_validator("accountName")
    @classmethod
    def _account(cls, v: str) -> str:
        return _account_name(v)

    @field_validator("directoryMode", "fileMode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> str:
        v = str(v)
        if not _MODE.match(v):
            raise ValueError("an octal mode such as \"0777\" or \"0755\"")
        return v.rjust(4, "0")

    @field_validator("azureFileUrl")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme != "https" or not u.hostname or not u.path.strip("/"):
            raise ValueError("https://<account>.file.core.windows.net/<share>")
        return v

    @model_validator(mode="after")
    def _key(self) -> "AzureFileShare":
        if self.credentials.accountKey is None:
            raise ValueError("credentials.accountKey is required for an Azure file share")
        return self

    @property
    def unc(self) -> str:
        u = urlparse(self.azureFileUrl)
        return f"//{u.hostname}/{u.path.strip('/')}"


class AzureBlobFileSystem(_Mount):
    accountName: str
    containerName: str
    credentials: Optional[ShareCredentials] = None
    mountOptions: Optional[str] = None

    @field_validator("accountName")
    @classmethod
    def _account(cls, v: str) -> str:
        return _account_name(v)

    @field_validator("containerName")
    @classmethod
    def _container(cls, v: str) -> str:
        if not _CONTAINER.match(v):
            raise ValueError("a container name: 3-63 lowercase letters, digits and single '-'")
        return v

    @field_validator("mountOptions")
    @classmethod
    def _options(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                shlex.split(v)
            except ValueError as e:
                raise ValueError(f"not a valid command-line fragment ({e})") from None
        return v


class UnmanagedFileSystem(_Mount):
    mountCommand: str = Field(min_length=1)
    appendMountPath: bool = True


class MountVolumes(_Model):
    root: str = DEFAULT_MOUNT_ROOT
    azureFileShares: List[AzureFileShare] = []
    azureBlobFileSystems: List[AzureBlobFileSystem] = []
    unmanagedFileSystems: List[UnmanagedFileSystem] = []
    fileServers: Optional[list] = None

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("an absolute directory, e.g. /mnt/raybatch")
        return v.rstrip("/") or "/"

    @field_validator("fileServers")
    @classmethod
    def _no_file_servers(cls, v: Optional[list]) -> None:
        if v:  # an empty list is harmless: nothing to mount
            raise ValueError("raybatch has no managed file servers; mount the NFS export with "
                             "unmanagedFileSystems: [{mountCommand: 'mount -t nfs HOST:/export', "
                             "relativeMountPath: NAME}]")

    @model_validator(mode="after")
    def _unique(self) -> "MountVolumes":
        seen: dict[str, str] = {}
        for kind in ("azureFileShares", "azureBlobFileSystems", "unmanagedFileSystems"):
            for i, m in enumerate(getattr(self, kind)):
                where = f"{kind}.{i}"
                if m.relativeMountPath in seen:
                    raise ValueError(f"{where}.relativeMountPath: '{m.relativeMountPath}' is also the path of "
                                     f"{seen[m.relativeMountPath]}; each mount needs its own directory")
                seen[m.relativeMountPath] = where
        return self

    def path(self, m: _Mount) -> str:
        return f"{self.root}/{m.relativeMountPath}"

    def secrets(self) -> list[str]:
        return [c.accountKey.get_secret_value() for m in (*self.azureFileShares, *self.azureBlobFileSystems)
                if (c := m.credentials) is not None and c.accountKey is not None
                and c.accountKey.get_secret_value()]


def _secret_values(doc: Any) -> list[str]:
    """Every account key in a raw document (for redacting error messages)."""
    out: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "accountKey" and isinstance(v, (str, int, float)) and str(v):
                out.append(str(v))
            else:
                out += _secret_values(v)
    elif isinstance(doc, list):
        for v in doc:
            out += _secret_values(v)
    return out


def redact(text: str, secrets: list[str]) -> str:
    for s in sorted(set(secrets), key=len, reverse=True):
        if s:
            text = text.replace(s, SECRET_MASK)
    return text


def _unwrap(doc: Any) -> Any:
    if isinstance(doc, dict):
        props = doc.get("properties") if isinstance(doc.get("properties"), dict) else doc
        setup = props.get("nodeSetup") if isinstance(props.get("nodeSetup"), dict) else None
        if setup is not None and isinstance(setup.get("mountVolumes"), dict):
            return dict(setup["mountVolumes"], **({"root": doc["root"]} if "root" in doc else {}))
        if isinstance(doc.get("mountVolumes"), dict) and set(doc) <= {"mountVolumes", "root"}:
            return dict(doc["mountVolumes"], **({"root": doc["root"]} if "root" in doc else {}))
    return doc


def parse(doc: Any, source: str = "<mounts>") -> MountVolumes:
    """A validated mounts document; SpecError lists every bad field (never a key's value)."""
    if doc is None:
        doc = {}
    doc = _unwrap(doc)
    if not isinstance(doc, dict):
        raise SpecError(source, ["(top level): a mounts file is a mapping of azureFileShares, "
                                 "azureBlobFileSystems, unmanagedFileSystems (and root)"], what="mounts file")
    try:
        return MountVolumes.model_validate(doc)
    except ValidationError as err:
        problems = [redact(p, _secret_values(doc)) for p in format_validation_error(err, MountVolumes)]
        raise SpecError(source, problems, what="mounts file") from None


def load(path: str | Path) -> MountVolumes:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(str(path), [f"cannot read: {e.strerror or e}"], what="mounts file") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(str(path), [f"not valid YAML/JSON: {e}"], what="mounts file") from None
    return parse(doc, str(path))


# ---------------------------------------------------------------- the plan


@dataclass
class Step:
    """One thing node-setup does: write a file (``content``) or run ``argv``."""

    describe: str                     # one line, no secrets
    argv: Optional[list[str]] = None
    write: Optional[str] = None       # path
    content: str = ""
    mode: int = 0o600
    privileged: bool = False          # needs root: sudo -n unless already root
    tool: Optional[str] = None        # must be installed


@dataclass
class MountPlan:
    kind: str             # azureFileShares | azureBlobFileSystems | unmanagedFileSystems
    index: int
    path: str
    steps: list[Step] = field(default_factory=list)
    skip: Optional[str] = None  # why nothing is done

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.index}] -> {self.path}"


def mounted_dirs(proc_mounts: str | Path = "/proc/mounts") -> set[str]:
    """Mount points listed in /proc/mounts (its octal escapes decoded)."""
    out = set()
    try:
        lines = Path(proc_mounts).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 2:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
            out.add(point.rstrip("/") or "/")
    return out


def secrets_dir(euid: Optional[int] = None) -> Path:
    """Where credentials files and blobfuse2 configs go: root's /etc/raybatch/mounts, else
    the user's raybatch home."""
    euid = os.geteuid() if euid is None else euid
    return Path("/etc/raybatch/mounts") if euid == 0 else rb_config.home() / "mounts"


def _file_name(rel: str) -> str:
    return rel.replace("/", "_")


def _substitute(command: str, root: str, path: str) -> str:
    for var in ROOT_VARS:
        command = command.replace("${" + var + "}", root)
        command = re.sub(r"\$" + var + r"(?![A-Za-z0-9_])", lambda _m: root, command)
    command = command.replace("${" + PATH_VAR + "}", path)
    return re.sub(r"\$" + PATH_VAR + r"(?![A-Za-z0-9_])", lambda _m: path, command)


def plan(volumes: MountVolumes, *, mounted: Optional[set[str]] = None, euid: Optional[int] = None,
         uid: Optional[int] = None, gid: Optional[int] = None, secrets: Optional[Path] = None) -> list[MountPlan]:
    """What node-setup does for each mount, in order (files, directories, commands)."""
    mounted = mounted_dirs() if mounted is None else mounted
    # the files belong to the user who runs node-setup (the one behind sudo, if any)
    uid = int(os.environ.get("SUDO_UID") or os.getuid()) if uid is None else uid
    gid = int(os.environ.get("SUDO_GID") or os.getgid()) if gid is None else gid
    secrets = secrets_dir(euid) if secrets is None else secrets
    plans: list[MountPlan] = []

    def mkdir(path: str) -> Step:
        return Step(f"mkdir -p {shlex.quote(path)}", argv=["mkdir", "-p", path], privileged=True, tool="mkdir")

    for i, share in enumerate(volumes.azureFileShares):
        path = volumes.path(share)
        p = MountPlan("azureFileShares", i, path)
        cred = str(secrets / f"cifs-{_file_name(share.relativeMountPath)}.cred")
        key = share.credentials.accountKey.get_secret_value()
        options = (f"vers=3.0,credentials={cred},dir_mode={share.directoryMode},file_mode={share.fileMode},"
                   f"serverino,nosharesock,actimeo=30,uid={uid},gid={gid}")
        argv = ["mount", "-t", "cifs", share.unc, path, "-o", options]
        p.steps = [
            Step(f"write {cred} (0600): username={share.accountName} password={SECRET_MASK}", write=cred,
                 content=f"username={share.accountName}\npassword={key}\n"),
            mkdir(path),
            Step(shlex.join(argv), argv=argv, privileged=True, tool="mount.cifs"),
        ]
        plans.append(p)

    for i, blob in enumerate(volumes.azureBlobFileSystems):
        path = volumes.path(blob)
        p = MountPlan("azureBlobFileSystems", i, path)
        name = _file_name(blob.relativeMountPath)
        cfg_path = str(secrets / f"blobfuse2-{name}.yaml")
        key = blob.credentials.accountKey.get_secret_value() if blob.credentials and blob.credentials.accountKey \
            else None
        storage: dict[str, Any] = {"type": "block", "account-name": blob.accountName,
                                   "container": blob.containerName,
                                   "endpoint": f"https://{blob.accountName}.blob.core.windows.net"}
        storage.update({"mode": "key", "account-key": key} if key else {"mode": "msi"})
        cache = f"{BLOBFUSE_CACHE_ROOT}/{name}"
        config = {
            "allow-other": True,
            "logging": {"type": "syslog", "level": "log_warning"},
            "components": ["libfuse", "file_cache", "attr_cache", "azstorage"],
            "libfuse": {"attribute-expiration-sec": 120, "entry-expiration-sec": 120,
                        "negative-entry-expiration-sec": 240},
            "file_cache": {"path": cache, "timeout-sec": 120},
            "attr_cache": {"timeout-sec": 7200},
            "azstorage": storage,
        }
        shown = dict(config, azstorage={**storage, **({"account-key": SECRET_MASK} if key else {})})
        argv = ["blobfuse2", "mount", path, f"--config-file={cfg_path}", *shlex.split(blob.mountOptions or "")]
        p.steps = [
            Step(f"write {cfg_path} (0600): azstorage: {shown['azstorage']}", write=cfg_path,
                 content=yaml.safe_dump(config, sort_keys=False)),
            mkdir(cache),
            mkdir(path),
            Step(shlex.join(argv), argv=argv, privileged=True, tool="blobfuse2"),
        ]
        plans.append(p)

    for i, fs in enumerate(volumes.unmanagedFileSystems):
        path = volumes.path(fs)
        p = MountPlan("unmanagedFileSystems", i, path)
        command = _substitute(fs.mountCommand, volumes.root, path)
        if fs.appendMountPath:
            command = f"{command} {shlex.quote(path)}"
        p.steps = [mkdir(path), Step(f"bash -c {shlex.quote(command)}", argv=["bash", "-c", command],
                                     privileged=True, tool="bash")]
        plans.append(p)

    for p in plans:
        if p.path.rstrip("/") in mounted:
            p.skip = "already mounted (listed in /proc/mounts)"
            p.steps = []
    return plans


def missing_tools(plans: list[MountPlan], euid: Optional[int] = None,
                  which: Optional[Callable[[str], Optional[str]]] = None) -> list[str]:
    """One line per tool the plans need that is not installed, naming its package."""
    euid = os.geteuid() if euid is None else euid
    search = os.pathsep.join([os.environ.get("PATH", ""), "/sbin", "/usr/sbin", "/usr/local/sbin"])
    which = which or (lambda t: shutil.which(t, path=search))
    needed: list[str] = []
    for p in plans:
        for s in p.steps:
            if s.tool and s.tool not in needed:
                needed.append(s.tool)
            if s.privileged and euid != 0 and "sudo" not in needed:
                needed.append("sudo")
    return [f"{t} not found: install {TOOLS.get(t, t)}" for t in needed if which(t) is None]


# ---------------------------------------------------------------- running it


class SetupLog:
    """Appends timestamped, redacted lines to the node's setup log (and echoes them)."""

    def __init__(self, path: Optional[Path], secrets: list[str], echo: Optional[Callable[[str], None]] = None):
        self.path, self.secrets, self.echo = path, secrets, echo
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        line = redact(line, self.secrets)
        if self.echo:
            self.echo(line)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} node-setup: {line}\n")


def default_log_path() -> Path:
    return rb_config.home() / "setup.log"


def _write_secret(path: str, content: str, mode: int) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p.parent, 0o700)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its mode on open: set it
        os.write(fd, content.encode())
    finally:
        os.close(fd)


def run(plans: list[MountPlan], log: SetupLog, *, euid: Optional[int] = None, timeout: float = 300.0,
        runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Carry the plans out; returns one line per mount that failed (its other mounts still run)."""
    euid = os.geteuid() if euid is None else euid
    failures: list[str] = []
    for p in plans:
        if p.skip:
            log(f"{p.name}: skipped, {p.skip}")
            continue
        log(f"{p.name}: mounting")
        for s in p.steps:
            log(f"  {s.describe}")
            try:
                if s.write is not None:
                    _write_secret(s.write, s.content, s.mode)
                    continue
                argv = (["sudo", "-n"] if s.privileged and euid != 0 else []) + list(s.argv or [])
                r = runner(argv, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                failures.append(f"{p.name}: `{redact(s.describe, log.secrets)}` did not finish in {timeout:g} s")
                log(f"  FAILED: timed out after {timeout:g} s")
                break
            except OSError as e:
                failures.append(f"{p.name}: `{redact(s.describe, log.secrets)}`: {e}")
                log(f"  FAILED: {e}")
                break
            for stream in (r.stdout, r.stderr):
                for line in (stream or "").strip().splitlines():
                    log(f"    | {line}")
            if r.returncode != 0:
                last = ((r.stderr or r.stdout or "").strip().splitlines() or ["no output"])[-1]
                failures.append(redact(f"{p.name}: `{s.describe}` exited {r.returncode}: {last}", log.secrets))
                log(f"  FAILED: exit {r.returncode}")
                break
        else:
            log(f"{p.name}: mounted")
    return failures
