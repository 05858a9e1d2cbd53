"""The job file's ``secrets:``: environment variables whose values the service keeps
to itself (Batch AI's ``properties.secrets``, "the server will never report values of
these variables back")::

    secrets:
      WANDB_API_KEY: {env: WANDB_API_KEY}          # the submitting machine's environment
      HF_TOKEN: {file: ~/.cache/huggingface/token} # a file of the submitting machine
      DB_PASSWORD: {keyvault: myvault/db-password} # Azure Key Vault, read by the server
      PLAIN: s3cr3t                                # the value itself

Who reads what: ``env`` and ``file`` are read by the client at submit (they name the
submitter's machine, which the server cannot see); ``keyvault`` is read by the server when
an attempt starts, with its own (managed) identity, as Batch AI and Azure ML did with a
workspace's Key Vault: the reference is kept with the job, the value never is.

How a secret is shown: every dump of a ``JobSpec`` (the API, ``-o json``, the stored spec,
the attempt file) writes a value as ``***`` and a Key Vault reference as itself. A spec
read back with ``***`` therefore carries the name only; the server keeps the values
encrypted beside it (``raybatch.runtime.secrets``).

Names are environment variable names the job's processes get; they must not be one of
raybatch's own (the env contract) nor one of the job's ``environment``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, model_validator

MASK = "***"  # what a secret's value is shown as, everywhere
MAX_SECRET_BYTES = 64 * 1024  # one value
MAX_SECRETS_BYTES = 256 * 1024  # all of them: they join the ranks' environment, which Linux caps (ARG_MAX)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# names raybatch sets itself for every rank (DESIGN.md's env contract, the frameworks' variables)
RESERVED_PREFIXES = ("RAYBATCH_", "AZ_BATCHAI_", "OMPI_", "PMIX_", "RAY_", "TUNE_")
RESERVED_NAMES = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
    "MASTER_PORT", "TF_CONFIG", "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS",
    "HOROVOD_CPU_OPERATIONS", "MLFLOW_TRACKING_URI", "PATH", "PYTHONPATH", "PYTHONUNBUFFERED",
})
KEYVAULT_HELP = ("'<vault>/<secret>[/<version>]' or a secret URL "
                 "'https://<vault>.vault.azure.net/secrets/<secret>[/<version>]'")


class SecretRef(BaseModel):
    """Where a secret's value is read: exactly one of ``env``, ``file``, ``keyvault``."""

    model_config = ConfigDict(extra="forbid")

    env: Optional[str] = None
    file: Optional[str] = None
    keyvault: Optional[str] = None

    @model_validator(mode="after")
    def _one(self) -> "SecretRef":
        given = [k for k in ("env", "file", "keyvault") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a secret reference is one of {env: NAME}, {file: PATH} or "
                             f"{{keyvault: {KEYVAULT_HELP}}} (got {', '.join(given) or 'none'})")
        if self.env is not None and not _NAME.fullmatch(self.env):
            raise ValueError(f"env: '{self.env}' is not an environment variable name")
        if self.keyvault is not None:
            parse_keyvault(self.keyvault)
        return self

    def shown(self) -> dict[str, str]:
        return self.model_dump(exclude_none=True)


SecretValue = Union[SecretStr, SecretRef]


VAULT_DOMAINS = (".vault.azure.net", ".vault.azure.cn", ".vault.usgovcloudapi.net", ".vault.microsoftazure.de")


def vault_name(ref: str) -> str:
    """The vault's name of a reference ('myvault' of 'myvault/secret' or its URL)."""
    return urlparse(parse_keyvault(ref)[0]).netloc.split(".")[0].lower()


def parse_keyvault(ref: str) -> tuple[str, str, Optional[str]]:
    """(vault URL, secret name, version or None) of a Key Vault reference; ValueError
    naming the accepted forms."""
    ref = str(ref).strip()
    if "://" in ref:
        u = urlparse(ref)
        parts = [p for p in u.path.split("/") if p]
        if u.scheme != "https" or not u.netloc or len(parts) not in (2, 3) or parts[0] != "secrets":
            raise ValueError(f"keyvault: '{ref}' is not a Key Vault secret URL; use {KEYVAULT_HELP}")
        host = u.netloc.lower()
        # the server calls this host with its own identity: Key Vault's, nothing else
        if u.username or u.password or u.port or not host.endswith(VAULT_DOMAINS) \
                or not re.fullmatch(r"[a-z0-9-]{3,24}", host.split(".")[0]):
            raise ValueError(f"keyvault: '{ref}' is not a Key Vault host (<vault>{', <vault>'.join(VAULT_DOMAINS)})")
        return f"https://{u.netloc}", parts[1], parts[2] if len(parts) == 3 else None
    parts = ref.split("/")
    if len(parts) not in (2, 3) or not all(parts) or not re.fullmatch(r"[A-Za-z0-9-]{3,24}", parts[0]):
        raise ValueError(f"keyvault: '{ref}': use {KEYVAULT_HELP}")
    return f"https://{parts[0]}.vault.azure.net", parts[1], parts[2] if len(parts) == 3 else None


def normalize(v: Any) -> Any:
    """The job file's forms of ``secrets``: a mapping name -> value or reference, or
    Batch AI's list of ``{name, value}``. Values become strings; references stay."""
    if isinstance(v, list):
        try:
            v = {item["name"]: item["value"] for item in v}
        except (TypeError, KeyError):
            raise ValueError("a list of secrets must hold {name, value} items") from None
    if not isinstance(v, dict):
        return v
    out: dict[str, Any] = {}
    for name, value in v.items():
        if value is None or isinstance(value, list):
            raise ValueError(f"'{name}': a secret is a value, or one of {{env: NAME}}, {{file: PATH}}, "
                             "{keyvault: VAULT/SECRET}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        if isinstance(value, dict):  # a reference, checked here for a plain error (not a union's)
            try:
                value = SecretRef.model_validate(value)
            except ValidationError as e:
                raise ValueError(f"'{name}': " + "; ".join(
                    ".".join(str(p) for p in err["loc"]) + ": " * bool(err["loc"]) + err["msg"].removeprefix(
                        "Value error, ") for err in e.errors())) from None
        if isinstance(value, str) and len(value.encode()) > MAX_SECRET_BYTES:
            raise ValueError(f"'{name}': the value is over {MAX_SECRET_BYTES // 1024} KiB")
        out[str(name)] = value
    return out


def check_names(secrets: Mapping[str, Any], environment: Mapping[str, str]) -> None:
    """Every name a variable the job's processes can get, none of raybatch's own and none
    the job's ``environment`` sets too (which one would win?)."""
    for name in secrets:
        if not _NAME.fullmatch(name):
            raise ValueError(f"secrets: '{name}' is not a valid environment variable name "
                             "(letters, digits and '_', not starting with a digit)")
        if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
            raise ValueError(f"secrets: '{name}' is a variable raybatch sets for every rank (names starting with "
                             f"{', '.join(RESERVED_PREFIXES)} and {', '.join(sorted(RESERVED_NAMES))} are its own)")
        if name in environment:
            raise ValueError(f"secrets: '{name}' is also in environment: give it in one of them")
    total = sum(len(k) + len(v.get_secret_value().encode()) + 2 for k, v in secrets.items() if isinstance(v, SecretStr))
    if total > MAX_SECRETS_BYTES:
        raise ValueError(f"secrets: {total} bytes in all; at most {MAX_SECRETS_BYTES // 1024} KiB (they join every "
                         "rank's environment, which Linux limits)")


def shown(secrets: Mapping[str, SecretValue]) -> dict[str, Any]:
    """``secrets`` as every dump shows it: values as ``***``, Key Vault references as they are."""
    return {k: v.shown() if isinstance(v, SecretRef) else MASK for k, v in secrets.items()}


def values(secrets: Mapping[str, SecretValue]) -> dict[str, str]:
    """The values the spec itself carries (not ``***``, not a reference)."""
    return {k: v.get_secret_value() for k, v in secrets.items()
            if isinstance(v, SecretStr) and v.get_secret_value() != MASK}


def resolve_local(secrets: Mapping[str, SecretValue], base_dir: Optional[Path] = None,
                  environ: Optional[Mapping[str, str]] = None) -> dict[str, SecretValue]:
    """The client's part, at submit: ``{env:}`` and ``{file:}`` read here (a relative file
    is relative to ``base_dir``, the job file's directory); values and Key Vault
    references stay as they are. ValueError naming the secret and what is wrong."""
    environ = os.environ if environ is None else environ
    out: dict[str, SecretValue] = {}
    for name, v in secrets.items():
        if isinstance(v, SecretRef) and v.env is not None:
            if v.env not in environ:
                raise ValueError(f"secrets.{name}: {{env: {v.env}}}: {v.env} is not set in the environment "
                                 "of this submit")
            out[name] = SecretStr(environ[v.env])
        elif isinstance(v, SecretRef) and v.file is not None:
            path = Path(v.file).expanduser()
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_SECRET_BYTES + 1)
            except OSError as e:
                raise ValueError(f"secrets.{name}: {{file: {v.file}}}: {e.strerror or e}") from None
            if len(data) > MAX_SECRET_BYTES:
                raise ValueError(f"secrets.{name}: {{file: {v.file}}} is over {MAX_SECRET_BYTES // 1024} KiB")
            try:  # one trailing newline is the file's, not the secret's (`echo > file`)
                text = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError:
                raise ValueError(f"secrets.{name}: {{file: {v.file}}} is not UTF-8 text") from None
            out[name] = SecretStr(text)
        else:
            out[name] = v
    return out
