"""One-time login codes: how a browser gets in without the token ever being printed.

A client that holds the token (the CLI: ``raybatch web --open``, ``raybatch dashboard
--open``) asks the server for a code bound to where the browser should land; the URL it
opens carries only that code. The code works once, for ``CODE_TTL_S`` seconds, and is kept
in the server's memory only (a restarted server forgets unredeemed codes: ask again).

    POST /api/v1/login-codes {"next": "/web/jobs/rb-…"}  (bearer token) -> {"url": "/login/<code>", "expires_in": 60}
    GET  /login/<code>   the web view's route: sets its cookie and redirects to ``next``

Redeeming is the business of the route that serves the code's kind of destination (the
web view's cookie, the Ray dashboard's own login)."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

CODE_TTL_S = 60.0
MAX_OUTSTANDING = 1000  # codes not yet redeemed nor expired; the oldest go first


def is_local_path(path: Optional[str]) -> bool:
    """A path on this server, never another site: ``//evil`` and ``/\\evil`` are other
    sites to a browser. Where a login may send the browser."""
    return bool(path) and path.startswith("/") and not path.startswith("//") and "\\" not in path


@dataclass(frozen=True)
class Grant:
    next: str      # where the browser goes once logged in
    kind: str      # "web" (the web view's cookie) or "ray-dashboard"
    expires: float
    who: Any = None  # the identity that asked for it (server/identity.py): the session's


class LoginCodes:
    """Single-use codes -> grants, in memory, thread-safe."""

    def __init__(self, ttl_s: float = CODE_TTL_S):
        self.ttl_s = ttl_s
        self._codes: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def issue(self, next: str, kind: str = "web", who: Any = None) -> str:
        now = time.time()
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(now)
            while len(self._codes) >= MAX_OUTSTANDING:
                del self._codes[min(self._codes, key=lambda c: self._codes[c].expires)]
            self._codes[code] = Grant(next, kind, now + self.ttl_s, who)
        return code

    def peek(self, code: str, kind: Optional[str] = None) -> bool:
        """Whether the code would redeem now (it is not spent by asking)."""
        with self._lock:
            grant = self._codes.get(code)
        return grant is not None and (kind is None or grant.kind == kind) and grant.expires > time.time()

    def redeem(self, code: str, kind: Optional[str] = None) -> Optional[Grant]:
        """The code's grant, once; None when it is unknown, used, expired or of another kind."""
        with self._lock:
            grant = self._codes.get(code)
            if grant is None or (kind is not None and grant.kind != kind):
                return None
            del self._codes[code]
        return grant if grant.expires > time.time() else None

    def _expire(self, now: float) -> None:
        for code in [c for c, g in self._codes.items() if g.expires <= now]:
            del self._codes[code]
