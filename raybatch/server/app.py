"""REST API (FastAPI). Who may call each route (a role in a workspace, or none for /health
and the one-time login codes) is one table, raybatch/server/access.py, applied to every route
by one dependency; state-changing requests go to the audit log (GET /api/v1/audit).

    GET  /api/v1/health                    liveness, no auth
    GET  /api/v1/cluster                   live nodes and their free resources
    GET  /api/v1/scheduler                 cycle timings, policy, reservation, autoscaling demand
    GET  /api/v1/queue                     waiting jobs in order, why they wait, estimated starts
    GET  /api/v1/code/{sha}                is this code package stored?
    PUT  /api/v1/code/{sha}                upload a code package (zip, sha256 of the bytes)
    GET  /api/v1/inputs/{sha}              is this uploaded input stored?
    PUT  /api/v1/inputs/{sha}              upload an input (`mode: upload`: a zip, its own size limit)
    POST /api/v1/jobs                      submit (SubmitRequest) -> JobSummary
    POST /api/v1/jobs/batch                submit up to 1000 jobs at once, all or none
    GET  /api/v1/jobs                      list, newest first (?state=&experiment=&limit=)
    GET  /api/v1/jobs/{id}                 JobDetail: history, attempts, ranks, paths
    POST /api/v1/jobs/{id}/cancel          cancel (SIGTERM, grace, SIGKILL)
    GET  /api/v1/jobs/{id}/logs            a chunk of a rank's stdout/stderr from an offset (?item=, ?trial=)
    GET  /api/v1/jobs/{id}/items           an array job's tasks: pending, running, done, failed, skipped
    GET  /api/v1/jobs/{id}/trials[/{n}]    a sweep's trials, best first
    GET  /api/v1/jobs/{id}/metrics         metric events of a job (?trial= of a sweep's trial)
    GET  /api/v1/jobs/{id}/files           the job's files (?path=): logs, checkpoints, outputs
    GET  /api/v1/jobs/{id}/files/content   one file's bytes (?path=), streamed
    GET  /api/v1/datastores                the server's datastores (never a secret)
    GET  /api/v1/nodes[/status]            the cluster's nodes: state since when, reason, jobs; counts
    GET  /api/v1/cost                      node-hours, idle hours, hours lost to evictions (?by=&since=)
    POST /api/v1/login-codes               a one-time code that logs a browser in (server/login.py)
    GET  /api/v1/ray                       the cluster's Ray address, dashboard, auth mode (`raybatch env`)
    GET  /ray-login/{code}                 no auth, one-time code: logs a browser into the Ray dashboard
    GET  /metrics                          Prometheus metrics, bearer token (server/metrics.py, docs/metrics.md)
    GET  /api/v1/whoami, /admin/tokens, POST /admin/tokens, DELETE /admin/tokens/{id}, GET /audit
                                           identities and the audit log (server/routes/admin.py)
    GET  /openapi.json, /docs              the API's description (a token, or the web view's cookie)

The routes live in raybatch/server/routes/, one module per group of this table:
health, cluster (cluster, scheduler, queue), code, jobs (submit to logs), items, trials (and
metrics), files
(files, content, datastores). Helpers they share are in raybatch/server/common.py.

Files are read where they are stored (a local path or blob storage), with the
server's datastore credentials: clients never need storage keys.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from raybatch import __version__
from raybatch.config import API_PREFIX
from raybatch.scheduler.loop import Scheduler
from raybatch.server.access import Access, AuditLog, AuditMiddleware
from raybatch.server.identity import TokenRegistry
from raybatch.server.routes import admin
from raybatch.server.web.session import Sessions
from raybatch.server.login import LoginCodes
from raybatch.server.limits import BodyLimitMiddleware
from raybatch.server.metrics import LatencyMiddleware, ServerMetrics
from raybatch.server.metrics import router as metrics_router
from raybatch.server.routes import cluster, code, cost, files, health, items, jobs, login, nodes, trials
from raybatch.server.routes import dashboard
from raybatch.server import web
from raybatch.state.store import Store
from raybatch.storage.datastores import Datastores

log = logging.getLogger("raybatch.server")


@dataclass
class ServerContext:
    store: Store
    scheduler: Scheduler
    jobs_root: str              # a path or a blob location
    code_root: Path
    datastores: Any = Datastores  # () -> the current Datastores (re-read when its file changes)
    login_codes: LoginCodes = field(default_factory=LoginCodes)  # one-time browser logins
    tokens: Any = None   # the TokenRegistry (create_app): ray-login rechecks the identity behind a code
    access: Any = None   # the app's Access (create_app): cluster-wide views hide other workspaces' job ids


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A locked or full database (StoreBusy, SQLite's "database is locked", "database or disk
    is full"): 503 with the reason, never a 500; the request changed nothing."""
    log.warning("%s %s: the job store is unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"the job store is unavailable ({exc}); nothing was changed, retry shortly"},
                        status_code=503, headers={"Retry-After": "1"})


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 (``detail``: loc, msg, type per error), made safe to write for any
    request: a value that is not a plain scalar is not echoed back (a 1 MB spec, a structure
    nested too deep to encode), a long one is clipped, and NaN or infinity (Python's JSON
    reads them; JSON cannot write them) is written as text. Encoding them made the refusal
    itself a 500."""
    from fastapi.encoders import jsonable_encoder  # noqa: PLC0415

    detail = []
    for e in exc.errors():  # type: ignore[attr-defined]
        item = {"type": e.get("type"), "loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())],
                "msg": str(e.get("msg", ""))[:2000]}
        value = e.get("input")
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            item["input"] = str(value)
        elif isinstance(value, str):
            item["input"] = value[:1000]
        elif value is None or isinstance(value, (bool, int, float)):
            item["input"] = (value if not isinstance(value, int) or abs(value) < 2**63
                             else f"an integer of {value.bit_length()} bits")
        if e.get("ctx"):
            item["ctx"] = {k: str(v)[:1000] for k, v in e["ctx"].items()}
        detail.append(jsonable_encoder(item))
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(ctx: ServerContext, token: str) -> FastAPI:
    registry = TokenRegistry(token, ctx.store)  # the owner token (admin) and the API tokens' hashes
    access = Access(registry, ctx.store, Sessions(registry))
    audit = AuditLog(ctx.store, retention_days=lambda: ctx.scheduler.policy.audit_retention_days)
    ctx.tokens, ctx.access = registry, access
    app = FastAPI(title="raybatch", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(access)])  # every route: raybatch/server/access.py's rule for it
    app.add_exception_handler(sqlite3.OperationalError, store_unavailable)
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415

    app.add_exception_handler(RequestValidationError, invalid_request)
    auth: list = []  # the app's own dependency (access) covers every route
    app.include_router(health.router(ctx), prefix=API_PREFIX)  # the one route without auth
    for routes in (cluster, code, jobs, items, trials, files, nodes, cost, login):
        app.include_router(routes.router(ctx), prefix=API_PREFIX, dependencies=auth)
    app.include_router(dashboard.router(ctx), prefix=API_PREFIX, dependencies=auth)
    app.include_router(dashboard.login_router(ctx))  # no auth: /ray-login/<code>, the code is the credential
    app.include_router(web.router(ctx, access.sessions))  # /web/, /login/<code>: its session cookie (server/web/)
    app.include_router(admin.router(ctx, access, audit), prefix=API_PREFIX)  # tokens, audit log, whoami
    app.include_router(admin.docs_router(app))  # /openapi.json, /docs: behind access too
    # GET /metrics (bearer token) and every request's latency; main.build starts its tailing thread
    app.state.metrics = ServerMetrics(ctx)
    app.include_router(metrics_router(ctx, app.state.metrics, auth))
    app.add_middleware(LatencyMiddleware, histogram=app.state.metrics.histograms.api)
    app.add_middleware(BodyLimitMiddleware)  # 413 past each route's body limit (server/limits.py)
    app.add_middleware(AuditMiddleware, audit=audit)  # every state-changing request, its status
    access.bind(app.routes)  # every route has a rule, or the app is not built
    app.state.access, app.state.audit = access, audit
    return app
