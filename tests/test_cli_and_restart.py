"""The CLI as users run it (a real `raybatch` process against a real server), and
a server killed with SIGKILL and restarted on the same store."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.conftest import RAYBATCH, RECIPES, ServerProcess, run_cli

pytestmark = pytest.mark.timeout(240)


def cli(server, *args, check=False, timeout=120):
    return run_cli(server, *args, check=check, timeout=timeout)


def write_job(tmp_path, name, **fields):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "experiment": "cli", **fields}))
    return path


def test_submit_wait_exit_code_and_json(server, tmp_path):
    ok = cli(server, "submit", str(RECIPES / "hello-custom" / "job.yaml"), "--wait", check=True)
    job_id = ok.stdout.splitlines()[0].strip()
    assert job_id.startswith("rb-")
    assert "logs: " in ok.stdout
    bad = write_job(tmp_path, "exit3", command="echo to-stderr >&2; exit 3")
    p = cli(server, "submit", str(bad), "--wait")
    assert p.returncode == 3, p.stdout + p.stderr
    failed_id = p.stdout.splitlines()[0].strip()
    assert cli(server, "wait", failed_id).returncode == 3
    assert cli(server, "logs", failed_id, "--stderr", check=True).stdout == "to-stderr\n"
    listed = json.loads(cli(server, "list", "-o", "json", check=True).stdout)
    by_id = {j["id"]: j for j in listed}
    assert by_id[job_id]["state"] == "SUCCEEDED" and by_id[failed_id]["exit_code"] == 3
    shown = json.loads(cli(server, "show", job_id, "-o", "json", check=True).stdout)
    assert [t["to_state"] for t in shown["transitions"]] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert shown["attempts"][0]["ranks"][0]["node_id"]
    human = cli(server, "show", job_id, check=True).stdout
    assert "History" in human and "STARTING -> RUNNING" in human.replace("  ", " ").replace("  ", " ")


def test_set_overrides_and_cancel_via_cli(server, tmp_path):
    path = write_job(tmp_path, "sleeper", command="sleep 100")
    p = cli(server, "submit", str(path), "--set", "nodes=7", "--set", "priority=low", check=True)
    job_id = p.stdout.strip()
    shown = json.loads(cli(server, "show", job_id, "-o", "json", check=True).stdout)
    assert shown["spec"]["nodes"] == 7 and shown["priority"] == 250 and shown["state"] == "QUEUED"
    out = cli(server, "cancel", job_id, check=True).stdout
    assert "CANCELLED" in out
    assert cli(server, "wait", job_id).returncode == 130


def test_cli_errors_are_clear(server, tmp_path):
    p = cli(server, "show", "rb-nosuch")
    assert p.returncode == 1 and "no job with id 'rb-nosuch'" in p.stderr
    env = {**os.environ, "RAYBATCH_ADDRESS": server.url, "RAYBATCH_TOKEN": "wrong"}
    p = subprocess.run([RAYBATCH, "list"], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "bearer token" in p.stderr
    p = cli(server, "logs", "rb-nosuch")
    assert p.returncode == 1
    for cmd in (["--help"], ["submit", "--help"], ["list", "--help"], ["show", "--help"], ["logs", "--help"],
                ["cancel", "--help"], ["wait", "--help"], ["up", "--help"], ["down", "--help"]):
        assert cli(server, *cmd).returncode == 0, cmd


def test_token_file_is_private(server):
    assert (server.state_dir / "token").stat().st_mode & 0o777 == 0o600


def test_server_killed_and_restarted_keeps_queued_jobs(ray_cluster, tmp_path):
    srv = ServerProcess(ray_cluster, tmp_path).start()
    c = srv.client()
    queued = [c.submit({"name": f"big-{i}", "nodes": 5 + i, "command": "true"}).id for i in range(4)]
    cancelled = c.submit({"name": "gone", "nodes": 9, "command": "true"}).id
    c.cancel(cancelled)
    token = srv.token
    srv.kill(signal.SIGKILL)
    restarted = ServerProcess(ray_cluster, tmp_path).start()  # same state dir, new port
    try:
        assert restarted.token == token
        c2 = restarted.client()
        jobs = {j.id: j for j in c2.list()}
        assert set(jobs) == set(queued) | {cancelled}
        assert all(jobs[j].state == "QUEUED" for j in queued)
        assert jobs[cancelled].state == "CANCELLED"
        # still scheduled after the restart: a job that fits runs
        ok = c2.submit({"name": "after-restart", "command": "echo alive"})
        # the queue is strict: clear the unfittable head so the new job can start
        for j in queued:
            c2.cancel(j)
        assert c2.wait(ok.id, timeout=60).state == "SUCCEEDED"
    finally:
        restarted.stop()
