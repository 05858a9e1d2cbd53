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

from raybatch.config import max_upload_input_bytes
from raybatch.runtime.code import (
    MAX_CODE_BYTES, CodePackageError, CodePackageTooLarge, check_package, has_package, package_zip,
)

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/code/{sha}")
    def code_exists(sha: str) -> dict[str, Any]:
        if not has_package(ctx.code_root, sha):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such code package")
        return {"sha": sha}

    @api.put("/code/{sha}", status_code=201)
    async def code_upload(sha: str, request: Request) -> dict[str, Any]:
        return await _receive(ctx.code_root, sha, request, MAX_CODE_BYTES, "code package")

    @api.get("/inputs/{sha}")
    def input_exists(sha: str) -> dict[str, Any]:
        if not has_package(ctx.code_root, sha):
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
        return await _receive(ctx.code_root, sha, request, limit, "uploaded input")

    return api


async def _receive(root: Path, sha: str, request: Request, limit: int, what: str) -> dict[str, Any]:
    """Stream the body to a temporary file beside the store, never more than ``limit``
    bytes (a larger Content-Length is refused before a byte is read), then ``_keep`` it."""
    mib = f"{limit / 2**20:.4g} MiB"
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Content-Length is not a number") from None
    if declared > limit:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"{what} over {mib}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".upload-{secrets.token_hex(8)}.partial"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"{what} over {mib}")
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "sha256 of the body does not match the URL")
        return _keep(root, sha, tmp, limit, what)
    finally:
        tmp.unlink(missing_ok=True)


def _keep(root: Path, sha: str, received: Path, limit: int, what: str) -> dict[str, Any]:
    """Check a received zip (safe names, at most ``limit`` bytes unpacked) and keep it as
    sent, ``<root>/<sha>.zip``: the driver ships it to the nodes, which unpack it."""
    mib = f"{limit / 2**20:.4g} MiB"
    zipped = package_zip(root, sha)
    if not zipped.is_file():
        try:
            with zipfile.ZipFile(received) as zf:
                check_package(zf, limit)
        except zipfile.BadZipFile:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not a zip file") from None
        except CodePackageTooLarge:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                f"{what} unpacks to more than {mib}") from None
        except CodePackageError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        os.replace(received, zipped)
    return {"sha": sha}
