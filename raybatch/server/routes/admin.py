"""Identities and the audit log.

    GET    /api/v1/whoami               the caller: user, role, workspace
    POST   /api/v1/admin/tokens         a new API token (shown once): owner of its workspace, admin for admin tokens
    GET    /api/v1/admin/tokens         tokens (never a token nor its hash): an owner sees its workspace's
    DELETE /api/v1/admin/tokens/{id}    revoke, at once
    GET    /api/v1/audit                state-changing requests, newest first: an owner sees its workspace's

raybatch/server/access.py lets only owners (and admins) in; the routes then check the
workspace the request is about, which only they know (the token's, or the query's)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from raybatch.server.access import current, require
from raybatch.server.identity import DEFAULT_WORKSPACE, Role, public_row

if TYPE_CHECKING:
    from raybatch.server.access import Access, AuditLog
    from raybatch.server.app import ServerContext

MAX_EXPIRY_S = 10 * 365 * 86400.0


class TokenRequest(BaseModel):
    user: str = Field(..., min_length=1, max_length=128, description="The user or service principal it is for.")
    workspace: str = Field(DEFAULT_WORKSPACE, max_length=64, description="Its workspace (ignored for role admin).")
    role: str = Field(..., description="reader | contributor | owner | admin")
    expires_in: Optional[float] = Field(None, gt=0, le=MAX_EXPIRY_S,
                                        description="Seconds it is valid for; none: until revoked.")


class TokenInfo(BaseModel):
    id: str
    user: str
    workspace: str
    role: str
    created_at: float
    created_by: str
    expires_at: Optional[float] = None
    revoked_at: Optional[float] = None
    state: str = Field(description="active | expired | revoked")


class NewToken(TokenInfo):
    token: str = Field(description="The token itself: shown this once, never stored (only its SHA-256).")


class AuditRecord(BaseModel):
    id: int
    at: float
    user: Optional[str] = Field(None, description="None: no valid token.")
    token_id: Optional[str] = Field(None, description="None: the server's owner token (or no token).")
    workspace: Optional[str] = None
    method: str
    path: str
    client: Optional[str] = None
    status: int
    target: Optional[str] = Field(None, description="What the request made, when its path does not say: "
                                  "a submit's job id(s).")


def token_info(row: dict[str, Any], now: Optional[float] = None) -> TokenInfo:
    row = public_row(row)
    state = ("revoked" if row["revoked_at"] is not None
             else "expired" if row["expires_at"] is not None and row["expires_at"] <= (now or time.time())
             else "active")
    return TokenInfo(**row, state=state)


def router(ctx: ServerContext, access: Access, audit: AuditLog) -> APIRouter:
    api = APIRouter()
    registry = access.registry

    @api.get("/whoami")
    def whoami() -> dict[str, Any]:
        who = current()
        assert who is not None  # the access rule let only a valid token in
        return who.public()

    @api.post("/admin/tokens", status_code=201)
    def create_token(req: TokenRequest) -> NewToken:
        try:
            role = Role.parse(req.role)
        except ValueError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        who = require(Role.admin, "*") if role is Role.admin else require(Role.owner, req.workspace)
        expires_at = time.time() + req.expires_in if req.expires_in else None
        try:
            token, row = registry.create(req.user, req.workspace, role, expires_at, created_by=who.user)
        except ValueError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
        return NewToken(**token_info(row).model_dump(), token=token)

    @api.get("/admin/tokens")
    def list_tokens(workspace: Optional[str] = Query(None, max_length=64)) -> list[TokenInfo]:
        who = current()
        assert who is not None
        if not who.is_admin:
            require(Role.owner, workspace or who.workspace)
            workspace = who.workspace
        return [token_info(r) for r in ctx.store.tokens(workspace)]

    @api.delete("/admin/tokens/{token_id}")
    def revoke_token(token_id: str) -> TokenInfo:
        row = ctx.store.get_token(token_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token with id '{token_id}'")
        if row["role"] == Role.admin.name:
            require(Role.admin, "*")
        else:
            require(Role.owner, row["workspace"])
        revoked = registry.revoke(token_id)
        assert revoked is not None
        return token_info(revoked)

    @api.get("/audit")
    def audit_log(workspace: Optional[str] = Query(None, max_length=64),
                  limit: int = Query(200, ge=1, le=10_000),
                  before: Optional[int] = Query(None, ge=1, le=2**63 - 1, description="Only records older than this id.")
                  ) -> list[AuditRecord]:
        who = current()
        assert who is not None
        if not who.is_admin:
            require(Role.owner, workspace or who.workspace)
            workspace = who.workspace
        audit.flush()  # what was just done is in the answer
        return [AuditRecord(**r) for r in ctx.store.audit(workspace, limit, before)]

    return api


def docs_router(app: Any) -> APIRouter:
    """``/openapi.json`` and ``/docs`` (Swagger UI) as ordinary routes, so that the access
    dependency covers them: the API's description is for those who may use it (a bearer
    token, or the web view's session cookie for a browser)."""
    api = APIRouter(include_in_schema=False)

    @api.get("/openapi.json", response_class=JSONResponse)
    def openapi():  # noqa: ANN202 - the schema, as is
        return JSONResponse(app.openapi())

    @api.get("/docs", response_class=HTMLResponse)
    def docs():  # noqa: ANN202
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    return api
