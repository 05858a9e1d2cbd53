"""Code packages: a zip of the job's code directory, stored by the sha256 of its bytes."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import zipfile
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request, status

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
        data = await request.body()
        if len(data) > MAX_CODE_BYTES:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "code package over 500 MiB")
        if hashlib.sha256(data).hexdigest() != sha:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "sha256 of the body does not match the URL")
        zipped = package_zip(ctx.code_root, sha)
        if not zipped.is_file():
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    check_package(zf)
            except zipfile.BadZipFile:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not a zip file") from None
            except CodePackageTooLarge as e:
                raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(e)) from None
            except CodePackageError as e:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
            # kept as sent: the driver ships it to the nodes, which unpack it
            tmp = zipped.with_name(f"{zipped.name}.partial-{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            os.replace(tmp, zipped)
        return {"sha": sha}

    return api
