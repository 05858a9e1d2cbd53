"""The Ray dashboard as users meet it, and a Ray driver of their own next to raybatch: a real
one-node Ray cluster with its dashboard (token auth on, as Ray 2.60 starts local clusters), a
real raybatch server, the CLI as users run it and a real browser.

- each attempt's Ray job is named ``<name> · <id> · attempt <n>`` in Ray's own job list;
- ``raybatch dashboard ID`` gives a link that lands the browser on the attempt's page in Ray's
  dashboard with no token dialog (a browser without it gets the dialog), works once, and never
  shows the token; a link opened on another host name than the dashboard's is not spent;
- ``show`` links the attempt's page;
- ``eval "$(raybatch env)"`` lets README's Ray driver snippet connect and use raybatch.Client
  inside a Ray task (without it, Ray refuses the driver).

The pure helpers (the job page's path, the Ray job's name, the exports) are tested first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from raybatch.cli.dashboard import env_exports
from raybatch.runtime.launcher import ray_job_name
from raybatch.runtime.protocol import ray_job_id
from raybatch.server.routes.dashboard import job_page, job_page_path
from tests.browser import browser, screenshot  # noqa: F401
from tests.conftest import RAYBATCH, ROOT, RayTestCluster, ServerProcess, run_cli

pytestmark = pytest.mark.timeout(180)


# ---- pure helpers ---------------------------------------------------------------------------
def test_job_page_is_the_dashboards_hash_route():
    assert job_page_path("raybatch-rb-1-2") == "/#/jobs/raybatch-rb-1-2"
    assert job_page("http://127.0.0.1:8265/", "a b/c") == "http://127.0.0.1:8265/#/jobs/a%20b%2Fc"
    assert job_page(None, "x") is None


def test_ray_job_name():
    assert ray_job_name("train", "rb-abc", 3) == "train · rb-abc · attempt 3"


def test_env_exports_name_files_never_tokens(tmp_path):
    info = {"ray_address": "127.0.0.1:6379", "auth_mode": "token", "token_path": "/srv/ray/auth_token"}
    home_token = tmp_path / "token"
    exports, notes = env_exports(info, "http://127.0.0.1:8765", "/home/u/.ray/auth_token", home_token)
    assert exports == {"RAY_ADDRESS": "127.0.0.1:6379", "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN_PATH": "/home/u/.ray/auth_token",
                       "RAYBATCH_ADDRESS": "http://127.0.0.1:8765", "RAYBATCH_HOME": str(tmp_path)}
    # auth off: no token mode; the raybatch token from RAYBATCH_TOKEN/--token: said, not printed
    exports, notes = env_exports({**info, "auth_mode": "disabled"}, "http://h:1", None, None)
    assert exports == {"RAY_ADDRESS": "127.0.0.1:6379", "RAYBATCH_ADDRESS": "http://h:1"}
    assert any("not printed" in n for n in notes)
    # token mode but no token file on this machine: no path invented, a note says what to set
    exports, notes = env_exports(info, "http://h:1", None, None)
    assert "RAY_AUTH_TOKEN_PATH" not in exports and any("RAY_AUTH_TOKEN_PATH" in n for n in notes)


# ---- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = RayTestCluster(nodes=1, cpus=2)
    server = client = None
    try:  # whatever fails in the set-up, the cluster and the server are stopped
        server = ServerProcess(cluster, tmp_path_factory.mktemp("dashboard")).start()
        client = server.client()
        job = client.submit({"name": "dash-demo", "experiment": "tests", "resources": {"cpus": 1},
                             "command": "echo hello from the dashboard test"})
        done = client.wait(job.id, timeout=120)
        assert done.state.value == "SUCCEEDED", done
        yield {"cluster": cluster, "server": server, "client": client, "job": done, "sid": ray_job_id(done.id, 1),
               "ray_token": (Path.home() / ".ray" / "auth_token").read_text().strip()}
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        cluster.shutdown()


def _no_secret(env, *texts: str) -> None:
    for text in texts:
        assert env["ray_token"] not in text, "the Ray token was shown"
        assert env["server"].token not in text, "the raybatch token was shown"


def test_ray_job_is_named_and_show_links_its_page(env):
    from ray.job_submission import JobSubmissionClient

    jobs = {j.submission_id: j for j in JobSubmissionClient(env["cluster"].dashboard_url).list_jobs()}
    meta = jobs[env["sid"]].metadata
    assert meta["job_name"] == f"dash-demo · {env['job'].id} · attempt 1"
    assert meta["raybatch_job_id"] == env["job"].id and meta["raybatch_attempt"] == "1"

    page = f"{env['cluster'].dashboard_url}/#/jobs/{env['sid']}"
    shown = run_cli(env["server"], "show", env["job"].id, check=True)
    assert page in shown.stdout
    detail = json.loads(run_cli(env["server"], "show", env["job"].id, "-o", "json", check=True).stdout)
    assert detail["dashboard_url"] == page


def test_dashboard_link_logs_the_browser_in_once(env, browser, tmp_path, monkeypatch):  # noqa: F811
    # --open hands the link to Python's webbrowser, which runs $BROWSER: here, one that notes it
    opener = tmp_path / "browser.sh"
    opener.write_text(f'#!/bin/sh\necho "$1" > {tmp_path}/opened\n')
    opener.chmod(0o755)
    monkeypatch.setenv("BROWSER", f"{opener} %s")
    p = run_cli(env["server"], "dashboard", env["job"].id, "--open", "-o", "json", check=True)
    _no_secret(env, p.stdout, p.stderr)
    out = json.loads(p.stdout)
    assert (tmp_path / "opened").read_text().strip() == out["url"]
    page = f"{env['cluster'].dashboard_url}/#/jobs/{env['sid']}"
    assert out["page"] == page and out["login"] is True and out["ray_job"] == env["sid"]
    assert re.fullmatch(re.escape(env["server"].url) + r"/ray-login/[A-Za-z0-9_-]{20,}", out["url"]), out["url"]

    # a browser that never logged in meets Ray's token dialog on that page
    stranger = browser.new_context()
    tab = stranger.new_page()
    tab.goto(page)
    tab.wait_for_selector("#token-auth-dialog-title", timeout=30_000)
    stranger.close()

    ctx = browser.new_context()
    tab = ctx.new_page()
    tab.goto(out["url"])
    tab.wait_for_url(page, timeout=30_000)
    tab.get_by_text("dash-demo", exact=False).first.wait_for(timeout=30_000)  # the job's name on its page
    tab.get_by_text(env["sid"], exact=False).first.wait_for(timeout=30_000)
    assert tab.locator("#token-auth-dialog-title").count() == 0
    screenshot(tab, "ray-dashboard-job-page-logged-in")
    _no_secret(env, tab.url, tab.content())
    cookies = {c["name"]: c for c in ctx.cookies()}
    assert cookies["ray-authentication-token"]["httpOnly"]
    # Ray's jobs list names the attempt
    tab.goto(env["cluster"].dashboard_url + "/#/jobs")
    tab.get_by_text(f"dash-demo · {env['job'].id} · attempt 1").first.wait_for(timeout=30_000)
    screenshot(tab, "ray-dashboard-jobs-list-names")
    ctx.close()

    # the link worked once: again, it logs nobody in
    again = httpx.get(out["url"], follow_redirects=False, timeout=10)
    assert again.status_code == 404 and "set-cookie" not in again.headers
    ctx = browser.new_context()
    tab = ctx.new_page()
    tab.goto(out["url"])
    assert tab.url == out["url"] and "expired" in tab.content()
    assert not ctx.cookies()
    ctx.close()


def test_dashboard_link_on_another_host_name_is_not_spent(env):
    p = run_cli(env["server"], "dashboard", check=True)
    _no_secret(env, p.stdout, p.stderr)
    url = p.stdout.strip()
    assert "/ray-login/" in url and "\n" not in url
    elsewhere = httpx.get(url.replace("127.0.0.1", "localhost"), follow_redirects=False, timeout=10)
    assert elsewhere.status_code == 409 and url in elsewhere.text and "set-cookie" not in elsewhere.headers
    right = httpx.get(url, follow_redirects=False, timeout=10)
    assert right.status_code == 303, right.text
    assert right.headers["location"] == env["cluster"].dashboard_url + "/#/overview"
    assert "ray-authentication-token=" in right.headers["set-cookie"]


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ray-driver-snippet:begin[^>]*-->\s*```python\n(.*?)```\s*<!-- ray-driver-snippet:end -->",
                      text, re.S)
    assert block, "README.md lost its ray-driver-snippet markers"
    return block.group(1)


def test_env_lets_the_readme_ray_driver_use_raybatch_in_a_task(env, tmp_path):
    server = env["server"]
    # a user's shell: where the raybatch server is and its home (token file); nothing about Ray
    shell = {k: v for k, v in os.environ.items()
             if not k.startswith(("RAY_", "RAYBATCH_")) and k not in ("PYTHONPATH",)}
    shell.update(RAYBATCH_ADDRESS=server.url, RAYBATCH_HOME=str(server.state_dir),
                 PATH=f"{Path(sys.executable).parent}:{shell.get('PATH', '')}")
    printed = subprocess.run([RAYBATCH, "env"], env=shell, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    _no_secret(env, printed.stdout, printed.stderr)
    lines = [ln for ln in printed.stdout.splitlines() if ln and not ln.startswith("#")]
    assert all(ln.startswith("export ") for ln in lines), printed.stdout
    assert f"export RAY_ADDRESS={env['cluster'].address}" in lines
    assert "export RAY_AUTH_MODE=token" in lines
    as_json = json.loads(subprocess.run([RAYBATCH, "env", "-o", "json"], env=shell, capture_output=True,
                                        text=True, timeout=60, check=True).stdout)
    assert as_json["exports"]["RAYBATCH_HOME"] == str(server.state_dir.resolve())
    assert Path(as_json["exports"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip() == env["ray_token"]

    snippet = tmp_path / "driver.py"
    snippet.write_text(_readme_snippet())
    # (without the exports Ray 2.60 refuses this driver: InvalidAuthToken, then ~20 s of retries
    # before a ConnectionError; too slow to show here)
    run = subprocess.run(["bash", "-c", f'eval "$(raybatch env)" && exec python {snippet}'], env=shell,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{env['job'].id} dash-demo SUCCEEDED" in run.stdout
    _no_secret(env, run.stdout, run.stderr)
