"""Code packages: a zip of the job's code directory, stored by the sha256 of its bytes;
and, beside them in the same store, the inputs a job uploads (``mode: upload``: Azure
ML's local inputs), each a zip with its own size limit."""

from __future__ import annotations

import hashlib
import io
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
        return _keep(ctx.code_root, sha, await request.body(), MAX_CODE_BYTES, "code package")

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
        return _keep(ctx.code_root, sha, await request.body(), limit, "uploaded input")

    return api


def _keep(root: Path, sha: str, data: bytes, limit: int, what: str) -> dict[str, Any]:
    """Check a zip (its sha256, safe names, at most ``limit`` bytes unpacked) and keep it
    as sent, ``<root>/<sha>.zip``: the driver ships it to the nodes, which unpack it."""
    mib = f"{limit / 2**20:.4g} MiB"
    if len(data) > limit:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"{what} over {mib}")
    if hashlib.sha256(data).hexdigest() != sha:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "sha256 of the body does not match the URL")
    zipped = package_zip(root, sha)
    if not zipped.is_file():
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                check_package(zf, limit)
        except zipfile.BadZipFile:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not a zip file") from None
        except CodePackageTooLarge:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                f"{what} unpacks to more than {mib}") from None
        except CodePackageError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        tmp = zipped.with_name(f"{zipped.name}.partial-{secrets.token_hex(4)}")
        tmp.write_bytes(data)
        os.replace(tmp, zipped)
    return {"sha": sha}
