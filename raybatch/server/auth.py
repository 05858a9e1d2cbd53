"""The server's owner token, and reading a bearer token off a request.

The owner token is created on the server's first start, in ``<state dir>/token`` with mode
0600; clients on the same machine read it from there, remote clients get it through
RAYBATCH_TOKEN. It is the cluster admin's credential (raybatch/server/identity.py); users
and service principals get API tokens of their own (``raybatch admin token create``).

What is checked, and why:

- the file is written whole or not at all (a temp file, fsync, then a hard link to the
  final name, which fails if another server wrote it first): a crash or a second server
  starting at the same moment never leaves an empty or half-written token;
- a token shorter than ``MIN_TOKEN_CHARS`` refuses the start: an empty file once meant
  that ``Bearer `` with nothing after it was accepted, i.e. no auth at all;
- tokens are compared as bytes: a header with non-ASCII bytes is a wrong token (401),
  never a 500 from comparing ``str`` with non-ASCII characters."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

from raybatch.server.identity import MIN_TOKEN_CHARS


class TokenFileError(SystemExit):
    """The token file cannot be used: the server does not start (the message says why)."""


def ensure_token(path: Path) -> str:
    """The owner token: read from ``path``, or made there (0600, atomically) on first start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _write_new(path, secrets.token_urlsafe(32))
    try:
        os.chmod(path, 0o600)
        raw = path.read_bytes()
    except OSError as e:
        raise TokenFileError(f"token file {path}: {e}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {path}: the token must be ASCII (printable, no spaces); delete the "
                             "file and restart the server to make a new one") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenFileError(
            f"token file {path}: the token has {len(token)} character(s); at least {MIN_TOKEN_CHARS} printable "
            "ones without spaces are needed (an empty or short token would let anyone in). Delete the file and "
            "restart the server to make a new one, or write a longer token into it")
    return token


def _write_new(path: Path, token: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a token another server wrote meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def bearer(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None
