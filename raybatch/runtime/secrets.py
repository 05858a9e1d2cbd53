"""Job secrets (``secrets:`` in the job file, ``raybatch.spec.secrets``) from submit to
the ranks' environment, and nowhere else.

1. **At rest, on the server.** The values the client sent are sealed (Fernet: AES-128-CBC
   + HMAC-SHA256) with the key in ``<state dir>/secrets.key`` (mode 0600, created
   atomically on first use) and kept in the store's ``jobs.secrets`` column; the stored
   spec holds the names only (``***``). Losing the key file loses the stored values: jobs
   still queued with secrets then fail at start, saying so.
2. **At start.** The launcher opens the sealed values and reads each Key Vault reference
   with the server's identity (``DefaultAzureCredential``: the head's managed identity on
   Azure), and writes them into the attempt's ``secrets.json`` (0600) with the storage
   credentials; the driver reads and removes that file.
3. **On the nodes.** The driver hands them to each rank actor as a method argument of
   ``RankActor.start`` (arguments, unlike a runtime_env or an actor's constructor, are not
   kept in Ray's control store or shown by its dashboard); the actor adds them to the
   process's environment only, and replaces every occurrence of a value in what the
   process prints (its stdout/stderr files, and the copy in the Ray job's log) with
   ``***`` (``Masker``).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from raybatch.spec.job import JobSpec
from raybatch.spec.secrets import MASK, SecretRef, parse_keyvault, values, vault_name

KEY_FILE = "secrets.key"
MIN_MASKED = 4  # shorter values are not masked in output: "1" or "yes" would garble every log


class SecretError(RuntimeError):
    """A secret cannot be read or opened; the message names it, never its value."""


# ---- at rest -------------------------------------------------------------------------------
class SecretBox:
    """Seals and opens a job's secret values with the server's key file."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / KEY_FILE
        self._fernet: Any = None
        self._lock = threading.Lock()

    def _key(self) -> Any:
        from cryptography.fernet import Fernet  # noqa: PLC0415

        with self._lock:
            if self._fernet is None:
                if not self.path.exists():
                    _create_key(self.path, Fernet.generate_key())
                try:
                    self._fernet = Fernet(_read_key(self.path))
                except ValueError:
                    raise SecretError(f"{self.path} is not a secrets key (a Fernet key: 32 url-safe "
                                      "base64-encoded bytes)") from None
            return self._fernet

    def seal(self, secret_values: Mapping[str, str]) -> str:
        return self._key().encrypt(json.dumps(dict(secret_values)).encode()).decode()

    def open(self, sealed: str) -> dict[str, str]:
        from cryptography.fernet import InvalidToken  # noqa: PLC0415

        try:
            return json.loads(self._key().decrypt(sealed.encode()))
        except InvalidToken:
            raise SecretError(f"the job's secrets cannot be decrypted with {self.path} (the key file was "
                              "replaced since the job was submitted): submit the job again") from None


def _create_key(path: Path, key: bytes) -> None:
    """Write the key into a private temp file, then link it into place: another process
    that got there first keeps its key (the link fails), and no reader ever sees a
    partial or world-readable key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secrets.key-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise SecretError(f"{path} must be the server user's alone (mode 0600, it is "
                              f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): refusing to use it")
        return f.read().strip()


# ---- at start: the values an attempt gets ----------------------------------------------------
def keyvault_value(ref: str, credential: Any = None) -> str:
    """A Key Vault secret's value, read with the server's identity (azure-identity's
    DefaultAzureCredential: a managed identity on Azure, ``az login`` on a laptop)."""
    from azure.core.exceptions import AzureError  # noqa: PLC0415
    from azure.keyvault.secrets import SecretClient  # noqa: PLC0415

    vault_url, name, version = parse_keyvault(ref)
    if credential is None:
        from azure.identity import DefaultAzureCredential  # noqa: PLC0415

        credential = DefaultAzureCredential()
    try:
        value = SecretClient(vault_url, credential).get_secret(name, version).value
    except AzureError as e:
        first = (str(getattr(e, "message", "") or e).strip().splitlines() or [""])[0]
        raise SecretError(f"Key Vault {vault_url}, secret '{name}': {type(e).__name__}: {first[:300]}") from None
    if value is None:
        raise SecretError(f"Key Vault {vault_url}, secret '{name}' has no value")
    return value


def attempt_values(spec: JobSpec, sealed: Optional[str], box: SecretBox,
                   read_keyvault: Callable[[str], str] = keyvault_value,
                   vault_problem: Optional[Callable[[str], Optional[str]]] = None) -> dict[str, str]:
    """Every secret of the job, by name: the sealed values opened, Key Vault references read
    now (a rotated secret is read anew at each attempt). SecretError names the one missing.
    ``vault_problem`` (a vault's name -> why the job may not read it, or None): the server's
    policy as it is now, checked again before each read (it may have changed since submit)."""
    kept = box.open(sealed) if sealed else {}
    out: dict[str, str] = {}
    for name, v in spec.secrets.items():
        if isinstance(v, SecretRef) and v.keyvault is not None:
            why = vault_problem(vault_name(v.keyvault)) if vault_problem is not None else None
            if why:
                raise SecretError(f"secrets.{name}: {why} (the server's policy, read again at each start)")
            try:
                out[name] = read_keyvault(v.keyvault)
            except SecretError as e:
                raise SecretError(f"secrets.{name}: {e}") from None
        elif name in kept:
            out[name] = kept[name]
        else:
            raise SecretError(f"secrets.{name}: the server kept no value for it")
    return out


def split_for_store(spec: JobSpec, sent: Mapping[str, str]) -> tuple[dict[str, str], Optional[str]]:
    """At submit: the values to seal (those in the spec itself, and those the client sent
    beside it), or the problem in words: an unread ``{env:}``/``{file:}`` reference, a name
    without a value, a value for no name."""
    kept = {**values(spec.secrets), **dict(sent)}
    for name, v in spec.secrets.items():
        if isinstance(v, SecretRef) and (v.env is not None or v.file is not None):
            return {}, (f"secrets.{name}: {v.shown()} is read by the client at submit (raybatch submit, "
                        "raybatch.Client); send the value instead")
        if not isinstance(v, SecretRef) and name not in kept:
            return {}, f"secrets.{name}: no value was sent ('{MASK}' is how a value is shown, not a value)"
    extra = sorted(set(kept) - set(spec.secrets))
    if extra:
        return {}, f"secrets: values were sent for {', '.join(extra)}, which the job does not name"
    return kept, None


# ---- on the nodes: output ------------------------------------------------------------------
class Masker:
    """Replaces every secret value in a byte stream with ``***``, also one split across
    chunks: the end of a chunk that could be the start of a value is held back until the
    next chunk (or the end) tells. A multi-line value is masked line by line.
    Not caught: a value printed transformed (base64, quoted with escapes, split by other
    output), values (and lines) shorter than ``MIN_MASKED`` characters, and a value that is
    part of another value where the longer one is printed split across chunks."""

    def __init__(self, secret_values: Iterable[str]):
        needles: set[bytes] = set()
        for v in secret_values:  # a multi-line value (a PEM key) line by line: printed whole or in part
            for part in ([line.strip() for line in v.splitlines()] if "\n" in v else [v]):
                if len(part) >= MIN_MASKED:
                    needles.add(part.encode())
        self.needles = sorted(needles, key=len, reverse=True)  # a longer value first
        self.pending = b""

    def __bool__(self) -> bool:
        return bool(self.needles)

    def feed(self, chunk: bytes) -> bytes:
        """What can be written now of everything fed so far."""
        data = self.pending + chunk
        for n in self.needles:
            if n in data:
                data = data.replace(n, MASK.encode())
        keep = self._held(data)
        self.pending = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep]

    def flush(self) -> bytes:
        out, self.pending = self.pending, b""
        return out

    def _held(self, data: bytes) -> int:
        """The longest end of ``data`` that is the start of a value."""
        best = 0
        for n in self.needles:
            i = data.find(n[:1], max(0, len(data) - len(n) + 1))
            while i != -1 and len(data) - i > best:
                if n.startswith(data[i:]):
                    best = len(data) - i
                    break
                i = data.find(n[:1], i + 1)
        return best
