"""Where raybatch keeps things on this machine, and how a client finds a server.

Resolution order for the server a client talks to (like Ray's RAY_ADDRESS):
``--address`` flag > ``RAYBATCH_ADDRESS`` > the embedded local default under
``RAYBATCH_HOME`` (``~/.raybatch``), started on demand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "RAYBATCH_HOME"
ENV_ADDRESS = "RAYBATCH_ADDRESS"
ENV_TOKEN = "RAYBATCH_TOKEN"

API_PREFIX = "/api/v1"


def home() -> Path:
    """The per-user state directory of the embedded local default."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".raybatch").expanduser().resolve()


def default_cache_dir() -> str:
    """Where each node keeps its caches (inputs, code, environments): ``$RAYBATCH_CACHE_DIR``
    or ``~/.cache/raybatch``."""
    return os.environ.get("RAYBATCH_CACHE_DIR") or str(Path.home() / ".cache" / "raybatch")


MAX_UPLOAD_INPUT_BYTES = 200 * 2**20   # one input uploaded with the job (`mode: upload`), unpacked
ENV_MAX_UPLOAD_INPUT_MB = "RAYBATCH_MAX_UPLOAD_INPUT_MB"


def max_upload_input_bytes() -> int:
    """The most bytes one input uploaded with a job may hold: ``$RAYBATCH_MAX_UPLOAD_INPUT_MB``
    MiB, else 200 MiB. The client checks it before uploading, the server on upload."""
    raw = os.environ.get(ENV_MAX_UPLOAD_INPUT_MB, "").strip()
    if not raw:
        return MAX_UPLOAD_INPUT_BYTES
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_MAX_UPLOAD_INPUT_MB}: '{raw}' is not a number of MiB") from None
    if not mib > 0:
        raise ValueError(f"{ENV_MAX_UPLOAD_INPUT_MB}: must be > 0 (got {raw})")
    return int(mib * 2**20)


@dataclass(frozen=True)
class ServerSettings:
    """The server's tunables, read once from its environment (``RAYBATCH_*``) and handed
    to every attempt's driver in its attempt file: the server's settings win over the
    Ray cluster's environment, where the driver runs."""

    cache_dir: str
    storage_check_s: float = 20.0        # RAYBATCH_STORAGE_CHECK_S: retry transient storage errors this long
    final_sync_timeout_s: float = 300.0  # RAYBATCH_FINAL_SYNC_TIMEOUT_S: the last upload's retries
    placement_timeout_s: float = 120.0   # RAYBATCH_PLACEMENT_TIMEOUT_S: the gang must be placed by then

    @classmethod
    def from_env(cls, cache_dir: str | None = None) -> "ServerSettings":
        def seconds(name: str, default: float) -> float:
            raw = os.environ.get(name)
            try:
                return float(raw) if raw else default
            except ValueError:
                raise SystemExit(f"{name}={raw!r}: expected a number of seconds") from None

        return cls(
            cache_dir=cache_dir or default_cache_dir(),
            storage_check_s=seconds("RAYBATCH_STORAGE_CHECK_S", cls.storage_check_s),
            final_sync_timeout_s=seconds("RAYBATCH_FINAL_SYNC_TIMEOUT_S", cls.final_sync_timeout_s),
            placement_timeout_s=seconds("RAYBATCH_PLACEMENT_TIMEOUT_S", cls.placement_timeout_s),
        )


def ray_client_env() -> None:
    """Make this process a well-behaved client of a raybatch-managed Ray cluster.

    Ray 2.60 turns token authentication on for new local clusters, after which a
    client that does not opt in fails with InvalidAuthToken. raybatch always starts
    its clusters with a token and always talks to Ray in token mode; a token sent
    to a cluster without auth is simply ignored, so this is safe either way.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    # Set the mode before anything imports ray, so its cached config sees it...
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._private.authentication.authentication_token_setup import (  # noqa: PLC0415
        generate_and_save_token,
    )
    from ray._raylet import Config  # noqa: PLC0415

    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        if not (Path.home() / ".ray" / "auth_token").exists():
            generate_and_save_token()
    # ...and refresh it in case ray was imported earlier (what ray.init does itself).
    Config.initialize("")


def ray_http_headers() -> dict[str, str]:
    """Headers for plain HTTP calls to a token-auth Ray dashboard."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
