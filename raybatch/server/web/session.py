"""Browser sessions of the web view: the token is typed once (or a one-time login code is
redeemed), and the browser then holds a random session id in an HttpOnly cookie.

The cookie never carries the token: a cookie can leak (a proxy's log, a shared profile) and
the token is the key to the whole API. Session ids live in this process's memory only, so a
restarted server logs browsers out (they log in again); that is the price of keeping no
session table on disk.

A session carries the identity that created it (the token typed, or the one that asked for
the login code): the pages show only what that identity may read, and a session of a token
that is revoked or expires ends with it."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Optional, Union

from fastapi import Request, Response

from raybatch.server.identity import Identity, TokenRegistry, header_bytes
from raybatch.server.login import is_local_path

COOKIE = "raybatch_session"
SESSION_TTL_S = 12 * 3600.0   # a working day; then the login form again
MAX_SESSIONS = 10_000         # the oldest go first (a script logging in in a loop cannot grow memory)


class Sessions:
    """Session ids -> (expiry, identity), in memory, thread-safe. ``registry``: the server's
    tokens (a plain string: a registry of that one owner token)."""

    def __init__(self, registry: Union[TokenRegistry, str], ttl_s: float = SESSION_TTL_S):
        self.registry = TokenRegistry(registry) if isinstance(registry, str) else registry
        self.ttl_s = ttl_s
        self._ids: dict[str, float] = {}
        self._who: dict[str, Optional[Identity]] = {}
        self._lock = threading.Lock()

    def check_token(self, given: str) -> Optional[Identity]:
        """The identity of a typed token (the owner's, or an API token), None if no good."""
        return self.registry.authenticate(header_bytes(given.strip())) if given else None

    def token_ok(self, given: str) -> bool:
        return self.check_token(given) is not None

    def start(self, identity: Optional[Identity] = None) -> str:
        """A new session id for ``identity`` (the caller has checked the token or redeemed a
        code); a session without one is logged out."""
        now = time.time()
        sid = secrets.token_urlsafe(32)
        with self._lock:
            for old in [s for s, exp in self._ids.items() if exp <= now]:
                del self._ids[old]
                self._who.pop(old, None)
            while len(self._ids) >= MAX_SESSIONS:
                oldest = min(self._ids, key=self._ids.__getitem__)
                del self._ids[oldest]
                self._who.pop(oldest, None)
            self._ids[sid] = now + self.ttl_s
            self._who[sid] = identity
        return sid

    def identity(self, request: Request) -> Optional[Identity]:
        """The identity of the browser's session: None when logged out, expired, or its
        token was revoked or expired meanwhile."""
        sid = request.cookies.get(COOKIE)
        if not self.valid(sid):
            return None
        with self._lock:
            ident = self._who.get(sid)  # type: ignore[arg-type]
        return ident if ident is not None and self.registry.still_valid(ident) else None

    def valid(self, sid: Optional[str]) -> bool:
        if not sid:
            return False
        with self._lock:
            exp = self._ids.get(sid)
            if exp is not None and exp <= time.time():
                del self._ids[sid]
                self._who.pop(sid, None)
                exp = None
        return exp is not None

    def end(self, sid: Optional[str]) -> None:
        with self._lock:
            self._ids.pop(sid or "", None)
            self._who.pop(sid or "", None)

    # ---- the cookie ---------------------------------------------------------------
    def logged_in(self, request: Request) -> bool:
        return self.identity(request) is not None

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
