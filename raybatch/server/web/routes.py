"""The web view's routes: server-rendered pages behind a session cookie (session.py).

    GET  /web/                         the queue in order: why each job waits, when it starts by
    GET  /web/jobs                     every job, newest first (?state= &experiment= &q= &before=)
    GET  /web/jobs/{id}                history, attempts, ranks, live logs, files, metrics
    GET  /web/jobs/{id}/trials         a sweep's trials, ranked and plotted
    GET  /web/jobs/{id}/items          an array job's tasks and progress (?state= &page=)
    GET  /web/jobs/{id}/logs           a chunk of a rank's log, JSON (the job page's script polls it)
    GET  /web/jobs/{id}/files/content  one file, as a download
    GET  /web/login, POST /web/login   the token typed once -> the cookie
    GET  /login/{code}                 a one-time code (`raybatch web`) -> the cookie
    POST /web/logout

Nothing here accepts the bearer token and nothing under /api/v1 accepts the cookie: the
cookie is SameSite=Strict and these routes only read, so they need no CSRF token, while the
API (which writes) stays bearer-only.

A session carries the identity that logged it in: raybatch/server/access.py's rules (one
per route here too) refuse a job page of a workspace that identity cannot read (403), and
the lists show only its workspaces' jobs."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from raybatch.models import LogChunk
from raybatch.server.access import current, visible_workspaces
from raybatch.server.common import job_or_404
from raybatch.server.identity import Role
from raybatch.server.routes import cluster, files, items, jobs, trials
from raybatch.server.routes.cluster import ESTIMATED_JOBS
from raybatch.server.routes.jobs import MAX_LOG_OFFSET
from raybatch.server.web.data import JobList, endpoint, failing_ranks, metric_series
from raybatch.server.web.session import COOKIE, Sessions, safe_next
from raybatch.state.states import JobState
from raybatch.sweep.plot import metric_chart, parallel_coordinates

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

QUEUE_PAGE = 100
JOBS_PAGE = 50
ITEMS_PAGE = 200
LOG_RANKS = 16        # a job page follows the logs of its first 16 ranks (the rest: `raybatch logs`)
LOG_CHUNK = 256 << 10
FILES_SHOWN = 500
TRIALS_PLOTTED = 20   # the metric chart draws the best 20 trials (one metrics read each)
STATIC = ("web.css", "logs.js")
# no inline script or style anywhere: what a job's name or log says can never run
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _ts(t: Optional[float]) -> str:
    """Any float: a time past the calendar (a deadline 1e22 s away, an estimate from a job
    stored before durations were bounded) is shown as a number, never a 500 for the page."""
    if not t:
        return ""
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{t:.6g} (epoch s)"


def _dur(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return ""
    s = max(0, int(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _resources(per_node: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in per_node.items())


def environment() -> Environment:
    env = Environment(loader=PackageLoader("raybatch.server.web", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters.update(ts=_ts, dur=_dur, size=_size, resources=_resources)
    env.globals.update(now=time.time, quote=quote)
    return env


def router(ctx: ServerContext, sessions: "Sessions | str") -> APIRouter:
    """The pages; ``sessions``: the app's (raybatch/server/access.py finds the caller in
    them), or the server's token for a web view of its own."""
    r = APIRouter(include_in_schema=False)
    env = environment()
    sessions = sessions if isinstance(sessions, Sessions) else Sessions(sessions)
    job_list = JobList(ctx.store)
    static = {name: resources.files("raybatch.server.web").joinpath("static", name).read_bytes() for name in STATIC}
    queue_of = endpoint(cluster, ctx, "/queue")
    logs_of = endpoint(jobs, ctx, "/jobs/{job_id}/logs")
    files_of = endpoint(files, ctx, "/jobs/{job_id}/files")
    content_of = endpoint(files, ctx, "/jobs/{job_id}/files/content")
    metrics_of = endpoint(trials, ctx, "/jobs/{job_id}/metrics")
    trials_of = endpoint(trials, ctx, "/jobs/{job_id}/trials")
    items_of = endpoint(items, ctx, "/jobs/{job_id}/items")

    def page(name: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = env.get_template(name).render(**values)
        return HTMLResponse(html, status, headers={
            "Content-Security-Policy": CSP, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"})

    def message(status: int, title: str, text: str, logged_in: bool = True) -> HTMLResponse:
        return page("message.html", status, title=title, text=text, logged_in=logged_in)

    def to_login(request: Request) -> Optional[Response]:
        """None when the browser is logged in; else the login form, as a 401 (no session, no
        page: nothing of the page is sent), which brings the browser back here once in."""
        if sessions.logged_in(request):
            return None
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return page("login.html", 401, next=safe_next(here), error=None, logged_in=False)

    def job_for_page(job_id: str) -> dict[str, Any]:
        return job_or_404(ctx.store, job_id)

    def readable(job: dict[str, Any]) -> bool:
        ident = current()
        return ident is None or ident.can(Role.reader, job.get("workspace") or "default")

    # ---- logging in and out ---------------------------------------------------------
    @r.get("/web/login")
    def login_form(request: Request, next: str = "/web/") -> HTMLResponse:
        return page("login.html", next=safe_next(next), error=None, logged_in=False)

    @r.post("/web/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        given, nxt = (form.get("token") or [""])[0], safe_next((form.get("next") or [""])[0])
        who = sessions.check_token(given)
        if who is None:
            return page("login.html", 401, next=nxt, logged_in=False,
                        error="Wrong token (or an expired or revoked one). The server's own is in its state directory "
                              "(`token`); yours is in RAYBATCH_TOKEN where you run the CLI.")
        request.state.identity = who  # the audit log's "who" of this login
        resp = RedirectResponse(nxt, 303)
        sessions.set_cookie(resp, request, sessions.start(who))
        return resp

    @r.get("/login/{code}")
    def login_with_code(request: Request, code: str) -> Response:
        grant = ctx.login_codes.redeem(code, "web")
        if grant is None:
            return message(401, "This login link does not work",
                           "It was used already, it expired (a link works once, for a minute) or the server "
                           "restarted. Run `raybatch web` again for a new one, or log in with the token.",
                           logged_in=False)
        who = getattr(grant, "who", None)  # the identity that asked for the code
        if who is None or not sessions.registry.still_valid(who):
            return message(401, "This login link does not work", "The token that asked for it was revoked or "
                           "expired. Log in with a valid token.", logged_in=False)
        resp = RedirectResponse(safe_next(grant.next), 303)
        resp.headers["Referrer-Policy"] = "no-referrer"
        sessions.set_cookie(resp, request, sessions.start(who))
        return resp

    @r.post("/web/logout")  # a POST: a link on another site cannot log the user out
    def logout(request: Request) -> Response:
        sessions.end(request.cookies.get(COOKIE))
        resp = RedirectResponse("/web/login", 303)
        sessions.clear_cookie(resp, request)
        return resp

    @r.get("/web/static/{name}")
    def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, f"no static file {name!r}")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(static[name], media_type=kind, headers={"Cache-Control": "max-age=3600",
                                                                 "X-Content-Type-Options": "nosniff"})

    @r.get("/web")
    def web_root() -> Response:
        return RedirectResponse("/web/", 307)

    # ---- the queue and the job list --------------------------------------------------
    @r.get("/web/")
    def queue_page(request: Request, page_n: int = Query(1, alias="page", ge=1)) -> Response:
        if (go := to_login(request)) is not None:
            return go
        start = (page_n - 1) * QUEUE_PAGE
        entries = queue_of(limit=start + QUEUE_PAGE + 1, estimate=True)
        shown = entries[start:start + QUEUE_PAGE]
        return page("queue.html", entries=shown, page=page_n, more=len(entries) > start + QUEUE_PAGE,
                    estimated_jobs=ESTIMATED_JOBS, counts=job_list.counts(workspaces=visible_workspaces()),
                    running=[j for j in ctx.store.active_jobs() if readable(j)])

    @r.get("/web/jobs")
    def jobs_page(request: Request, state: str = "", experiment: str = "", q: str = "",
                  before: Optional[int] = Query(None, ge=0)) -> Response:
        if (go := to_login(request)) is not None:
            return go
        states = [s.value for s in JobState]
        if state and state not in states:
            return message(400, "Unknown state", f"state: {state!r} is not one of {', '.join(states)}")
        shown = visible_workspaces()
        rows, next_before = job_list.page(state=JobState(state) if state else None, experiment=experiment or None,
                                          search=q.strip() or None, before=before, limit=JOBS_PAGE, workspaces=shown)
        filters = {k: v for k, v in (("state", state), ("experiment", experiment), ("q", q)) if v}
        return page("jobs.html", rows=rows, states=states, state=state, experiment=experiment, q=q,
                    experiments=job_list.experiments(workspaces=shown), counts=job_list.counts(workspaces=shown),
                    next_url=("/web/jobs?" + urlencode({**filters, "before": next_before})) if next_before else None,
                    first_url=("/web/jobs?" + urlencode(filters)) if before is not None else None)

    # ---- one job ----------------------------------------------------------------------
    @r.get("/web/jobs/{job_id}")
    def job_page(request: Request, job_id: str, attempt: Optional[int] = Query(None, ge=1)) -> Response:
        if (go := to_login(request)) is not None:
            return go
        try:
            detail = jobs.job_detail(ctx, job_for_page(job_id))
        except HTTPException as e:
            return message(e.status_code, "No such job", str(e.detail))
        n = attempt or detail.attempt
        shown = next((a for a in detail.attempts if a.n == n), None)
        failing, nonzero = failing_ranks(shown) if shown else (None, set())
        world = detail.spec.world_size
        ranks = [rk.rank for rk in shown.ranks] if shown and shown.ranks else list(range(world))
        try:
            job_files, files_error = files_of(job_id=job_id, path=""), None
        except HTTPException as e:
            job_files, files_error = [], str(e.detail)
        try:
            events = metrics_of(job_id=job_id, trial=None, rank=0, attempt=None, name=None)
            charts, metrics_error = {name: metric_chart(s, name) for name, s in metric_series(events).items()}, None
        except HTTPException as e:
            charts, metrics_error = {}, str(e.detail)
        final = JobState(detail.state).is_final
        return page("job.html", job=detail, shown=shown, attempt_n=max(n, 1), failing=failing, nonzero=nonzero,
                    log_ranks=ranks[:LOG_RANKS], more_ranks=max(0, len(ranks) - LOG_RANKS),
                    files=job_files[:FILES_SHOWN], more_files=max(0, len(job_files) - FILES_SHOWN),
                    files_error=files_error, charts=charts, metrics_error=metrics_error, final=final, world=world)

    @r.get("/web/jobs/{job_id}/logs")
    def job_logs(request: Request, job_id: str, rank: int = Query(0, ge=0),
                 stream: str = Query("stdout", pattern="^(stdout|stderr)$"),
                 attempt: Optional[int] = Query(None, ge=1),
                 offset: int = Query(0, ge=0, le=MAX_LOG_OFFSET)) -> Any:
        if not sessions.logged_in(request):
            return JSONResponse({"detail": "not logged in: reload the page"}, 401)
        chunk: LogChunk = logs_of(job_id=job_id, rank=rank, stream=stream, attempt=attempt, offset=offset,
                                  max_bytes=LOG_CHUNK, item=None, trial=None)
        return JSONResponse(chunk.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    @r.get("/web/jobs/{job_id}/files/content")
    def job_file(request: Request, job_id: str, path: str = Query(..., min_length=1)) -> Response:
        if (go := to_login(request)) is not None:
            return go
        try:
            resp = content_of(job_id=job_id, path=path)
        except HTTPException as e:
            return message(e.status_code, "Cannot download this file", str(e.detail))
        name = path.rsplit("/", 1)[-1] or "file"
        resp.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name)}"
        return resp

    # ---- sweeps and arrays ------------------------------------------------------------
    @r.get("/web/jobs/{job_id}/trials")
    def sweep_page(request: Request, job_id: str) -> Response:
        if (go := to_login(request)) is not None:
            return go
        try:
            job = job_for_page(job_id)
            detail = jobs.job_detail(ctx, job)
            trial_list = trials_of(job_id=job_id, state=None)
        except HTTPException as e:
            return message(e.status_code, "Not a sweep's trials", str(e.detail))
        objective = detail.spec.sweep.objective
        metric, maximize = objective.primary_metric, objective.goal == "maximize"
        series = {}
        for t in trial_list[:TRIALS_PLOTTED]:
            try:
                events = metrics_of(job_id=job_id, trial=t.n, rank=0, attempt=None, name=metric)
            except HTTPException:
                continue
            series[t.id] = [(e.step, e.value) for e in events]
        best = next((t.id for t in trial_list if t.best is not None), None)
        params = sorted({k for t in trial_list for k in t.params})
        rows = [{"id": t.id, "params": t.params, "value": t.best} for t in trial_list]
        return page("sweep.html", job=detail, trials=trial_list, params=params, metric=metric, maximize=maximize,
                    chart=metric_chart(series, metric, highlight=best),
                    parallel=parallel_coordinates(rows, params, metric, maximize),
                    plotted=min(len(trial_list), TRIALS_PLOTTED))

    @r.get("/web/jobs/{job_id}/items")
    def array_page(request: Request, job_id: str, state: str = "", page_n: int = Query(1, alias="page", ge=1)
                   ) -> Response:
        if (go := to_login(request)) is not None:
            return go
        try:
            detail = jobs.job_detail(ctx, job_for_page(job_id))
            tasks = items_of(job_id=job_id, state=None, offset=0, limit=1_000_000)
        except HTTPException as e:
            return message(e.status_code, "Not an array job's items", str(e.detail))
        counts = {s: 0 for s in items.ITEM_STATES}
        for t in tasks:
            counts[t.state] = counts.get(t.state, 0) + 1
        if state and state not in counts:
            return message(400, "Unknown item state", f"state: {state!r} is not one of {', '.join(counts)}")
        chosen = [t for t in tasks if not state or t.state == state]
        start = (page_n - 1) * ITEMS_PAGE
        return page("array.html", job=detail, counts=counts, total=len(tasks), tasks=chosen[start:start + ITEMS_PAGE],
                    state=state, page=page_n, more=len(chosen) > start + ITEMS_PAGE,
                    finished=counts["done"] + counts["failed"] + counts["skipped"])

    return r
