"""Where raybatch keeps things on this machine, and how a client finds a server.

Resolution order for the server a client talks to (like Ray's RAY_ADDRESS):
``--address`` flag > ``RAYBATCH_ADDRESS`` > the embedded local default under
``RAYBATCH_HOME`` (``~/.raybatch``), started on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "RAYBATCH_HOME"
ENV_ADDRESS = "RAYBATCH_ADDRESS"
ENV_TOKEN = "RAYBATCH_TOKEN"

API_PREFIX = "/api/v1"


def home() -> Path:
    """The per-user state directory of the embedded local default."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".raybatch").expanduser().resolve()


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
