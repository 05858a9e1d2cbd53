"""The Ray dashboard as users meet it: where it is, and a browser logged into it.

    GET /api/v1/ray          (bearer token) the cluster's Ray address, dashboard URL, auth mode and
                             where the server's Ray token file is (never the token): `raybatch env`
    GET /ray-login/<code>    (no bearer: the one-time code is the credential) logs the browser into
                             the Ray dashboard and redirects to the code's page on it

How the login works, from Ray 2.60's dashboard (``ray/dashboard/http_server_head.py``):
``POST /api/authenticate`` takes the token only in an ``Authorization: Bearer`` header (a form
post cannot send one, and a cross-origin ``fetch`` with that header needs CORS, which the
dashboard does not answer), and answers with the cookie ``ray-authentication-token`` (host-only,
``Path=/``, ``HttpOnly``, ``SameSite=Strict``), which its auth middleware accepts in place of the
header. Cookies are per host name, not per port (RFC 6265 §8.5), and ``SameSite`` compares sites,
not ports. So this route, reached by the browser on the same host name as the dashboard (the
local default: both on 127.0.0.1), makes that call itself with the cluster's token and relays
Ray's own ``Set-Cookie`` to the browser before redirecting it to the dashboard: the browser then
holds exactly the cookie Ray's token dialog would have set, and the token is never in a URL, a
page or the terminal. A browser that reaches this server by another host name than the dashboard
is told so (with the same link on the dashboard's host name) and its code is not spent.

With token auth disabled on the cluster, the route just redirects. The code works once, for
``raybatch.server.login.CODE_TTL_S`` seconds (``POST /api/v1/login-codes`` with ``kind:
ray-dashboard``, which the CLI's ``raybatch dashboard`` makes)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import quote, urlsplit

import httpx
from fastapi import APIRouter, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

KIND = "ray-dashboard"  # the login codes this module redeems
LOGIN_PATH = "/ray-login"
DASHBOARD_TIMEOUT_S = 5.0


def job_page_path(submission_id: str) -> str:
    """The path (with its hash route) of a Ray job's page in Ray 2.60's dashboard, whose
    client routes ``#/jobs/:id`` by job id or submission id."""
    return "/#/jobs/" + quote(submission_id, safe="")


def job_page(dashboard_url: Optional[str], submission_id: str) -> Optional[str]:
    """The full URL of a Ray job's page, or None without a dashboard."""
    if not dashboard_url:
        return None
    return dashboard_url.rstrip("/") + job_page_path(submission_id)


def ray_token_path() -> Optional[str]:
    """The file this process's Ray token comes from, as Ray itself looks for it: None when
    ``RAY_AUTH_TOKEN`` holds it, or when there is no such file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return str(path.resolve()) if path.is_file() else None


def ray_of(ctx: Any) -> tuple[Optional[str], Optional[str]]:
    """(GCS address, dashboard URL) of the cluster this server runs jobs on: the ones its
    launcher submits to (``python -m raybatch.server --ray-address --dashboard-url``)."""
    launcher = getattr(ctx.scheduler, "launcher", None)
    return getattr(launcher, "ray_address", None), getattr(launcher, "dashboard_url", None)


class RayInfo(BaseModel):
    """What a user's own Ray driver, or a browser, needs to reach the cluster's Ray."""

    ray_address: Optional[str] = Field(description="The GCS address (RAY_ADDRESS for ray.init).")
    dashboard_url: Optional[str] = Field(description="Ray's dashboard, as the server reaches it.")
    auth_mode: Literal["token", "disabled", "unknown"] = Field(
        description="The dashboard's token authentication (unknown: it did not answer).")
    token_path: Optional[str] = Field(
        None, description="The server's Ray token file (a path on the server's machine; never the token).")


async def auth_mode(dashboard_url: str) -> str:
    """The dashboard's own answer (``GET /api/authentication_mode``, a public route)."""
    try:
        async with httpx.AsyncClient(timeout=DASHBOARD_TIMEOUT_S) as http:
            r = await http.get(dashboard_url.rstrip("/") + "/api/authentication_mode")
        mode = r.json().get("authentication_mode") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        mode = None
    return mode if mode in ("token", "disabled") else "unknown"


def _page(code: int, title: str, text: str, link: Optional[str] = None) -> HTMLResponse:
    body = f"<p>{html.escape(text)}</p>"
    if link:
        body += f'<p><a href="{html.escape(link)}">{html.escape(link)}</a></p>'
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>",
        status_code=code, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def router(ctx: Any) -> APIRouter:
    """The authenticated part (mounted under /api/v1 with the bearer dependency)."""
    r = APIRouter()

    @r.get("/ray", response_model=RayInfo)
    async def ray_info() -> RayInfo:
        address, dashboard = ray_of(ctx)  # without a dashboard, `raybatch env` still has the address
        return RayInfo(ray_address=address, dashboard_url=dashboard,
                       auth_mode=await auth_mode(dashboard) if dashboard else "unknown", token_path=ray_token_path())

    return r


def _expired() -> HTMLResponse:
    return _page(404, "This login link has expired",
                 "Login links work once, for a minute. Run `raybatch dashboard` again for a new one.")


def login_router(ctx: Any) -> APIRouter:
    """The browser's part: mounted WITHOUT the bearer dependency (the browser has no token;
    the single-use code is its credential)."""
    r = APIRouter()

    @r.get(LOGIN_PATH + "/{code}", include_in_schema=False)
    async def ray_login(code: str, request: Request) -> Response:
        _, dashboard = ray_of(ctx)
        if not dashboard:
            return _page(503, "No Ray dashboard", "This raybatch server was started without a Ray dashboard URL.")
        dash_host = (urlsplit(dashboard).hostname or "").lower()
        here = (request.url.hostname or "").lower()
        if here != dash_host:  # checked before redeeming: the code stays good for the right link
            same_link = str(request.url.replace(hostname=dash_host))
            return _page(409, "Open this link on the dashboard's host name",
                         f"The browser reached raybatch as '{here}' but the Ray dashboard is at {dashboard}: "
                         "a login cookie only carries between ports of one host name. The same link on the "
                         "dashboard's host name (it works once):", same_link)
        if not ctx.login_codes.peek(code, KIND):
            return _expired()
        mode = await auth_mode(dashboard)
        cookies: list[str] = []
        if mode != "disabled":
            from raybatch.config import ray_http_headers  # noqa: PLC0415

            headers = ray_http_headers()
            if not headers:
                return _page(503, "No Ray token", "Token authentication is on for this Ray cluster, but the raybatch "
                             "server has no Ray token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).")
            try:
                async with httpx.AsyncClient(timeout=DASHBOARD_TIMEOUT_S) as http:
                    answer = await http.post(dashboard.rstrip("/") + "/api/authenticate", headers=headers)
            except httpx.HTTPError as e:
                return _page(502, "The Ray dashboard did not answer", f"{dashboard}: {type(e).__name__}")
            cookies = answer.headers.get_list("set-cookie")
            if answer.status_code != 200 or not cookies:
                return _page(502, "The Ray dashboard refused the login",
                             f"{dashboard}/api/authenticate answered {answer.status_code}"
                             + (": the raybatch server's Ray token is not this cluster's" if answer.status_code == 403
                                else ""))
        # spent only now: a dashboard that was down or refused leaves the link good for a retry
        grant = ctx.login_codes.redeem(code, KIND)
        tokens = ctx.tokens
        if grant is None or (grant.who is not None and tokens is not None and not tokens.still_valid(grant.who)):
            return _expired()  # also when the token that asked for it was revoked or expired since
        target = dashboard.rstrip("/") + grant.next
        response = RedirectResponse(target, status.HTTP_303_SEE_OTHER,
                                    headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        for cookie in cookies:  # Ray's own cookie, attributes and all: host-only, so it lands on this host
            response.headers.append("set-cookie", cookie)
        return response

    return r
