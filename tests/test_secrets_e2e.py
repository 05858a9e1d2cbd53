"""Job secrets end to end: a real 2-node Ray cluster, a real server process, the CLI as
users run it. A job whose secrets come from the submitting shell's environment, a file
next to the job file and the file itself runs on both nodes; its script checks every
value is in its environment (by hash: the values are nowhere in its command or
environment variables) and prints them. The values must then be nowhere else: not in
the captured output (``***``), ``show``/``list -o json``, the web view, the server's
state directory (store, WAL, attempt files, server log), the Ray job's metadata,
runtime_env and driver log, nor any log of the Ray cluster. A Batch AI job.json with
``properties.secrets`` goes through the same CLI."""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import RayTestCluster, ServerProcess, run_cli, stop_everything

pytestmark = pytest.mark.timeout(180)

RANK_SCRIPT = """\
import hashlib, os, sys, time
rank = os.environ["RANK"]
bad = [name for name, digest in (item.split("=") for item in os.environ["EXPECT"].split(","))
       if hashlib.sha256(os.environ.get(name, "").encode()).hexdigest() != digest]
plain = os.environ["PLAIN_SECRET"]
print(f"rank {rank} plain: {plain}", flush=True)
sys.stdout.write(f"rank {rank} split: {plain[:7]}")  # one value in two writes, 0.3 s apart
sys.stdout.flush()
time.sleep(0.3)
sys.stdout.write(plain[7:] + " end\\n")
sys.stdout.flush()
print(f"rank {rank} env: {os.environ['ENV_SECRET']} file: {os.environ['FILE_SECRET']}", file=sys.stderr, flush=True)
print(f"rank {rank} missing or wrong: {bad}", file=sys.stderr, flush=True)
sys.exit(7 if bad else 0)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = RayTestCluster(nodes=2)
    state = tmp_path_factory.mktemp("secrets")
    server = ServerProcess(cluster, state).start()
    box = {"cluster": cluster, "server": server, "state": state}
    yield box
    try:
        stop_everything(server)
    finally:
        server.stop()
        cluster.shutdown()


def cli(env, *args):
    return run_cli(env["server"], *args, check=True)


def files_containing(root: Path, values: list[str]) -> list[str]:
    """Every file below ``root`` holding one of ``values`` (as bytes)."""
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                hits += [f"{p}: {v[:6]}..." for v in values if v.encode() in data]
        except OSError:
            pass
    return hits


def test_secrets_reach_the_ranks_and_nothing_else(env, tmp_path, monkeypatch):
    server, state = env["server"], env["state"]
    values = {name: f"rbsec-{name.lower()}-{secrets.token_hex(10)}" for name in ("PLAIN_SECRET", "ENV_SECRET",
                                                                                  "FILE_SECRET")}
    monkeypatch.setenv("RB_E2E_SECRET_SOURCE", values["ENV_SECRET"])  # the submitting shell's
    (tmp_path / "token.txt").write_text(values["FILE_SECRET"] + "\n")
    (tmp_path / "check.py").write_text(RANK_SCRIPT)
    expect = ",".join(f"{k}={hashlib.sha256(v.encode()).hexdigest()}" for k, v in values.items())
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "secrets-e2e", "nodes": 2, "resources": {"cpus": 1}, "max_wall_clock": "2m",
        "command": f"{sys.executable} {tmp_path / 'check.py'}", "environment": {"EXPECT": expect},
        "secrets": {"PLAIN_SECRET": values["PLAIN_SECRET"], "ENV_SECRET": {"env": "RB_E2E_SECRET_SOURCE"},
                    "FILE_SECRET": {"file": "token.txt"}}}))
    job_id = cli(env, "submit", str(job)).stdout.strip()
    done = server.client().wait(job_id, timeout=120, poll=0.3)
    assert done.state == "SUCCEEDED", (done.reason, cli(env, "logs", job_id, "--stderr").stdout)
    every = list(values.values())

    # in the ranks' environment on both nodes, masked in what they printed
    for rank in (0, 1):
        out = cli(env, "logs", job_id, "--rank", str(rank)).stdout
        err = cli(env, "logs", job_id, "--rank", str(rank), "--stderr").stdout
        assert f"rank {rank} plain: ***\nrank {rank} split: *** end\n" in out, out
        assert f"rank {rank} env: *** file: ***\nrank {rank} missing or wrong: []" in err, err
        assert not [v for v in every if v in out + err]
    assert len({r.node_id for r in done.attempts[-1].ranks}) == 2  # two nodes

    # never shown: show / list -o json, the web view
    shown = json.loads(cli(env, "show", job_id, "-o", "json").stdout)
    assert shown["spec"]["secrets"] == {"PLAIN_SECRET": "***", "ENV_SECRET": "***", "FILE_SECRET": "***"}
    listed = cli(env, "list", "-o", "json").stdout
    text = cli(env, "show", job_id).stdout
    with httpx.Client(base_url=server.url, follow_redirects=True) as web:
        web.post("/web/login", data={"token": server.token, "next": f"/web/jobs/{job_id}"})
        page = web.get(f"/web/jobs/{job_id}")
        assert page.status_code == 200 and "secrets-e2e" in page.text
    for where, what in (("show -o json", json.dumps(shown)), ("list -o json", listed), ("show", text),
                        ("web view", page.text)):
        assert not [v for v in every if v in what], where

    # nowhere on the server: store (and its WAL), attempt files, the server log, the job's logs
    assert (state / "raybatch.db").exists() and (state / "server.log").exists()
    assert not (state / "attempts" / job_id / "1" / "secrets.json").exists()  # the driver removed it
    assert files_containing(state, every) == []

    # not in Ray: the job's metadata, runtime_env, entrypoint, driver log; no log of the cluster
    from ray.job_submission import JobSubmissionClient

    ray_jobs = JobSubmissionClient(env["cluster"].dashboard_url)
    sid = done.attempts[-1].ray_job_id
    info = ray_jobs.get_job_info(sid)
    assert info.metadata["raybatch_job_id"] == job_id
    assert not [v for v in every if v in json.dumps([info.metadata, info.runtime_env, info.entrypoint])]
    driver_log = ray_jobs.get_job_logs(sid)
    assert "rank 0 plain: ***" in driver_log and not [v for v in every if v in driver_log]
    session = Path(env["cluster"].cluster.head_node.get_session_dir_path())
    assert files_containing(session / "logs", every) == []


def test_batchai_job_with_properties_secrets(env, tmp_path):
    """Batch AI's properties.secrets, submitted as the job.json it is."""
    value = f"rbsec-bai-{secrets.token_hex(10)}"
    doc = {"properties": {
        "nodeCount": 1, "stdOutErrPathPrefix": str(tmp_path / "logs"),
        "customToolkitSettings": {"commandLine": 'echo "bai: $BAI_SECRET" && test -n "$BAI_SECRET"'},
        "secrets": [{"name": "BAI_SECRET", "value": value}]}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    job_id = cli(env, "submit", str(path)).stdout.strip()
    done = env["server"].client().wait(job_id, timeout=90, poll=0.3)
    assert done.state == "SUCCEEDED", done.reason
    assert cli(env, "logs", job_id).stdout == "bai: ***\n"
    shown = cli(env, "show", job_id, "-o", "json").stdout
    assert json.loads(shown)["spec"]["secrets"] == {"BAI_SECRET": "***"} and value not in shown
    assert files_containing(env["state"], [value]) == [] and files_containing(tmp_path / "logs", [value]) == []


def test_array_tasks_on_warm_slots_get_the_secrets(env, tmp_path):
    """An array job's tasks run in slots (their own gangs, runtime.slots): each task's process
    gets the secrets and its log is masked like a plain job's."""
    value = f"rbsec-array-{secrets.token_hex(10)}"
    job = tmp_path / "array.yaml"
    job.write_text(yaml.safe_dump({
        "name": "secrets-array", "resources": {"cpus": 1}, "max_wall_clock": "2m",
        "array": {"count": 2, "max_concurrent": 2, "item_timeout": "60s"},
        "command": 'echo "item $RAYBATCH_ITEM: $ARRAY_SECRET" && test "$(printf %s "$ARRAY_SECRET" | sha256sum '
                   f'| cut -c1-64)" = {hashlib.sha256(value.encode()).hexdigest()}',
        "secrets": {"ARRAY_SECRET": value}}))
    job_id = cli(env, "submit", str(job)).stdout.strip()
    done = env["server"].client().wait(job_id, timeout=90, poll=0.3)
    assert done.state == "SUCCEEDED", done.reason
    for item in (0, 1):
        assert cli(env, "logs", job_id, "--item", str(item)).stdout == f"item {item}: ***\n"
    assert files_containing(env["state"], [value]) == []


def test_the_api_seals_values_sent_inside_the_spec_and_refuses_a_name_without_one(env):
    """An API caller (not the SDK) may send a value inside the spec: it is sealed and shown as
    *** all the same. A *** (how a value is shown) is not a value; an unread {env:} neither."""
    server, value = env["server"], f"rbsec-api-{secrets.token_hex(10)}"
    headers = {"Authorization": f"Bearer {server.token}"}
    spec = {"name": "secrets-api", "command": "test -n \"$API_SECRET\"", "secrets": {"API_SECRET": value}}
    with httpx.Client(base_url=server.url + "/api/v1", headers=headers, timeout=30) as api:
        r = api.post("/jobs", json={"spec": spec})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert api.get(f"/jobs/{job_id}").json()["spec"]["secrets"] == {"API_SECRET": "***"}
        for secrets_, words in (({"API_SECRET": "***"}, "secrets.API_SECRET: no value was sent"),
                                ({"API_SECRET": {"env": "HOME"}}, "is read by the client at submit")):
            bad = api.post("/jobs", json={"spec": {**spec, "secrets": secrets_}})
            assert bad.status_code == 400 and words in bad.json()["detail"], bad.text
    assert server.client().wait(job_id, timeout=60, poll=0.3).state == "SUCCEEDED"
    assert files_containing(env["state"], [value]) == []
