"""The web view without a cluster: its cookie (who gets one, what it holds, what it opens)
and its escaping of user text. The app is the server's real one (create_app) over a real
store and scheduler; only Ray is replaced by the scheduler tests' fakes."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from raybatch.server.app import ServerContext, create_app
from raybatch.server.web.session import COOKIE, Sessions, safe_next
from raybatch.spec.job import JobSpec
from tests.test_scheduler_loop import FakeCluster, FakeLauncher

TOKEN = "s3cret-token-for-the-web-tests"
EVIL = "<script>alert('pwned')</script>"


@pytest.fixture
def web(tmp_path):
    from raybatch.scheduler.loop import Scheduler
    from raybatch.state.store import Store

    store = Store(tmp_path / "db.sqlite")
    sched = Scheduler(store, FakeLauncher(), FakeCluster(1))
    ctx = ServerContext(store=store, scheduler=sched, jobs_root=str(tmp_path / "jobs"), code_root=tmp_path / "code")
    with TestClient(create_app(ctx, TOKEN), base_url="http://testserver") as c:
        c.ctx = ctx
        yield c


def add_job(ctx, name="j", experiment="default", command="true", job_root="/tmp/rb-web-test", **fields):
    spec = JobSpec.model_validate({"name": "j", "command": command, "experiment": experiment, **fields})
    return ctx.store.create_job(name=name, experiment=experiment, priority=spec.priority_value,
                                spec=spec.model_dump(mode="json"), job_dir_for=lambda i: f"{job_root}/{i}")


def log_in(c) -> None:
    r = c.post("/web/login", data={"token": TOKEN, "next": "/web/jobs"}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_pages_without_a_session_go_to_the_login_form(web):
    for path in ("/web/", "/web/jobs?state=QUEUED", "/web/jobs/rb-12345678"):
        r = web.get(path, follow_redirects=False)  # no session: a 401 with the login form, back here after
        assert r.status_code == 401 and 'name="token"' in r.text, path
        assert f'name="next" value="{path.replace("&", "&amp;")}"' in r.text, path
    assert web.get("/web/jobs/rb-1/logs").status_code == 401  # the script's JSON: a 401, not a redirect
    form = web.get("/web/login")
    assert form.status_code == 200 and 'name="token"' in form.text


def test_a_wrong_token_is_a_401_and_no_cookie(web):
    for given in ("", "wrong", TOKEN + "x"):
        r = web.post("/web/login", data={"token": given, "next": "/web/"}, follow_redirects=False)
        assert r.status_code == 401 and "Wrong token" in r.text
        assert "set-cookie" not in r.headers
    assert web.get("/web/", follow_redirects=False).status_code == 401


def test_the_cookie_is_a_session_id_httponly_strict_and_never_the_token(web):
    r = web.post("/web/login", data={"token": TOKEN, "next": "/web/jobs"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/web/jobs"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(COOKIE + "=")
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
    assert "httponly" in attrs and attrs["samesite"].lower() == "samesite=strict" and attrs["path"] == "Path=/"
    value = web.cookies.get(COOKIE)
    assert value and TOKEN not in value and len(value) >= 32
    assert web.get("/web/jobs").status_code == 200
    # the cookie opens the web view only: the API still wants the bearer token
    assert web.get("/api/v1/jobs").status_code == 401
    assert web.get("/api/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # a forged session id opens nothing
    web.cookies.set(COOKIE, "forged-" + value[7:])
    assert web.get("/web/jobs", follow_redirects=False).status_code == 401


def test_logout_ends_the_session_on_the_server(web):
    log_in(web)
    old = web.cookies.get(COOKIE)
    assert web.get("/web/logout", follow_redirects=False).status_code == 405  # a link cannot log out
    assert web.post("/web/logout", follow_redirects=False).status_code == 303
    web.cookies.set(COOKIE, old)  # the browser kept it anyway
    assert web.get("/web/", follow_redirects=False).status_code == 401


def test_a_login_code_works_once_and_for_its_own_kind_only(web):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    url = web.post("/api/v1/login-codes", json={"next": "/web/jobs?state=QUEUED", "kind": "web"},
                   headers=bearer).json()["url"]
    r = web.get(url, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/web/jobs?state=QUEUED"
    assert "httponly" in r.headers["set-cookie"].lower()
    assert web.get("/web/jobs").status_code == 200
    web.cookies.clear()
    again = web.get(url, follow_redirects=False)
    assert again.status_code == 401 and "set-cookie" not in again.headers
    dash = web.post("/api/v1/login-codes", json={"next": "/", "kind": "ray-dashboard"}, headers=bearer).json()
    code = dash["url"].rsplit("/", 1)[-1]
    assert web.get(f"/login/{code}", follow_redirects=False).status_code == 401


def test_after_login_the_browser_stays_on_this_server():
    assert safe_next("/web/jobs/rb-1?attempt=2") == "/web/jobs/rb-1?attempt=2"
    for bad in ("//evil.example/x", "/\\evil.example", "https://evil.example/", "", None, "web/"):
        assert safe_next(bad) == "/web/"


def test_user_text_is_escaped_on_every_page(web):
    job = add_job(web.ctx, name=EVIL, experiment="exp", command="echo '<img src=x onerror=alert(1)>'")
    log_in(web)
    for path in ("/web/", "/web/jobs", f"/web/jobs?q={EVIL}", f"/web/jobs/{job['id']}"):
        page = web.get(path)
        assert page.status_code == 200, path
        assert EVIL not in page.text and "<img src=x" not in page.text, path
        assert "&lt;script&gt;alert(" in page.text, path
        assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in web.get(f"/web/jobs/{job['id']}").text


def test_the_job_list_pages_by_submission_and_filters(web):
    for k in range(120):
        add_job(web.ctx, name=f"train-{k}" if k % 2 else f"score-{k}", experiment="a" if k < 60 else "b")
    log_in(web)
    first = web.get("/web/jobs").text
    assert "train-119" in first and "score-70" in first and "train-69" not in first  # newest 50
    rows = first.count('href="/web/jobs/rb-')
    assert rows == 50
    older = first.split('<a href="/web/jobs?before=')[1].split('"')[0]
    second = web.get(f"/web/jobs?before={older}").text
    assert "train-69" in second and "train-119" not in second
    only_a = web.get("/web/jobs?experiment=a&q=train").text
    assert only_a.count('href="/web/jobs/rb-') == 30 and "score-" not in only_a
    assert web.get("/web/jobs?state=BOGUS").status_code == 400


def test_sessions_expire_and_stay_bounded(monkeypatch):
    from raybatch.server.web import session

    s = Sessions("t", ttl_s=0.05)
    sid = s.start()
    assert s.valid(sid) and not s.valid("other") and not s.valid(None)
    time.sleep(0.1)
    assert not s.valid(sid)
    monkeypatch.setattr(session, "MAX_SESSIONS", 3)
    s = Sessions("t")
    ids = [s.start() for _ in range(5)]
    assert [s.valid(i) for i in ids] == [False, False, True, True, True]
    assert s.token_ok("t") and s.token_ok(" t\n") and not s.token_ok("") and not s.token_ok("T")


def test_the_sweep_page_ranks_and_plots_the_trials(web, tmp_path):
    """The trials as the sweep's driver journals them (TrialJournal): ranked best first,
    drawn by raybatch/sweep/plot.py."""
    from raybatch.sweep.trials import TrialJournal, TrialRecord
    from tests.test_arrays import local

    job = add_job(web.ctx, name="lr-sweep", command="python t.py --lr ${{search_space.lr}}", job_root=str(tmp_path),
                  sweep={"search_space": {"lr": {"type": "uniform", "min_value": 0, "max_value": 1}},
                         "objective": {"primary_metric": "accuracy", "goal": "maximize"}})
    journal = TrialJournal(local(tmp_path / job["id"] / "trials"))
    for n, (lr, acc) in enumerate(((0.1, 0.71), (0.5, 0.93), (0.9, None))):
        rec = TrialRecord(n, {"lr": lr}, state="done" if acc else "failed", runs=1, exit_code=0 if acc else 2,
                          message="" if acc else "<b>diverged</b>")
        if acc is not None:
            rec.note(acc, maximize=True)
        journal.ended(rec)
    log_in(web)
    text = web.get(f"/web/jobs/{job['id']}/trials").text
    rows = text.split('<table class="trials" id="trials">')[1].split("</table>")[0].split("<tr")[2:]
    assert [r.split("<td>")[2].split("<")[0] for r in rows] == [f"{job['id']}.t1", f"{job['id']}.t0",
                                                               f"{job['id']}.t2"]
    assert rows[0].split("<td>")[1].startswith("1<") and "0.93" in rows[0]
    assert text.count("<svg") == 2 and "accuracy" in text and "&lt;b&gt;diverged&lt;/b&gt;" in text
    assert f'href="/web/jobs/{job["id"]}/trials"' in web.get(f"/web/jobs/{job['id']}").text
    plain = add_job(web.ctx, name="plain")
    assert web.get(f"/web/jobs/{plain['id']}/trials").status_code == 400


def test_the_array_page_counts_and_pages_the_items(web, tmp_path):
    """Items as the array's driver records them (ItemStore): progress, counts, a state filter."""
    from raybatch.runtime.items import Item, ItemStore, Record
    from tests.test_arrays import local

    job = add_job(web.ctx, name="scoring", job_root=str(tmp_path), array={"count": 5})
    items = ItemStore(local(tmp_path / job["id"] / "items"))
    items.write_manifest([Item(i, str(i), str(i)) for i in range(5)])
    items.write_record(Record(0, "done", ["0"], 0, runs=1, job_id=job["id"], seconds=1.5))
    items.write_record(Record(1, "done", ["1"], 0, runs=1, job_id=job["id"], seconds=2.0))
    items.write_record(Record(3, "failed", ["3"], 3, runs=2, message="USER_ERROR: exit 3"))
    log_in(web)
    text = web.get(f"/web/jobs/{job['id']}/items").text
    assert '<progress id="progress" max="5" value="3">' in text and "3 / 5 task(s) finished" in text
    assert "done 2" in text and "failed 1" in text and "pending 2" in text
    assert text.count('<tr class="item-') == 5
    failed = web.get(f"/web/jobs/{job['id']}/items?state=failed").text
    assert failed.count('<tr class="item-') == 1 and "USER_ERROR: exit 3" in failed
    assert web.get(f"/web/jobs/{job['id']}/items?state=nope").status_code == 400
