"""The role x route matrix against a real server process, and API tokens through the real CLI.

The matrix is generated from the app's routes (raybatch.server.access.app_routes over
create_app's routes, the same code the server process runs): a route without an access rule
fails ``test_every_route_has_a_rule``, and every rule is tried with every kind of caller: no
token, a wrong token, a reader / contributor / owner of the workspace 'team', an owner of
another workspace, and the cluster admin (the server's owner token). Each must get 401, 403,
or neither, as its rule says. Pages of the web view are tried with each caller's session
cookie (made by logging in with its token), the API with its bearer token."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest

from raybatch.server.access import ANY, BODY, CLUSTER, COOKIE, JOB, RULES, app_routes
from raybatch.server.identity import Role
from raybatch.server.web.session import COOKIE as COOKIE_NAME
from tests.conftest import RAYBATCH, RayTestCluster, ServerProcess, stop_everything

WS, OTHER = "team", "other"
CALLERS = {  # name -> (role, workspace); None: no valid token
    "none": None, "wrong": None,
    "reader": (Role.reader, WS), "contributor": (Role.contributor, WS), "owner": (Role.owner, WS),
    "other-owner": (Role.owner, OTHER), "admin": (Role.admin, "*"),
}
NEVER_RUNS = {"resources": {"cpus": 1, "custom": {"no_such_node": 1}}}  # stays queued: nothing runs


def job_body(name: str, workspace: str = WS) -> dict:
    return {"spec": {"name": name, "command": "true", "workspace": workspace, **NEVER_RUNS}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = RayTestCluster(nodes=1)
    server = ServerProcess(cluster, tmp_path_factory.mktemp("roles")).start()
    admin = server.client()
    tokens = {"admin": server.token, "wrong": "rbt_" + "w" * 43, "none": None}
    for name, who in CALLERS.items():
        if who is not None and name != "admin":
            tokens[name] = admin.create_token(f"user-{name}", who[0].name, who[1])["token"]
    jobs = {WS: admin.submit(job_body("team-job")["spec"]).id, OTHER: admin.submit(job_body("other-job", OTHER)["spec"]).id}
    yield server, tokens, jobs
    try:
        stop_everything(server)
    finally:
        server.stop()
        cluster.shutdown()


def routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the server's app, built here from the same code."""
    from raybatch.scheduler.loop import Scheduler
    from raybatch.server.app import ServerContext, create_app
    from raybatch.state.store import Store
    from tests.test_scheduler_loop import FakeCluster, FakeLauncher

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="rb-routes-") as d:
        store = Store(Path(d) / "db.sqlite")
        ctx = ServerContext(store=store, scheduler=Scheduler(store, FakeLauncher(), FakeCluster(1)),
                            jobs_root=d, code_root=Path(d) / "code")
        app = create_app(ctx, "x" * 40)
        out = sorted({(m, p) for m, p, _ in app_routes(app.routes) if m != "HEAD"})
        store.close()
    return out


ROUTES = routes()


def test_every_route_has_a_rule():
    missing = [f"{m} {p}" for m, p in ROUTES if (m, p) not in RULES]
    assert not missing, f"routes without an access rule in raybatch/server/access.py RULES: {missing}"
    assert len(ROUTES) >= 40  # the walk found the app's routes, prefixes included
    assert ("POST", "/api/v1/jobs") in ROUTES and ("GET", "/web/jobs/{job_id}") in ROUTES


def test_the_rules_say_what_the_roles_mean():
    """The table itself, against the roles as the issue defines them (the matrix below checks
    that the server enforces the table): reader reads a workspace's jobs, contributor submits
    and cancels, owner manages tokens and reads the audit log, the admin has the cluster."""
    R, C, O, A = Role.reader, Role.contributor, Role.owner, Role.admin
    intent = {
        ("GET", "/api/v1/jobs"): R, ("GET", "/api/v1/jobs/{job_id}"): R, ("GET", "/api/v1/jobs/{job_id}/logs"): R,
        ("GET", "/api/v1/jobs/{job_id}/files"): R, ("GET", "/api/v1/jobs/{job_id}/files/content"): R,
        ("POST", "/api/v1/jobs"): C, ("POST", "/api/v1/jobs/batch"): C, ("POST", "/api/v1/jobs/{job_id}/cancel"): C,
        ("PUT", "/api/v1/code/{sha}"): C, ("POST", "/api/v1/admin/tokens"): O,
        ("DELETE", "/api/v1/admin/tokens/{token_id}"): O, ("GET", "/api/v1/audit"): O,
        ("GET", "/api/v1/nodes"): A, ("POST", "/api/v1/nodes/requeue"): A, ("GET", "/metrics"): A,
        ("GET", "/api/v1/ray"): A, ("GET", "/openapi.json"): R, ("GET", "/docs"): R,
    }
    assert {k: RULES[k].role for k in intent} == intent
    for (method, path), rule in RULES.items():
        # every write needs at least a contributor (a login code only lets a reader's browser read)
        if method != "GET" and rule.role is not None and path != "/api/v1/login-codes":
            assert rule.role >= Role.contributor, (method, path)
        if "{job_id}" in path:
            assert rule.scope == JOB, path  # a job's routes act in the job's workspace
    public = {k for k, r in RULES.items() if r.role is None}
    assert public == {("GET", "/api/v1/health"), ("GET", "/ray-login/{code}"), ("GET", "/web/login"),
                      ("POST", "/web/login"), ("GET", "/login/{code}"), ("POST", "/web/logout"),
                      ("GET", "/web/static/{name}"), ("GET", "/web")}


def expected(caller: str, method: str, path: str) -> str:
    """'401', '403' or 'ok' (neither) for this caller on this route, from its rule."""
    rule = RULES[(method, path)]
    if rule.role is None:
        return "ok"
    who = CALLERS[caller]
    if who is None:
        return "401"
    role, ws = who
    if rule.scope == CLUSTER:
        allowed = role is Role.admin
    elif rule.scope in (JOB, BODY) or path in ("/api/v1/admin/tokens", "/api/v1/admin/tokens/{token_id}") \
            and method in ("POST", "DELETE"):
        allowed = role is Role.admin or (ws == WS and role >= rule.role)  # the request is about 'team'
    else:
        assert rule.scope == ANY
        allowed = role >= rule.role
    return "ok" if allowed else "403"


def request_for(server, method: str, path: str, jobs: dict) -> dict:
    """A request that, allowed, does what the route is for (in the workspace 'team')."""
    params = {"job_id": jobs[WS], "n": "0", "sha": "0" * 64, "code": "not-a-code", "name": "web.css"}
    if "{token_id}" in path:  # a fresh token to revoke, each time
        params["token_id"] = server.client().create_token("throwaway", "reader", WS)["id"]
    url = path.format(**params)
    kw: dict = {}
    bodies = {
        ("POST", "/api/v1/jobs"): job_body("m"),
        ("POST", "/api/v1/jobs/batch"): {"jobs": [job_body("m1"), job_body("m2")]},
        ("POST", "/api/v1/admin/tokens"): {"user": "made", "workspace": WS, "role": "reader"},
        ("POST", "/api/v1/login-codes"): {"next": "/web/"},
        ("POST", "/api/v1/nodes/requeue"): {"node_ids": ["no-such-node"]},
    }
    if (method, path) in bodies:
        kw["json"] = bodies[(method, path)]
    elif method == "PUT":
        kw["content"] = b"not a zip"
    elif method == "POST" and path not in ("/web/login", "/web/logout"):
        kw["json"] = {}
    if path.endswith("/files/content"):
        kw["params"] = {"path": "stdouterr/nothing.txt"}
    return {"method": method, "url": server.url + url, **kw}


def test_the_role_route_matrix(env):
    server, tokens, jobs = env
    cookies = {}
    for caller, token in tokens.items():  # each caller's web session
        if token and CALLERS[caller] is not None:
            r = httpx.post(server.url + "/web/login", data={"token": token, "next": "/web/"})
            assert r.status_code == 303, (caller, r.status_code)
            cookies[caller] = f"{COOKIE_NAME}={r.cookies[COOKIE_NAME]}"
    wrong, tried = [], {"401": 0, "403": 0, "ok": 0}
    with httpx.Client(timeout=30) as http:
        for method, path in ROUTES:
            rule = RULES[(method, path)]
            for caller, token in tokens.items():
                req = request_for(server, method, path, jobs)
                if path == "/web/login" and method == "POST":
                    req["data"] = {"token": token or "", "next": "/web/"}
                if rule.credential == COOKIE and rule.role is not None:
                    req["headers"] = {"Cookie": cookies[caller]} if caller in cookies else {}
                elif token is not None:
                    req["headers"] = {"Authorization": f"Bearer {token}"}
                got = http.request(**req, follow_redirects=False).status_code
                want = expected(caller, method, path)
                if rule.role is None:  # a public route: the rule never refuses (a login may say 401)
                    ok = got != 403 and got < 500
                elif want == "ok":
                    ok = got not in (401, 403) and got < 500
                else:
                    ok = str(got) == want
                if not ok:
                    wrong.append(f"{caller:12s} {method} {path}: {got}, want {want}")
                tried[want] += 1
    assert not wrong, "\n".join(wrong)
    assert tried["401"] >= 80 and tried["403"] >= 50 and tried["ok"] >= 200, tried  # the matrix was walked


def test_other_workspaces_jobs_are_out_of_sight(env):
    server, tokens, jobs = env
    h = {"Authorization": f"Bearer {tokens['reader']}"}
    listed = {j["id"] for j in httpx.get(server.url + "/api/v1/jobs", headers=h).json()}
    assert jobs[WS] in listed and jobs[OTHER] not in listed
    assert all(j["workspace"] == WS for j in httpx.get(server.url + "/api/v1/jobs", headers=h).json())
    r = httpx.get(server.url + f"/api/v1/jobs/{jobs[OTHER]}", headers=h)
    assert r.status_code == 403 and "reader role in workspace 'other'" in r.json()["detail"]


# ---- tokens as a person meets them: the real CLI ------------------------------------------------
def cli(server, token: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAYBATCH_ADDRESS": server.url, "RAYBATCH_TOKEN": token}
    return subprocess.run([RAYBATCH, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_revoked_and_an_expired_token_are_refused(env):
    server, tokens, jobs = env
    made = cli(server, server.token, "admin", "token", "create", "--user", "sp-ci", "--workspace", WS,
               "--role", "reader")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("rbt_") and "\n" not in token and "sp-ci" in made.stderr
    mine = cli(server, token, "list", "-o", "json")
    assert mine.returncode == 0, mine.stderr
    assert {j["id"] for j in json.loads(mine.stdout)} >= {jobs[WS]}
    assert jobs[OTHER] not in mine.stdout
    me = cli(server, token, "admin", "whoami")
    assert me.stdout.startswith("sp-ci: reader in workspace 'team'"), me.stdout + me.stderr
    refused = cli(server, token, "show", jobs[OTHER])
    assert refused.returncode == 1 and "reader role in workspace 'other'" in refused.stderr
    listed = cli(server, server.token, "admin", "token", "list", "-o", "json")
    rows = json.loads(listed.stdout)
    assert token not in listed.stdout and all("token_hash" not in r for r in rows)
    tid = next(r["id"] for r in rows if r["user"] == "sp-ci")
    assert cli(server, server.token, "admin", "token", "revoke", tid).returncode == 0
    gone = cli(server, token, "list")
    assert gone.returncode == 1 and "revoked" in gone.stderr, gone.stderr
    # an expired one
    short = cli(server, server.token, "admin", "token", "create", "--user", "temp", "--workspace", WS,
                "--role", "reader", "--expires", "8s", "-o", "json")
    assert short.returncode == 0, short.stderr
    made = json.loads(short.stdout)
    table = cli(server, made["token"], "list")  # a busy machine: 8 s leaves time for this
    assert table.returncode == 0 and "WORKSPACE" in table.stdout and WS in table.stdout, table.stdout
    time.sleep(max(0.0, made["expires_at"] - time.time() + 0.2))
    late = cli(server, made["token"], "list")
    assert late.returncode == 1 and "expired" in late.stderr, late.stderr
    # the audit log saw it all: who, what, from where, the result
    audit = json.loads(cli(server, server.token, "audit", "-o", "json").stdout)
    revokes = [a for a in audit if a["method"] == "DELETE" and a["path"].endswith(tid)]
    assert revokes and revokes[0]["user"] == "owner" and revokes[0]["status"] == 200
    assert revokes[0]["client"] == "127.0.0.1"
    table = cli(server, server.token, "audit")
    assert table.returncode == 0 and f"DELETE /api/v1/admin/tokens/{tid}" in table.stdout
    owner_view = json.loads(cli(server, tokens["owner"], "audit", "-o", "json").stdout)
    assert owner_view and {a["workspace"] for a in owner_view} == {WS}
