"""Who is calling: the server's owner token, and API tokens of users and service principals.

Two kinds of credential reach the API as ``Authorization: Bearer <token>``:

- the **owner token** (``<state dir>/token``, made on the first start): the cluster admin.
  The local default has only this one and needs no set-up.
- **API tokens**, made by an admin or a workspace owner (``raybatch admin token create
  --user U --workspace W --role R --expires 30d``), each for one user (or service
  principal), one workspace and one role. The token is shown once; the store keeps only
  its SHA-256 (see :func:`token_hash`), its user, workspace, role, expiry and revocation.

The server loads every live token's hash into memory at start (:class:`TokenRegistry`):
a request costs one hash and one dict lookup, never a SQLite read. Creating and revoking
go through the same registry object that serves the API, so they take effect at once;
expiry is checked on every request.

Roles are ordered: reader < contributor < owner, each per workspace; admin is cluster-wide
(every workspace, policy, nodes)."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from raybatch.state.store import Store

DEFAULT_WORKSPACE = "default"
ALL_WORKSPACES = "*"          # an admin token's workspace: every one
OWNER_USER = "owner"          # the identity of the server's owner token
MIN_TOKEN_CHARS = 32
TOKEN_PREFIX = "rbt_"         # API tokens start so (a leaked one is recognisable in a scan)
WORKSPACE_RE = re.compile(r"[-\w]{1,64}")  # the job file's name pattern (spec/job.py NAME_PATTERN)
USER_RE = re.compile(r"[-\w.@]{1,128}")


class Role(enum.IntEnum):
    """What a role may do; each includes the ones below it."""

    reader = 1       # list, show, logs, files, metrics of the workspace's jobs
    contributor = 2  # + submit, cancel (anyone's job in the workspace), upload code
    owner = 3        # + the workspace's tokens (members) and audit log
    admin = 4        # cluster-wide: every workspace, policy, nodes, metrics, the Ray cluster

    @classmethod
    def parse(cls, text: str) -> "Role":
        try:
            return cls[text.strip().lower()]
        except KeyError:
            raise ValueError(f"role: {text!r} is not one of {', '.join(r.name for r in cls)}") from None


@dataclass(frozen=True)
class Identity:
    """The caller of one request."""

    user: str
    role: Role
    workspace: str               # ALL_WORKSPACES for an admin
    token_id: Optional[str]      # None: the owner token
    expires_at: Optional[float] = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin

    def can(self, role: Role, workspace: str) -> bool:
        """May this identity act with ``role`` in ``workspace``?"""
        return self.is_admin or (workspace == self.workspace and self.role >= role)

    def can_somewhere(self, role: Role) -> bool:
        """Does it hold ``role`` in any workspace (cluster-wide reads, list filtering)?"""
        return self.role >= role

    def readable(self) -> Optional[frozenset[str]]:
        """The workspaces whose jobs it may read: None for all (an admin)."""
        return None if self.is_admin else frozenset((self.workspace,))

    def describe(self) -> str:
        where = "every workspace" if self.is_admin else f"workspace '{self.workspace}'"
        return f"{self.user} ({self.role.name} in {where})"

    def public(self) -> dict[str, Any]:
        return {"user": self.user, "role": self.role.name, "workspace": self.workspace,
                "token_id": self.token_id, "expires_at": self.expires_at}


def token_hash(token: str | bytes) -> str:
    """SHA-256 of a token, hex. A plain fast hash (no salt, no slow KDF) is enough because
    every API token is 32 bytes from ``secrets`` (256 bits): there is no dictionary to try
    and no brute force to slow down, so a stolen store reveals no usable token, while a
    request costs one microsecond-scale hash instead of a KDF's tens of milliseconds. An
    unsalted hash is also what lets the server find a token by its hash in a dict."""
    data = token if isinstance(token, bytes) else token.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def header_bytes(value: str) -> bytes:
    """An HTTP header value as the bytes the client sent (ASGI servers decode latin-1): a
    non-ASCII token compares as bytes (and fails), it never raises."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # not from a header: any str
        return value.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class _Entry:
    identity: Identity
    revoked: bool = False


class TokenRegistry:
    """The owner token and the API tokens' hashes, in memory; writes go to the store first.

    Thread-safe: the API's event loop reads it, route threads create and revoke tokens."""

    def __init__(self, owner_token: str, store: Optional["Store"] = None):
        self._owner = owner_token.encode("utf-8")
        self.owner = Identity(OWNER_USER, Role.admin, ALL_WORKSPACES, None)
        self.store = store
        self._by_hash: dict[str, Identity] = {}
        self._by_id: dict[str, str] = {}   # token id -> hash, for revocation
        self._revoked: dict[str, str] = {}  # hash -> token id: "revoked" rather than "wrong" in the 401
        self._lock = threading.Lock()
        if store is not None:
            for row in store.tokens():
                if row["revoked_at"] is None:
                    self._add(row)
                else:
                    self._revoked[row["token_hash"]] = row["id"]

    def _add(self, row: dict[str, Any]) -> Identity:
        ident = Identity(row["user"], Role[row["role"]], row["workspace"], row["id"], row["expires_at"])
        with self._lock:
            self._by_hash[row["token_hash"]] = ident
            self._by_id[row["id"]] = row["token_hash"]
        return ident

    # ---- the per-request path ------------------------------------------------------
    def authenticate(self, given: bytes, now: Optional[float] = None) -> Optional[Identity]:
        """The identity of a presented token (bytes, as sent), or None: unknown, revoked or
        expired. The owner token is compared in constant time; an API token is found by its
        hash (a lookup time that depends on the hash reveals nothing about any token)."""
        return self.check(given, now)[0]

    def check(self, given: bytes, now: Optional[float] = None) -> tuple[Optional[Identity], str]:
        """(the identity, "") or (None, why not in words, for the 401)."""
        if given and hmac.compare_digest(given, self._owner):
            return self.owner, ""
        if not given.startswith(TOKEN_PREFIX.encode()):
            return None, "wrong bearer token"
        h = token_hash(given)
        ident = self._by_hash.get(h)
        if ident is None:
            revoked = self._revoked.get(h)
            return None, (f"this API token ({revoked}) was revoked; ask an owner of its workspace for a new one"
                          if revoked else "wrong bearer token")
        if ident.expires_at is not None and ident.expires_at <= (now or time.time()):
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ident.expires_at))
            return None, (f"this API token ({ident.token_id}) expired at {when}; ask an owner of its workspace "
                          "for a new one")
        return ident, ""

    def still_valid(self, ident: Identity, now: Optional[float] = None) -> bool:
        """Is this identity (held by a web session) still good: not revoked nor expired?"""
        if ident.token_id is None:
            return True
        with self._lock:
            live = ident.token_id in self._by_id
        return live and (ident.expires_at is None or ident.expires_at > (now or time.time()))

    # ---- administration --------------------------------------------------------------
    def create(self, user: str, workspace: str, role: Role, expires_at: Optional[float],
               created_by: str) -> tuple[str, dict[str, Any]]:
        """A new token: (the token, shown once; its stored row, without the hash)."""
        if not USER_RE.fullmatch(user):
            raise ValueError(f"user: {user!r}: use 1-128 letters, digits, '-', '_', '.', '@'")
        if user == OWNER_USER:  # the owner token's name in the audit log: nobody else's
            raise ValueError(f"user: '{OWNER_USER}' is the server owner token's name; choose another")
        if role is Role.admin:
            workspace = ALL_WORKSPACES
        elif not WORKSPACE_RE.fullmatch(workspace):
            raise ValueError(f"workspace: {workspace!r}: use 1-64 letters, digits, '-' or '_'")
        if expires_at is not None and expires_at <= time.time():
            raise ValueError("expires: the token would be expired already")
        token = new_token()
        assert self.store is not None, "a registry without a store cannot make tokens"
        row = self.store.add_token(token_hash(token), user=user, workspace=workspace, role=role.name,
                                   expires_at=expires_at, created_by=created_by)
        self._add(row)
        return token, public_row(row)

    def revoke(self, token_id: str) -> Optional[dict[str, Any]]:
        """Revoke a token (at once: its hash leaves memory); its row, or None if unknown."""
        assert self.store is not None
        row = self.store.revoke_token(token_id)
        if row is not None:
            with self._lock:
                h = self._by_id.pop(token_id, None)
                if h is not None:
                    self._by_hash.pop(h, None)
                    self._revoked[h] = token_id
        return public_row(row) if row is not None else None


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A token's row as the API shows it: never the hash."""
    return {k: v for k, v in row.items() if k != "token_hash"}
