"""Identities without a cluster: the owner token file, API tokens (hashed, revocable,
expiring), workspaces on jobs, and what each role sees. The app is the server's real one
(create_app) over a real store and scheduler; only Ray is replaced by the scheduler tests'
fakes (tests/test_roles_e2e.py does the same through a real server process and the CLI)."""

from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest
from fastapi.testclient import TestClient

from raybatch.server.app import ServerContext, create_app
from raybatch.server.auth import TokenFileError, ensure_token
from raybatch.server.identity import Role, TokenRegistry, token_hash
from raybatch.spec.job import JobSpec
from tests.test_scheduler_loop import FakeCluster, FakeLauncher

TOKEN = "owner-token-of-the-identity-tests-0123456789"


# ---- the owner token file ----------------------------------------------------------------
def test_the_token_file_is_made_whole_and_private(tmp_path):
    path = tmp_path / "state" / "token"
    token = ensure_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token(path) == token  # read back, not replaced
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temp file left


@pytest.mark.parametrize("content", [b"", b"\n", b"short-token\n", "é".encode() * 40, b"a b" * 20])
def test_an_empty_short_or_odd_token_file_refuses_the_start(tmp_path, content):
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(TokenFileError) as e:
        ensure_token(path)
    assert str(path) in str(e.value) and ("at least 32" in str(e.value) or "ASCII" in str(e.value))


# ---- the registry: hashes only, revocation and expiry at once ---------------------------------
def test_tokens_are_stored_hashed_revoked_at_once_and_expire(tmp_path):
    from raybatch.state.store import Store

    store = Store(tmp_path / "db.sqlite")
    reg = TokenRegistry(TOKEN, store)
    token, row = reg.create("alice", "vision", Role.contributor, time.time() + 3600, created_by="owner")
    assert token.startswith("rbt_") and "token_hash" not in row
    raw = sqlite3.connect(tmp_path / "db.sqlite").execute("SELECT * FROM tokens").fetchall()
    assert token not in repr(raw) and token_hash(token) in repr(raw)  # only the hash is on disk
    who = reg.authenticate(token.encode())
    assert who and who.user == "alice" and who.can(Role.reader, "vision") and not who.can(Role.owner, "vision")
    assert not who.can(Role.reader, "other") and reg.authenticate(TOKEN.encode()).is_admin
    assert TokenRegistry(TOKEN, store).authenticate(token.encode()) == who  # a restarted server knows it
    assert reg.authenticate(token.encode(), now=time.time() + 7200) is None  # expired
    reg.revoke(row["id"])
    assert reg.authenticate(token.encode()) is None and not reg.still_valid(who)
    assert TokenRegistry(TOKEN, store).authenticate(token.encode()) is None  # and after a restart
    for bad in (b"", b"rbt_", "rbt_é".encode(), TOKEN.encode() + b"x"):
        assert reg.authenticate(bad) is None
    with pytest.raises(ValueError, match="workspace"):
        reg.create("bob", "no/slash", Role.reader, None, "owner")
    with pytest.raises(ValueError, match="role"):
        Role.parse("superuser")


# ---- the API, per role -----------------------------------------------------------------------
@pytest.fixture
def api(tmp_path):
    from raybatch.scheduler.loop import Scheduler
    from raybatch.state.store import Store

    store = Store(tmp_path / "db.sqlite")
    sched = Scheduler(store, FakeLauncher(), FakeCluster(1))
    (tmp_path / "shared").mkdir()
    (tmp_path / "vision-data").mkdir()
    (tmp_path / "datastores.yaml").write_text(
        f"datastores:\n  shared: {{url: {tmp_path / 'shared'}}}\n"
        f"  vision: {{url: {tmp_path / 'vision-data'}, workspace: vision}}\n")
    from raybatch.storage.datastores import DatastoresFileWatcher

    ctx = ServerContext(store=store, scheduler=sched, jobs_root=str(tmp_path / "jobs"), code_root=tmp_path / "code",
                        datastores=DatastoresFileWatcher(tmp_path / "datastores.yaml"))
    app = create_app(ctx, TOKEN)
    with TestClient(app, base_url="http://testserver") as c:
        c.ctx, c.app = ctx, app
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_token(api, user, workspace, role, **kw) -> str:
    r = api.post("/api/v1/admin/tokens", json={"user": user, "workspace": workspace, "role": role, **kw})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def spec(name: str, workspace: str = "default", **fields) -> dict:
    return {"spec": {"name": name, "command": "true", "workspace": workspace, **fields}}


def test_bad_bearer_headers_are_401_never_500(api):
    """An empty token matched an empty token file; a non-ASCII one raised in compare_digest."""
    for header in ("Bearer ", "Bearer", "Basic " + TOKEN, "Bearer é" + TOKEN, "Bearer \u00ff\u00fe",
                   "Bearer " + TOKEN[:-1]):
        r = api.get("/api/v1/jobs", headers={"Authorization": header.encode("latin-1")})
        assert r.status_code == 401, (header, r.status_code, r.text)
    r = api.get("/api/v1/jobs", headers={"Authorization": b"Bearer \xc3\xa9\xff"})
    assert r.status_code == 401


def test_docs_openapi_and_the_scheduler_error_need_a_token(api):
    api.ctx.scheduler.last_cycle_error = "job rb-secret of workspace vision broke the cycle"
    anon = {"Authorization": ""}
    assert api.get("/openapi.json", headers=anon).status_code == 401
    assert api.get("/docs", headers=anon).status_code == 401
    assert api.get("/openapi.json").json()["info"]["title"] == "raybatch"
    assert "swagger" in api.get("/docs").text.lower()
    health = api.get("/api/v1/health", headers=anon)
    assert health.status_code == 200 and health.json()["scheduler_error"] is None
    assert "rb-secret" in api.get("/api/v1/health").json()["scheduler_error"]  # the admin's
    reader = make_token(api, "rita", "vision", "reader")
    assert api.get("/api/v1/health", headers=as_(reader)).json()["scheduler_error"] is None


def test_workspaces_separate_jobs_and_roles(api):
    vision_c = make_token(api, "carl", "vision", "contributor")
    vision_r = make_token(api, "rita", "vision", "reader")
    nlp_o = make_token(api, "olga", "nlp", "owner")
    job = api.post("/api/v1/jobs", json=spec("train", "vision"), headers=as_(vision_c))
    assert job.status_code == 201 and job.json()["workspace"] == "vision"
    jid = job.json()["id"]
    assert api.post("/api/v1/jobs", json=spec("t2"), headers=as_(vision_c)).status_code == 403  # 'default'
    r = api.post("/api/v1/jobs", json=spec("t3", "vision"), headers=as_(vision_r))
    assert r.status_code == 403 and "contributor" in r.json()["detail"] and "vision" in r.json()["detail"]
    batch = {"jobs": [spec("b1", "vision"), spec("b2", "nlp")]}
    assert api.post("/api/v1/jobs/batch", json=batch, headers=as_(vision_c)).status_code == 403  # all or none
    nlp_job = api.post("/api/v1/jobs", json=spec("parse", "nlp"), headers=as_(nlp_o)).json()["id"]
    api.post("/api/v1/jobs", json=spec("old-style"))  # the admin, workspace default
    # lists: each sees its workspace's; the admin all, and can filter
    seen = {j["id"] for j in api.get("/api/v1/jobs", headers=as_(vision_r)).json()}
    assert seen == {jid}
    assert {j["id"] for j in api.get("/api/v1/jobs", headers=as_(nlp_o)).json()} == {nlp_job}
    assert len(api.get("/api/v1/jobs").json()) == 3
    assert [j["id"] for j in api.get("/api/v1/jobs", params={"workspace": "nlp"}).json()] == [nlp_job]
    assert api.get("/api/v1/jobs", params={"workspace": "nlp"}, headers=as_(vision_r)).json() == []
    queue = {e["id"] for e in api.get("/api/v1/queue", params={"estimate": False}, headers=as_(vision_r)).json()}
    assert queue == {jid}
    # one job: reader reads, may not cancel; another workspace's owner may do neither (403)
    assert api.get(f"/api/v1/jobs/{jid}", headers=as_(vision_r)).json()["workspace"] == "vision"
    r = api.post(f"/api/v1/jobs/{jid}/cancel", headers=as_(vision_r))
    assert r.status_code == 403 and "contributor" in r.json()["detail"]
    for path in (f"/api/v1/jobs/{jid}", f"/api/v1/jobs/{jid}/logs", f"/api/v1/jobs/{jid}/files"):
        r = api.get(path, headers=as_(nlp_o))
        assert r.status_code == 403 and "vision" in r.json()["detail"], path
    assert api.get("/api/v1/jobs/rb-00000000", headers=as_(vision_r)).status_code == 404
    assert api.post(f"/api/v1/jobs/{jid}/cancel", headers=as_(vision_c)).json()["state"] == "CANCELLED"
    # cluster-wide routes are the admin's
    for path in ("/api/v1/nodes", "/api/v1/cost", "/api/v1/ray", "/metrics"):
        r = api.get(path, headers=as_(nlp_o))
        assert r.status_code == 403 and "cluster admin" in r.json()["detail"], path
    r = api.post("/api/v1/login-codes", json={"next": "/", "kind": "ray-dashboard"}, headers=as_(nlp_o))
    assert r.status_code == 403


def test_owners_manage_their_workspace_tokens_and_read_its_audit_log(api):
    owner = make_token(api, "olga", "vision", "owner")
    member = make_token(api, "mia", "vision", "reader")
    make_token(api, "nils", "nlp", "reader")
    r = api.post("/api/v1/admin/tokens", json={"user": "x", "workspace": "nlp", "role": "reader"}, headers=as_(owner))
    assert r.status_code == 403 and "owner" in r.json()["detail"] and "nlp" in r.json()["detail"]
    r = api.post("/api/v1/admin/tokens", json={"user": "x", "role": "admin"}, headers=as_(owner))
    assert r.status_code == 403
    made = api.post("/api/v1/admin/tokens", json={"user": "sp-ci", "workspace": "vision", "role": "contributor",
                                                   "expires_in": 60}, headers=as_(owner)).json()
    listed = api.get("/api/v1/admin/tokens", headers=as_(owner)).json()
    assert {t["user"] for t in listed} == {"olga", "mia", "sp-ci"}  # not nlp's
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert all(t["state"] == "active" for t in listed)
    assert api.get("/api/v1/admin/tokens", headers=as_(member)).status_code == 403
    mia = next(t["id"] for t in listed if t["user"] == "mia")
    assert api.get("/api/v1/whoami", headers=as_(member)).json()["user"] == "mia"
    assert api.delete(f"/api/v1/admin/tokens/{mia}", headers=as_(owner)).json()["state"] == "revoked"
    assert api.get("/api/v1/whoami", headers=as_(member)).status_code == 401  # at once
    audited = api.post("/api/v1/jobs", json=spec("audited", "vision"), headers=as_(made["token"])).json()["id"]
    api.post("/api/v1/jobs", json=spec("refused", "nlp"), headers=as_(made["token"]))
    log = api.get("/api/v1/audit", headers=as_(owner)).json()
    assert {r["workspace"] for r in log} == {"vision"}  # an owner reads its workspace's records only
    submits = [(r["user"], r["status"], r["target"]) for r in log if r["path"] == "/api/v1/jobs"]
    assert submits == [("sp-ci", 201, audited)]
    assert any(r["method"] == "DELETE" and r["user"] == "olga" and r["status"] == 200 for r in log)
    everything = api.get("/api/v1/audit").json()  # the admin's: every workspace, refusals too
    assert ("sp-ci", 403, "nlp") in {(r["user"], r["status"], r["workspace"]) for r in everything}
    assert all(r["client"] for r in everything)


def test_datastores_belong_to_a_workspace(api, tmp_path):
    vision = make_token(api, "carl", "vision", "contributor")
    nlp = make_token(api, "nils", "nlp", "contributor")
    uses = {"inputs": {"data": {"path": "datastore://vision/digits"}}}
    assert api.post("/api/v1/jobs", json=spec("ok", "vision", **uses), headers=as_(vision)).status_code == 201
    r = api.post("/api/v1/jobs", json=spec("no", "nlp", **uses), headers=as_(nlp))
    assert r.status_code == 400 and "datastore 'vision' belongs to workspace 'vision'" in r.json()["detail"]
    r = api.post("/api/v1/jobs", json=spec("no2", "nlp", outputs={"m": {"path": str(tmp_path / "vision-data/m")}}),
                 headers=as_(nlp))
    assert r.status_code == 400 and "outputs.m.path" in r.json()["detail"]
    shared = {"inputs": {"data": {"path": "datastore://shared/x"}}}
    assert api.post("/api/v1/jobs", json=spec("sh", "nlp", **shared), headers=as_(nlp)).status_code == 201
    names = {d["name"] for d in api.get("/api/v1/datastores", headers=as_(nlp)).json()["datastores"]}
    assert names == {"shared"}


def test_a_web_session_carries_its_identity(api):
    vision_r = make_token(api, "rita", "vision", "reader")
    mine = api.post("/api/v1/jobs", json=spec("mine", "vision")).json()["id"]
    theirs = api.post("/api/v1/jobs", json=spec("theirs", "nlp")).json()["id"]
    web = TestClient(api.app, base_url="http://testserver")
    assert web.post("/web/login", data={"token": vision_r, "next": "/web/jobs"}, follow_redirects=False
                    ).status_code == 303
    page = web.get("/web/jobs").text
    assert mine in page and theirs not in page
    assert web.get(f"/web/jobs/{mine}").status_code == 200
    assert web.get(f"/web/jobs/{theirs}").status_code == 403
    assert web.get("/openapi.json").status_code == 200  # a browser's docs: the cookie
    # a login code carries the identity that asked for it
    url = api.post("/api/v1/login-codes", json={"next": "/web/jobs"}, headers=as_(vision_r)).json()["url"]
    other = TestClient(api.app, base_url="http://testserver")
    assert other.get(url, follow_redirects=False).status_code == 303
    assert other.get(f"/web/jobs/{theirs}").status_code == 403 and other.get(f"/web/jobs/{mine}").status_code == 200
    # revoking the token ends its sessions
    tid = api.get("/api/v1/whoami", headers=as_(vision_r)).json()["token_id"]
    api.delete(f"/api/v1/admin/tokens/{tid}")
    assert web.get("/web/jobs").status_code == 401 and other.get(f"/web/jobs/{mine}").status_code == 401


def test_an_old_store_gets_the_workspace_column(tmp_path):
    """A store written before workspaces: its jobs are in 'default'."""
    from raybatch.state.store import Store

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("""CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL, experiment TEXT NOT NULL, priority INTEGER NOT NULL, state TEXT NOT NULL,
        spec TEXT NOT NULL, code_package TEXT, job_dir TEXT NOT NULL, submitted_at REAL NOT NULL,
        updated_at REAL NOT NULL, started_at REAL, ended_at REAL, exit_code INTEGER, reason TEXT,
        attempt INTEGER NOT NULL DEFAULT 0, user_retries INTEGER NOT NULL DEFAULT 0,
        infra_retries INTEGER NOT NULL DEFAULT 0, cancel_requested REAL);
        INSERT INTO jobs (id, name, experiment, priority, state, spec, job_dir, submitted_at, updated_at)
        VALUES ('rb-old00001', 'old', 'default', 50, 'SUCCEEDED', '{"nodes": 1}', '/x', 1, 1);""")
    db.commit()
    db.close()
    store = Store(tmp_path / "old.db")
    assert store.get_job("rb-old00001")["workspace"] == "default"
    assert [j["id"] for j in store.list_jobs(workspaces=["default"])] == ["rb-old00001"]
    assert store.list_jobs(workspaces=["vision"]) == []
    assert os.path.exists(tmp_path / "old.db")


def test_the_job_file_names_its_workspace():
    assert JobSpec.model_validate({"name": "a", "command": "true"}).workspace == "default"
    assert JobSpec.model_validate({"name": "a", "command": "true", "workspace": "vision"}).workspace == "vision"
    with pytest.raises(ValueError, match="workspace"):
        JobSpec.model_validate({"name": "a", "command": "true", "workspace": "../x"})


# ---- quotas and fair share per workspace -------------------------------------------------------
def test_quotas_and_shares_belong_to_workspaces_experiments_stay_in_default():
    from raybatch.scheduler.policy import job_from_spec, never_admissible, plan
    from raybatch.spec.policy import SchedulerPolicy
    from tests.test_policy import nodes

    cfg = SchedulerPolicy.model_validate({"quotas": {"vision": {"max_nodes": 1}},
                                          "workspaces": {"nlp": {"max_nodes": 2}}})

    def j(jid, seq, experiment="vision", workspace="default", count=1):
        s = JobSpec.model_validate({"name": jid, "command": "true", "experiment": experiment,
                                    "workspace": workspace, "nodes": count, "resources": {"cpus": 4}})
        return job_from_spec(jid, seq, s)

    queued = [j("v1", 1), j("v2", 2), j("n1", 3, workspace="nlp"), j("n2", 4, experiment="other", workspace="nlp"),
              j("n3", 5, workspace="nlp")]
    p = plan(0.0, nodes(8), [], queued, cfg)
    started = {job.id for job, _ in p.start}
    assert {"v1", "n1", "n2"} <= started and not {"v2", "n3"} & started, p
    # the nlp workspace's jobs share one quota whatever their experiment (named 'vision' or not)
    assert p.waiting["n3"].startswith("workspace 'nlp' is at its quota: 2 of 2 node(s)")
    assert p.waiting["v2"].startswith("experiment 'vision' is at its quota")
    assert "workspace 'nlp''s quota of 2" in never_admissible(j("big", 9, workspace="nlp", count=3), cfg)
    with pytest.raises(Exception, match="default"):
        SchedulerPolicy.model_validate({"workspaces": {"default": {"max_nodes": 1}}})


def test_the_policy_file_takes_workspaces(tmp_path):
    from raybatch.spec.policy import load_policy

    (tmp_path / "policy.yaml").write_text("workspaces:\n  nlp: {max_gpus: 4, share: 2}\n")
    assert load_policy(tmp_path / "policy.yaml").quota("workspace:nlp").share == 2
    (tmp_path / "policy.yaml").write_text("workspaces:\n  bad/name: {max_gpus: 4}\n")
    with pytest.raises(Exception, match="workspace name"):
        load_policy(tmp_path / "policy.yaml")


def test_the_audit_log_is_written_in_the_background_and_its_thread_ends_when_idle(tmp_path, monkeypatch):
    from raybatch.server.access import AuditLog
    from raybatch.state.store import Store

    store = Store(tmp_path / "db.sqlite")
    audit = AuditLog(store, period=0.02)
    monkeypatch.setattr(AuditLog, "IDLE_PERIODS", 5)
    audit.record(None, "vision", "POST", "/api/v1/jobs", "10.0.0.1", 401)
    deadline = time.time() + 5
    while not store.audit() and time.time() < deadline:
        time.sleep(0.02)
    assert [(r["status"], r["client"], r["user"]) for r in store.audit()] == [(401, "10.0.0.1", None)]
    while audit._thread is not None and time.time() < deadline:
        time.sleep(0.02)
    assert audit._thread is None  # idle: no thread left behind
    audit.record(None, None, "PUT", "/x", None, 201)
    audit.flush()
    assert len(store.audit()) == 2


def test_audit_records_older_than_the_policys_retention_are_deleted(api, tmp_path):
    """policy.yaml's audit_retention_days (default 90): the server's audit writer deletes
    older records (with its first batch, then hourly), through the real app and policy file."""
    now = time.time()
    api.ctx.store.add_audit([(now - 40 * 86400, "old", None, "vision", "POST", "/api/v1/jobs", "10.0.0.9", 201, None),
                             (now - 20 * 86400, "kept", None, "vision", "POST", "/api/v1/jobs", "10.0.0.9", 201, None)])
    (tmp_path / "policy.yaml").write_text("audit_retention_days: 30\n")
    api.ctx.scheduler.policy_file = tmp_path / "policy.yaml"
    api.ctx.scheduler.load_policy()
    assert api.ctx.scheduler.policy.audit_retention_days == 30
    make_token(api, "ana", "vision", "reader")  # a state-changing request: the writer runs

    def users():
        return [r["user"] for r in api.get("/api/v1/audit").json() if r["path"] == "/api/v1/jobs"]

    deadline = time.time() + 10
    while users() != ["kept"] and time.time() < deadline:
        time.sleep(0.05)
    assert users() == ["kept"]


def test_pruning_deletes_in_batches_and_stops_at_the_first_newer_record(tmp_path):
    from raybatch.state.store import Store

    store = Store(tmp_path / "db.sqlite")
    now = time.time()
    rec = lambda at, user: (at, user, None, None, "POST", "/x", None, 201, None)  # noqa: E731
    store.add_audit([rec(now - 100 - i, f"old{i}") for i in range(25)] + [rec(now, f"new{i}") for i in range(5)])
    assert store.prune_audit(now - 50, batch=10) == 25
    assert sorted(r["user"] for r in store.audit()) == [f"new{i}" for i in range(5)]
    assert store.prune_audit(now - 50, batch=10) == 0


# ---- the review's findings: no way around the workspace of a submit ------------------------------
def test_a_decoy_jobs_key_does_not_choose_the_workspace_checked(api):
    """A single submit with a "jobs" key was read as a batch by the access rule (no
    workspace found, so any contributor passed) while the route queued spec.workspace."""
    eve = make_token(api, "eve", "nlp", "contributor")
    for body in ({"jobs": [], **spec("pwn", "vision")},
                 {"jobs": [spec("x", "nlp")], **spec("pwn", "vision")}):
        r = api.post("/api/v1/jobs", json=body, headers=as_(eve))
        assert r.status_code in (403, 422), (r.status_code, r.text)
    assert not [j for j in api.get("/api/v1/jobs").json() if j["name"] == "pwn"]
    r = api.post("/api/v1/jobs", json={"extra": 1, **spec("ok", "nlp")}, headers=as_(eve))
    assert r.status_code == 422 and "extra" in r.text  # an unknown field is refused, not ignored


def test_a_job_names_no_other_jobs_directory_and_reads_only_its_workspaces_jobs(api, tmp_path):
    """An output in the jobs root made the server serve every job's files, of every workspace."""
    root = api.ctx.jobs_root
    alice = make_token(api, "alice", "vision", "contributor")
    eve = make_token(api, "eve", "nlp", "contributor")
    theirs = api.post("/api/v1/jobs", json=spec("model", "vision"), headers=as_(alice)).json()
    mine = api.post("/api/v1/jobs", json=spec("mine", "nlp"), headers=as_(eve)).json()
    for field, value in (("outputs", {"o": {"path": root}}), ("outputs", {"o": {"path": theirs["job_dir"]}}),
                         ("outputs", {"o": {"path": mine["job_dir"] + "/x"}}), ("output_root", root + "/default"),
                         ("inputs", {"m": {"path": theirs["job_dir"] + "/outputs"}}), ("inputs", {"m": {"path": root}})):
        r = api.post("/api/v1/jobs", json=spec("steal", "nlp", **{field: value}), headers=as_(eve))
        assert r.status_code == 400 and "jobs directory" in r.json()["detail"] or "another workspace" in r.text, \
            (field, value, r.status_code, r.text)
    # a pipeline's next step reads a job of its own workspace (the batch-scoring recipe's model)
    ok = api.post("/api/v1/jobs", json=spec("next", "nlp", inputs={"m": {"path": mine["job_dir"] + "/outputs"}}),
                  headers=as_(eve))
    assert ok.status_code == 201, ok.text
    # '..' cannot make a path look like it is below a shared datastore: it is resolved first
    r = api.post("/api/v1/jobs", json=spec("dots", "nlp", outputs={"o": {"path": f"{tmp_path}/shared/../vision-data"}}),
                 headers=as_(eve))
    assert r.status_code == 400 and "'vision'" in r.json()["detail"], r.text


def test_resume_from_and_key_vaults_stay_in_the_workspace(api):
    alice = make_token(api, "alice", "vision", "contributor")
    eve = make_token(api, "eve", "nlp", "contributor")
    arr = {"array": {"values": ["a", "b"]}, "command": "echo ${{item}}"}
    theirs = api.post("/api/v1/jobs", json=spec("arr", "vision", **arr), headers=as_(alice)).json()
    api.post(f"/api/v1/jobs/{theirs['id']}/cancel", headers=as_(alice))
    r = api.post("/api/v1/jobs", json=spec("again", "nlp", array={"values": ["a", "b"], "resume_from": theirs["id"]},
                          command="echo ${{item}}"),
                 headers=as_(eve))
    assert r.status_code == 400 and "another workspace" in r.json()["detail"], r.text
    # the server reads Key Vault with its own identity: only the vaults policy.yaml gives a workspace
    kv = {"secrets": {"DB": {"keyvault": "visionkv/db-password"}}}
    r = api.post("/api/v1/jobs", json=spec("kv", "nlp", **kv), headers=as_(eve))
    assert r.status_code == 400 and "may name no Key Vault" in r.json()["detail"], r.text
    r = api.post("/api/v1/jobs", json=spec("kv", "nlp", secrets={"DB": {"keyvault": "https://169.254.169.254/secrets/x"}}),
                 headers=as_(eve))
    assert r.status_code == 422 and "not a Key Vault host" in r.text, r.text
    assert api.ctx.scheduler.policy.vault_problem("nlp", "nlpkv") is not None
    from raybatch.spec.policy import SchedulerPolicy

    policy = SchedulerPolicy.model_validate({"key_vaults": {"nlp": ["nlpkv"]}})
    assert policy.vault_problem("nlp", "NLPKV") is None and "not one of" in policy.vault_problem("nlp", "visionkv")
    assert policy.vault_problem("default", "anykv") is None  # a one-team server: 'default' unlisted is any
    # nobody else may call themselves the server owner in the audit log
    r = api.post("/api/v1/admin/tokens", json={"user": "owner", "workspace": "nlp", "role": "reader"})
    assert r.status_code == 400 and "owner token" in r.text, r.text


def test_a_workspace_container_is_its_own_also_through_a_shared_account_key():
    """abfs://<vision's container>@<account> matched the shared datastore of the same account,
    whose key then opened vision's container for any workspace."""
    from raybatch.storage.datastores import Datastores, DatastoresFile

    ds = Datastores(DatastoresFile.model_validate({"datastores": {
        "a-shared": {"url": "az://public", "account": "teamacct", "credential": {"account_key": {"env": "K"}}},
        "vision": {"url": "az://vision-private/data", "account": "teamacct", "workspace": "vision",
                   "credential": {"account_key": {"env": "K"}}}}}))
    assert ds.owner_of("abfs://vision-private@teamacct.dfs.core.windows.net/data/x") == ("vision", "vision")
    assert ds.owner_of("abfs://vision-private@teamacct.dfs.core.windows.net/other") is None  # outside its path
    assert ds.owner_of("abfs://public@teamacct.dfs.core.windows.net/x") is None


def test_cluster_wide_views_hide_other_workspaces_job_ids(api):
    """The queue's reasons ("behind rb-…", "would delay rb-…"), the nodes' jobs and the
    autoscaler's demand named every workspace's job ids to any reader."""
    from raybatch.server import access

    alice = make_token(api, "alice", "vision", "contributor")
    eve = make_token(api, "eve", "nlp", "reader")
    theirs = api.post("/api/v1/jobs", json=spec("v", "vision"), headers=as_(alice)).json()["id"]
    mine = api.post("/api/v1/jobs", json=spec("n", "nlp")).json()["id"]
    seen = access._current.set(api.ctx.tokens.authenticate(eve.encode()))
    try:
        shown = api.ctx.access.redact({"reason": f"behind {theirs} and {mine}", "jobs": [theirs, 3]})
    finally:
        access._current.reset(seen)
    assert shown == {"reason": f"behind a job of another workspace and {mine}", "jobs": [access.OTHER_JOB, 3]}
    assert api.ctx.access.redact(f"behind {theirs}") == f"behind {theirs}"  # outside a request (the owner): as is
    for path in ("/api/v1/queue", "/api/v1/nodes/status", "/api/v1/scheduler"):
        r = api.get(path, headers=as_(eve))
        assert r.status_code == 200 and theirs not in r.text, (path, r.status_code, r.text[:300])
