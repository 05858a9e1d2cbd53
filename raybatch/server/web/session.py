"""Browser sessions of the web view: the token is typed once (or a one-time login code is
redeemed), and the browser then holds a random session id in an HttpOnly cookie.

The cookie never carries the token: a cookie can leak (a proxy's log, a shared profile) and
the token is the key to the whole API. Session ids live in this process's memory only, so a
restarted server logs browsers out (they log in again); that is the price of keeping no
session table on disk."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from typing import Optional

from fastapi import Request, Response

from raybatch.server.login import is_local_path

COOKIE = "raybatch_session"
SESSION_TTL_S = 12 * 3600.0   # a working day; then the login form again
MAX_SESSIONS = 10_000         # the oldest go first (a script logging in in a loop cannot grow memory)


class Sessions:
    """Session ids -> expiry, in memory, thread-safe."""

    def __init__(self, token: str, ttl_s: float = SESSION_TTL_S):
        self._token = token
        self.ttl_s = ttl_s
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def token_ok(self, given: str) -> bool:
        """The server's token, compared in constant time."""
        return bool(given) and hmac.compare_digest(given.strip().encode(), self._token.encode())

    def start(self) -> str:
        """A new session id (the caller has checked the token or redeemed a code)."""
        now = time.time()
        sid = secrets.token_urlsafe(32)
        with self._lock:
            for old in [s for s, exp in self._ids.items() if exp <= now]:
                del self._ids[old]
            while len(self._ids) >= MAX_SESSIONS:
                del self._ids[min(self._ids, key=self._ids.__getitem__)]
            self._ids[sid] = now + self.ttl_s
        return sid

    def valid(self, sid: Optional[str]) -> bool:
        if not sid:
            return False
        with self._lock:
            exp = self._ids.get(sid)
            if exp is not None and exp <= time.time():
                del self._ids[sid]
                exp = None
        return exp is not None

    def end(self, sid: Optional[str]) -> None:
        with self._lock:
            self._ids.pop(sid or "", None)

    # ---- the cookie ---------------------------------------------------------------
    def logged_in(self, request: Request) -> bool:
        return self.valid(request.cookies.get(COOKIE))

    def set_cookie(self, response: Response, request: Request, sid: str) -> None:
        """HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it:
        the web view's own requests need no CSRF token), Secure behind https."""
        response.set_cookie(COOKIE, sid, max_age=int(self.ttl_s), path="/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    def clear_cookie(self, response: Response, request: Request) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")


def safe_next(path: Optional[str], default: str = "/web/") -> str:
    """Where to go after logging in: a path on this server (``login.is_local_path``), else
    ``default``."""
    return path if is_local_path(path) else default
