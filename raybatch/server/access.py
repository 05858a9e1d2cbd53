"""Who may call what: one rule per route, applied by one dependency on the whole app.

Every route of the app has a rule in ``RULES``: (method, path template) -> the role it
needs, where the workspace comes from, and which credential it takes. A route without a
rule is refused to everyone (403, logged when the app is built: ``Access.bind``), and
tests/test_roles_e2e.py walks ``app.routes`` to test each rule against every role: a new
route without a rule fails both.

Scopes (where the workspace a request acts in comes from):

    PUBLIC    no credential (liveness, static files, the login forms, one-time codes)
    ANY       the role in any workspace: cluster-wide reads, and lists the route filters
              to the caller's workspaces (``current()``, ``visible_workspaces()``)
    JOB       the workspace of the job named by the ``job_id`` path parameter
    BODY      the workspace(s) of the jobs in the JSON body (submit, batch submit)
    CLUSTER   the cluster admin only (policy, nodes, metrics, cost, the Ray cluster)

A caller without a valid credential gets 401; one whose role is too low, or held in
another workspace, gets 403 naming the role and workspace needed. A job of another
workspace is a 403, not a 404: job ids are random (nothing to enumerate), and a user who
pasted a colleague's job id learns why it fails instead of doubting the id.

Credentials: the bearer token (API, CLI, SDK) or the web view's session cookie (pages
under /web, which a session created with a token or a one-time code carries the identity
of); /docs and /openapi.json take either.

Every state-changing request (POST, PUT, DELETE, PATCH) is written to the audit log
(``AuditLog``): who, method and path, the workspace, the client's address, the status."""

from __future__ import annotations

import atexit
import json
import logging
import re
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from fastapi import HTTPException, Request, status

from raybatch.config import API_PREFIX
from raybatch.server.auth import bearer
from raybatch.server.identity import DEFAULT_WORKSPACE, Identity, Role, TokenRegistry, header_bytes

if TYPE_CHECKING:
    from raybatch.server.web.session import Sessions
    from raybatch.state.store import Store

log = logging.getLogger("raybatch.server")

PUBLIC, ANY, JOB, BODY, CLUSTER = "public", "any", "job", "body", "cluster"
_JOB_ID = re.compile(r"\brb-[0-9a-f]{8}\b")  # raybatch.state.store.new_job_id
OTHER_JOB = "a job of another workspace"
BEARER, COOKIE, EITHER = "bearer", "cookie", "either"
WRITES = frozenset(("POST", "PUT", "DELETE", "PATCH"))


@dataclass(frozen=True)
class Rule:
    role: Optional[Role]        # None: public
    scope: str = ANY
    credential: str = BEARER


def _api(path: str) -> str:
    return API_PREFIX + path


R, C, O, A = Role.reader, Role.contributor, Role.owner, Role.admin
_public = Rule(None, PUBLIC)
_web_public = Rule(None, PUBLIC, COOKIE)

RULES: dict[tuple[str, str], Rule] = {
    # liveness (a valid admin token adds the scheduler's last error)
    ("GET", _api("/health")): _public,
    # the cluster, the queue (filtered), the scheduler's timings and policy
    ("GET", _api("/cluster")): Rule(R),
    ("GET", _api("/scheduler")): Rule(R),
    ("GET", _api("/queue")): Rule(R),
    ("GET", _api("/nodes/status")): Rule(R),
    ("GET", _api("/nodes")): Rule(A, CLUSTER),
    ("POST", _api("/nodes/requeue")): Rule(A, CLUSTER),
    ("GET", _api("/cost")): Rule(A, CLUSTER),
    ("GET", _api("/ray")): Rule(A, CLUSTER),
    ("GET", "/metrics"): Rule(A, CLUSTER),
    # code and input packages (content-addressed): whoever may submit somewhere
    ("GET", _api("/code/{sha}")): Rule(C),
    ("PUT", _api("/code/{sha}")): Rule(C),
    ("GET", _api("/inputs/{sha}")): Rule(C),
    ("PUT", _api("/inputs/{sha}")): Rule(C),
    # jobs
    ("POST", _api("/jobs")): Rule(C, BODY),
    ("POST", _api("/jobs/batch")): Rule(C, BODY),
    ("GET", _api("/jobs")): Rule(R),  # filtered to the caller's workspaces
    ("GET", _api("/jobs/{job_id}")): Rule(R, JOB),
    ("POST", _api("/jobs/{job_id}/cancel")): Rule(C, JOB),
    ("GET", _api("/jobs/{job_id}/logs")): Rule(R, JOB),
    ("GET", _api("/jobs/{job_id}/items")): Rule(R, JOB),
    ("GET", _api("/jobs/{job_id}/trials")): Rule(R, JOB),
    ("GET", _api("/jobs/{job_id}/trials/{n}")): Rule(R, JOB),
    ("GET", _api("/jobs/{job_id}/metrics")): Rule(R, JOB),
    ("GET", _api("/jobs/{job_id}/files")): Rule(R, JOB),
    ("GET", _api("/jobs/{job_id}/files/content")): Rule(R, JOB),
    ("GET", _api("/datastores")): Rule(R),  # filtered to the caller's workspaces
    # browser logins: a web code for anyone; a Ray dashboard code for an admin (the route checks)
    ("POST", _api("/login-codes")): Rule(R),
    ("GET", "/ray-login/{code}"): _public,  # the one-time code is the credential
    # identities and the audit log (raybatch/server/routes/admin.py checks the workspace)
    ("GET", _api("/whoami")): Rule(R),
    ("GET", _api("/admin/tokens")): Rule(O),
    ("POST", _api("/admin/tokens")): Rule(O),
    ("DELETE", _api("/admin/tokens/{token_id}")): Rule(O),
    ("GET", _api("/audit")): Rule(O),
    # the API's own description
    ("GET", "/openapi.json"): Rule(R, ANY, EITHER),
    ("GET", "/docs"): Rule(R, ANY, EITHER),
    # the web view (raybatch/server/web): its pages render the login form themselves
    ("GET", "/web/login"): _web_public,
    ("POST", "/web/login"): _web_public,
    ("GET", "/login/{code}"): _web_public,
    ("POST", "/web/logout"): _web_public,
    ("GET", "/web/static/{name}"): _web_public,
    ("GET", "/web"): _web_public,
    ("GET", "/web/"): Rule(R, ANY, COOKIE),
    ("GET", "/web/jobs"): Rule(R, ANY, COOKIE),
    ("GET", "/web/jobs/{job_id}"): Rule(R, JOB, COOKIE),
    ("GET", "/web/jobs/{job_id}/logs"): Rule(R, JOB, COOKIE),
    ("GET", "/web/jobs/{job_id}/files/content"): Rule(R, JOB, COOKIE),
    ("GET", "/web/jobs/{job_id}/trials"): Rule(R, JOB, COOKIE),
    ("GET", "/web/jobs/{job_id}/items"): Rule(R, JOB, COOKIE),
}

_current: ContextVar[Optional[Identity]] = ContextVar("raybatch_identity", default=None)


def current() -> Optional[Identity]:
    """The identity of the request being served (None outside a request, or on a public route)."""
    return _current.get()


def visible_workspaces() -> Optional[frozenset[str]]:
    """The workspaces whose jobs the current caller may see; None: all (an admin, or no request)."""
    ident = _current.get()
    return None if ident is None else ident.readable()


def require(role: Role, workspace: str) -> Identity:
    """403 unless the current caller has ``role`` in ``workspace`` (for checks a route makes
    on what only it knows, e.g. the workspace of a token being revoked)."""
    ident = _current.get()
    if ident is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not ident.can(role, workspace):
        raise forbidden(ident, role, workspace)
    return ident


def forbidden(ident: Identity, role: Role, workspace: Optional[str], what: str = "") -> HTTPException:
    where = "the cluster (a cluster admin)" if workspace in (None, "*") else f"workspace '{workspace}'"
    return HTTPException(status.HTTP_403_FORBIDDEN,
                         f"{ident.describe()} may not do this{what}: it needs the {role.name} role in {where}")


def app_routes(routes: Iterable[Any]) -> list[tuple[str, str, Any]]:
    """(method, full path, route object) of every route of an app, with the prefixes of the
    routers it includes (FastAPI >= 0.16x keeps included routers unflattened: the route a
    request carries in ``scope["route"]`` is the router's own, without the prefix)."""
    try:
        from fastapi.routing import iter_route_contexts  # noqa: PLC0415
    except ImportError:  # an older FastAPI: app.routes are the flattened routes themselves
        contexts = [(r, getattr(r, "path", None), getattr(r, "methods", None)) for r in routes]
    else:
        contexts = [(c.original_route, c.path, c.methods) for c in iter_route_contexts(list(routes))]
    return [(m, path, route) for route, path, methods in contexts for m in sorted(methods or {"(any)"})]


def rules_of(routes: Iterable[Any], strict: bool = True) -> dict[Any, Rule]:
    """The rule of each route object; KeyError naming any route without one, or that the
    app's dependency does not reach (a plain Starlette route or mount); ``strict=False``:
    those left out."""
    from fastapi.routing import APIRoute  # noqa: PLC0415

    missing, out = [], {}
    for method, path, route in app_routes(routes):
        rule = RULES.get(("GET" if method == "HEAD" else method, path))
        if not isinstance(route, APIRoute):
            missing.append(f"{method} {path} (not an APIRoute: no dependency reaches it)")
        elif rule is None:
            missing.append(f"{method} {path}")
        else:
            out[(method, id(route))] = rule  # routes are unhashable; they live as long as the app
    if missing and strict:
        raise KeyError("routes without an access rule (add them to raybatch/server/access.py RULES): "
                       + ", ".join(missing))
    return out


class Access:
    """The app's one authorization dependency (``await access(request)``), and what it uses:
    the token registry, the web sessions, and a cache of each job's workspace."""

    JOB_CACHE = 100_000

    def __init__(self, registry: TokenRegistry, store: "Store", sessions: "Sessions"):
        self.registry, self.store, self.sessions = registry, store, sessions
        self.rules: dict[Any, Rule] = {}
        self._job_ws: dict[str, str] = {}   # a job's workspace never changes: cached

    def bind(self, routes: Iterable[Any]) -> None:
        """Take the rules of the app's routes. A route without one is refused to everyone
        (403, logged here): secure by default, and tests/test_roles_e2e.py fails on it."""
        try:
            self.rules = rules_of(routes)
        except KeyError as e:
            log.error("%s", e.args[0])
            self.rules = rules_of(routes, strict=False)

    def identify(self, request: Request, credential: str) -> tuple[Optional[Identity], Optional[str]]:
        """The caller, and why not when a credential was given but is no good."""
        if credential in (BEARER, EITHER):
            given = bearer(request.headers.get("authorization"))
            if given is not None:
                ident, why = self.registry.check(header_bytes(given))
                if ident is not None or credential == BEARER:
                    return ident, why or None
        if credential in (COOKIE, EITHER):
            return self.sessions.identity(request), None
        return None, None

    def redact(self, data: Any) -> Any:
        """``data`` (text, or lists and dicts of it) with every job id of a workspace the
        caller cannot read replaced by 'a job of another workspace': what cluster-wide views
        (the queue's reasons, the nodes' jobs, the autoscaler's demand) show a non-admin."""
        ident = _current.get()
        readable = None if ident is None else ident.readable()
        if readable is None:
            return data

        def one(m: re.Match) -> str:
            return m.group(0) if self.job_workspace(m.group(0)) in readable else OTHER_JOB

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return _JOB_ID.sub(one, v)
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v

        return walk(data)

    def job_workspace(self, job_id: str) -> Optional[str]:
        ws = self._job_ws.get(job_id)
        if ws is None:
            ws = self.store.job_workspace(job_id)
            if ws is not None:
                if len(self._job_ws) >= self.JOB_CACHE:
                    self._job_ws.clear()
                self._job_ws[job_id] = ws
        return ws

    async def __call__(self, request: Request) -> None:
        rule = self.rules.get((request.method, id(request.scope.get("route"))))
        if rule is None:  # bind() covered every route: only a route added after create_app
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this route has no access rule")
        if rule.role is None:  # public: a valid bearer token is still recognised (health)
            ident = None
            if rule.credential == BEARER and "authorization" in request.headers:
                ident, _ = self.identify(request, BEARER)
            _current.set(ident)
            request.state.identity = ident
            return
        ident, why = self.identify(request, rule.credential)
        _current.set(ident)
        request.state.identity = ident
        if ident is None:
            if rule.credential == COOKIE:
                return  # the page renders the login form (a 401) itself
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, why or "missing bearer token (Authorization: "
                                "Bearer <token>; RAYBATCH_TOKEN for the CLI)", headers={"WWW-Authenticate": "Bearer"})
        role = rule.role
        if rule.scope == CLUSTER:
            if not ident.is_admin:
                raise forbidden(ident, role, None)
            return
        if rule.scope == JOB:
            job_id = request.path_params.get("job_id", "")
            ws = self.job_workspace(job_id)
            if ws is not None:
                request.state.workspace = ws
                if not ident.can(role, ws):
                    raise forbidden(ident, role, ws, f" with job {job_id}")
                return
            # no such job: the route answers 404 to whoever may use such a route at all
        elif rule.scope == BODY:
            spaces = await body_workspaces(request, batch=request.url.path.endswith("/batch"))
            if spaces:
                request.state.workspace = spaces[0] if len(spaces) == 1 else ",".join(spaces)
                for ws in spaces:
                    if not ident.can(role, ws):
                        raise forbidden(ident, role, ws)
                return
        if not ident.can_somewhere(role):
            raise forbidden(ident, role, ident.workspace)
        if not ident.is_admin:
            request.state.workspace = ident.workspace


async def body_workspaces(request: Request, batch: bool) -> list[str]:
    """The workspaces of the jobs a submit request carries (``spec.workspace``, default
    'default'), sorted; [] when the body is not what a submit takes (the route answers 422).
    Which shape to read comes from the route (``batch``), never from the body: a decoy
    "jobs" key in a single submit must not choose what is checked. The submit routes check
    the parsed spec's workspace again (``routes/jobs.admission``)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(body, dict):
        return []
    items = body.get("jobs") if batch else [body]
    if not isinstance(items, list):
        return []
    spaces = set()
    for item in items:
        spec = item.get("spec") if isinstance(item, dict) else None
        if not isinstance(spec, dict):
            return []
        ws = spec.get("workspace", DEFAULT_WORKSPACE)
        spaces.add(ws if isinstance(ws, str) else DEFAULT_WORKSPACE)
    return sorted(spaces)


class AuditLog:
    """The audit log's writer: records are buffered and written in one transaction every
    ``period`` seconds by a thread of its own, so a submit never waits for a second SQLite
    write (benchmarks/bench_admission.py). ``flush()`` writes what is pending now (the audit
    route calls it before reading; exit calls it too)."""

    MAX_PENDING = 100_000  # a flood of refused requests cannot grow memory without bound
    IDLE_PERIODS = 40
    PRUNE_EVERY_S = 3600.0

    def __init__(self, store: "Store", period: float = 0.25,
                 retention_days: Callable[[], float] = lambda: 90.0):
        self.store, self.period = store, period
        self.retention_days = retention_days  # the policy's audit_retention_days, as it is now
        self._pruned_at = 0.0  # monotonic; the writer's first batch prunes
        self._pending: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.dropped = 0
        self._thread: Optional[threading.Thread] = None
        atexit.register(self.flush)

    def record(self, ident: Optional[Identity], workspace: Optional[str], method: str, path: str,
               client: Optional[str], status_code: int, target: Optional[str] = None) -> None:
        rec = (time.time(), ident.user if ident else None, ident.token_id if ident else None, workspace,
               method, path, client, status_code, target)
        with self._lock:
            if len(self._pending) >= self.MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append(rec)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            try:
                self.store.add_audit(batch)
            except Exception:  # noqa: BLE001 - put them back: the next flush retries
                log.warning("could not write %d audit record(s); retrying", len(batch), exc_info=True)
                with self._lock:
                    self._pending[:0] = batch

    def prune(self) -> int:
        """Delete the records older than the retention, at most once an hour; called by the
        writer thread only (never on a request, nor at exit). A server that writes nothing
        deletes nothing, and its log is not growing either."""
        now = time.monotonic()
        if self._pruned_at and now - self._pruned_at < self.PRUNE_EVERY_S:
            return 0
        self._pruned_at = now
        try:
            n = self.store.prune_audit(time.time() - self.retention_days() * 86400)
        except Exception:  # noqa: BLE001 - the next hour tries again
            log.warning("could not delete old audit records", exc_info=True)
            return 0
        if n:
            log.info("deleted %d audit record(s) older than %g day(s)", n, self.retention_days())
        return n

    def _run(self) -> None:
        """Flush every ``period`` (and prune, hourly); after ``IDLE_PERIODS`` with nothing to
        write the thread ends (the next record starts another): an idle server, or a test's
        many apps, keep none."""
        idle = 0
        while True:
            self._wake.wait(self.period)
            self.prune()  # before looking for work: a reader's flush may have taken it all
            with self._lock:
                if not self._pending:
                    idle += 1
                    if idle >= self.IDLE_PERIODS:
                        self._thread = None
                        return
                    continue
            idle = 0
            self.flush()


class AuditMiddleware:
    """ASGI middleware: after each state-changing request, one audit record with the
    response's status and the identity and workspace the access dependency found."""

    def __init__(self, app: Any, audit: AuditLog):
        self.app, self.audit = app, audit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITES:
            await self.app(scope, receive, send)
            return
        seen = {"status": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = scope.get("state") or {}
            client = scope.get("client")
            self.audit.record(state.get("identity"), state.get("workspace"), scope["method"], scope["path"],
                              client[0] if client else None, seen["status"], state.get("target"))
