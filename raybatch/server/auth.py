"""Bearer-token auth. The token is created on the server's first start, in
``<state dir>/token`` with mode 0600; clients on the same machine read it from
there, remote clients get it through RAYBATCH_TOKEN."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from fastapi import Header, HTTPException, status


def ensure_token(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    os.chmod(path, 0o600)
    return path.read_text().strip()


def bearer_dependency(token: str):
    # async: pure CPU, so it runs on the event loop instead of costing every request a
    # trip through the thread pool
    async def check(authorization: str = Header(default="")) -> None:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
