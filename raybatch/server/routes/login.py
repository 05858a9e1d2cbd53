"""POST /api/v1/login-codes: a one-time code for a browser (raybatch/server/login.py)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from raybatch.server.access import current, forbidden
from raybatch.server.identity import Role
from raybatch.server.login import CODE_TTL_S, is_local_path
from raybatch.server.routes import dashboard


class LoginCodeRequest(BaseModel):
    next: str = Field("/web/", max_length=2000, description="where the browser lands: a path on this server "
                      "(web) or on the Ray dashboard (ray-dashboard)")
    kind: Literal["web", "ray-dashboard"] = "web"


class LoginCode(BaseModel):
    url: str = Field(description="the path to open on this server; it works once")
    expires_in: float


def router(ctx) -> APIRouter:
    r = APIRouter()

    @r.post("/login-codes", response_model=LoginCode)
    async def create_login_code(req: LoginCodeRequest) -> LoginCode:
        if not is_local_path(req.next):
            raise HTTPException(400, f"next: {req.next!r} is not a path on this server (it must start with one '/')")
        who = current()
        if req.kind == dashboard.KIND and who is not None and not who.is_admin:
            # the Ray dashboard shows and stops every workspace's jobs: the cluster admin's
            raise forbidden(who, Role.admin, None, " (a Ray dashboard login)")
        code = ctx.login_codes.issue(req.next, req.kind, who)
        # each kind is redeemed by its own route: the web view's, or server/routes/dashboard.py's
        path = dashboard.LOGIN_PATH if req.kind == dashboard.KIND else "/login"
        return LoginCode(url=f"{path}/{code}", expires_in=CODE_TTL_S)

    return r
