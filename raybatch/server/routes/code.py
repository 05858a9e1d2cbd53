"""Code packages: a zip of the job's code directory, stored by the sha256 of its bytes;
and, beside them in the same store, the inputs a job uploads (``mode: upload``: Azure
ML's local inputs), each a zip with its own size limit."""

from __future__ import annotations

import hashlib
import os
import secrets
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from raybatch.config import max_upload_input_bytes
from raybatch.runtime.code import (
    MAX_CODE_BYTES, CodePackageError, CodePackageTooLarge, check_package, has_package, is_sha256, open_package,
    package_zip,
)

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def checked_sha(sha: str) -> str:
    """A package is named by its sha256 only (64 lowercase hex digits): 400 otherwise,
    before the name gets near a path."""
    if not is_sha256(sha):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"{sha[:80]!r} is not a sha256 (64 lowercase hex digits): packages are named by it")
    return sha


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/code/{sha}")
    def code_exists(sha: str) -> dict[str, Any]:
        if not has_package(ctx.code_root, checked_sha(sha)):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such code package")
        return {"sha": sha}

    @api.put("/code/{sha}", status_code=201)
    async def code_upload(sha: str, request: Request) -> dict[str, Any]:
        return await _receive(ctx.code_root, checked_sha(sha), request, MAX_CODE_BYTES, "code package")

    @api.get("/inputs/{sha}")
    def input_exists(sha: str) -> dict[str, Any]:
        if not has_package(ctx.code_root, checked_sha(sha)):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such uploaded input")
        return {"sha": sha}

    @api.put("/inputs/{sha}", status_code=201)
    async def input_upload(sha: str, request: Request) -> dict[str, Any]:
        """A file or folder uploaded with a job (zipped by the client), at most
        ``max_upload_input_bytes()`` unpacked."""
        try:
            limit = max_upload_input_bytes()
        except ValueError as e:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, f"the server's {e}") from None
        return await _receive(ctx.code_root, checked_sha(sha), request, limit, "uploaded input")

    return api


async def _receive(root: Path, sha: str, request: Request, limit: int, what: str) -> dict[str, Any]:
    """Stream the body to a temporary file beside the store, never more than ``limit``
    bytes (a larger Content-Length is refused before a byte is read), then ``_keep`` it
    (in a worker thread)."""
    mib = f"{limit / 2**20:.4g} MiB"
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Content-Length is not a number") from None
    if declared > limit:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                            f"{what} of {declared} bytes is over the limit of {mib}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".upload-{secrets.token_hex(8)}.partial"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # stop reading at the limit (a body without Content-Length)
                    raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                        f"{what} is over the limit of {mib}")
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "sha256 of the body does not match the URL")
        # the zip checks read the file (up to MAX_ZIP_ENTRIES headers, and the sizes):
        # in a worker thread, so a big upload never holds up the server's event loop
        return await run_in_threadpool(_keep, root, sha, tmp, limit, what)
    finally:
        tmp.unlink(missing_ok=True)


def _keep(root: Path, sha: str, received: Path, limit: int, what: str) -> dict[str, Any]:
    """Check a received zip (safe names, at most ``limit`` bytes unpacked) and keep it as
    sent, ``<root>/<sha>.zip``: the driver ships it to the nodes, which unpack it."""
    mib = f"{limit / 2**20:.4g} MiB"
    zipped = package_zip(root, sha)
    if not zipped.is_file():
        try:
            with open_package(received) as zf:
                check_package(zf, limit)
        except zipfile.BadZipFile:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not a zip file") from None
        except CodePackageTooLarge as e:
            detail = f"{what}: {e}" if "entries" in str(e) else f"{what} unpacks to more than {mib}"
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, detail) from None
        except CodePackageError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        os.replace(received, zipped)
    return {"sha": sha}
