"""Seeing the work, end to end: a real 2-node Ray cluster, a real raybatch server, Azurite for
blob outputs, and the CLI as users run it. `submit` warns (and still queues) a job no live
node can hold, in the queue's words; `logs` of a job with no attempt says why; `raybatch
tensorboard` serves a real TensorBoard over a job's and an experiment's event files, local
and blob alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request

import pytest
import yaml

from tests.conftest import RAYBATCH, RayTestCluster, ServerProcess, free_port, run_cli, stop_everything, wait_for

pytestmark = pytest.mark.timeout(240)
KEY_ENV = "RB_TEST_OBSERVE_KEY"

# writes one scalar with TensorBoard's own writer (numpy only, no TensorFlow) on rank 0, then
# holds its node(s) for argv[2] seconds
WRITE_EVENTS = """\
import os, sys, time
from tensorboard.summary import Writer
if os.environ["RANK"] == "0":
    w = Writer(os.path.join(os.environ["RAYBATCH_OUTPUT_TB"], "train"))
    for step in range(3):
        w.add_scalar(sys.argv[1], 1.0 / (step + 1), step)
    w.close()
    print("wrote", sys.argv[1], flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def env(azurite, tmp_path_factory):
    cluster = RayTestCluster(nodes=2)
    state = tmp_path_factory.mktemp("observe")
    azurite.create_container("observe")
    (state / "datastores.yaml").write_text(textwrap.dedent(f"""\
        datastores:
          results:
            url: az://observe/runs
            account: {azurite.account_name}
            endpoint: {azurite.endpoint}
            credential: {{account_key: {{env: {KEY_ENV}}}}}
        """))
    server = ServerProcess(cluster, state, env={KEY_ENV: azurite.account_key,
                                                "RAYBATCH_CACHE_DIR": str(state / "cache")}).start()
    script = state / "write_events.py"
    script.write_text(WRITE_EVENTS)
    box = {"cluster": cluster, "server": server, "state": state, "script": script}
    yield box
    try:
        stop_everything(server)
    finally:
        server.stop()
        cluster.shutdown()


def job_file(env, name: str, **fields) -> str:
    data = {"name": name, "experiment": "observe", "command": "true", "resources": {"cpus": 1},
            "max_wall_clock": "2m", **fields}
    path = env["state"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def queue_reason(env, job_id: str) -> str:
    client = env["server"].client()

    def reason():
        row = next((r for r in client.queue() if r.id == job_id), None)
        return row and row.reason != "not considered yet" and row.reason
    return wait_for(reason, 20, f"the scheduler to consider {job_id}")


def one_line(text: str) -> str:
    return " ".join(text.split())


def cli_env(server) -> dict[str, str]:
    return {**os.environ, "RAYBATCH_ADDRESS": server.url, "RAYBATCH_TOKEN": server.token}


def test_submit_warns_about_a_job_no_live_node_can_hold_and_logs_says_why_it_has_none(env):
    server = env["server"]
    client = server.client()
    for name, fields, words in [
        ("huge", {"resources": {"cpus": 64}}, "only 0 of the 2 live nodes could ever hold one"),
        ("wide", {"nodes": 5}, "only 2 of the 2 live nodes could ever hold one"),
    ]:
        p = run_cli(server, "submit", job_file(env, name, **fields))
        assert p.returncode == 0, p.stderr
        job_id = p.stdout.strip()
        assert job_id.startswith("rb-")
        warning = one_line(p.stderr)
        assert f"warning: {job_id}: no live node can ever hold this job" in warning, p.stderr
        assert words in warning
        # the queue's words, exactly: nothing runs, so 'free now' is the same in both
        assert queue_reason(env, job_id) in warning
        assert client.get(job_id).state.value == "QUEUED"
        if name == "wide":
            client.cancel(job_id)
            continue
        # logs of a job with no attempt: why, on stderr, exit 0
        p = run_cli(server, "logs", job_id)
        assert p.returncode == 0 and p.stdout == "", p.stderr
        said = one_line(p.stderr)
        assert f"job {job_id} has not started yet, so it has no log: it is queued, " in said
        assert words in said
        client.cancel(job_id)
        p = run_cli(server, "logs", job_id)
        assert p.returncode == 0 and p.stdout == ""
        assert f"job {job_id} was cancelled before it started" in p.stderr


def tb_json(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def start_tensorboard(env, target: str, where) -> tuple[subprocess.Popen, int, object]:
    port = free_port()
    where.mkdir()
    out = where / "output.txt"
    proc = subprocess.Popen([RAYBATCH, "tensorboard", target, "--port", str(port), "--host", "127.0.0.1",
                             "--cache-dir", str(where / "cache"), "--refresh", "1"],
                            stdout=open(out, "w"), stderr=subprocess.STDOUT, env=cli_env(env["server"]))
    return proc, port, out


def shows(proc: subprocess.Popen, port: int, out, want: dict[str, str]) -> None:
    """Wait until TensorBoard shows a run under each job directory of ``want`` with its
    scalar tag, and no other; then stop it by its pid."""
    try:
        def shown():
            assert proc.poll() is None, out.read_text()
            tags = tb_json(port, "/data/plugin/scalars/tags") or {}
            got = {prefix: tag for prefix, tag in want.items()
                   if any(run.startswith(prefix + "/") and tag in t for run, t in tags.items())}
            return got == want and tags
        tags = wait_for(shown, 60, f"TensorBoard to show {want}", interval=0.5)
        assert {run.split("/", 1)[0] for run in tags} == set(want)  # one directory per job, no other
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    said = out.read_text()
    assert "event file(s) of" in said or "no event files in" in said, said


def test_logs_follow_waits_for_the_first_attempt_and_tensorboard_shows_local_and_blob_jobs(env, tmp_path):
    server = env["server"]
    client = server.client()
    cmd = f"{sys.executable} {env['script']}"
    # a 2-node job holds both nodes for a few seconds; its events stay on local disk
    p = run_cli(server, "submit", job_file(env, "tb-local", experiment="tb", nodes=2, command=f"{cmd} loss 3",
                                           outputs={"tb": {}}), check=True)
    local = p.stdout.strip()
    assert "warning" not in p.stderr, p.stderr
    wait_for(lambda: client.get(local).state.value == "RUNNING", 30, "the 2-node job to run")
    # meanwhile a job with blob outputs waits: no warning, the live nodes can hold it once free
    p = run_cli(server, "submit", job_file(env, "tb-blob", experiment="tb", command=f"{cmd} accuracy 0",
                                           output_root="datastore://results/jobs", outputs={"tb": {}}),
                check=True)
    blob = p.stdout.strip()
    assert "warning" not in p.stderr, p.stderr
    assert client.get(blob).state.value == "QUEUED"
    follow = subprocess.Popen([RAYBATCH, "logs", blob, "--follow"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(server))
    # TensorBoard over the blob job (its event files fetched through the server's files API)
    # and over the experiment (each job its own run directory), started before the events are
    # written: they arrive with the background sync
    tensorboards = [start_tensorboard(env, blob, tmp_path / "one"), start_tensorboard(env, "tb", tmp_path / "exp")]
    try:
        out, err = follow.communicate(timeout=90)
        assert follow.returncode == 0, err
        said = one_line(err)
        assert f"job {blob} has not started yet" in said and "waiting for its first attempt" in said
        assert "wrote accuracy" in out
        for job_id in (local, blob):
            job = client.wait(job_id, timeout=60)
            assert job.state.value == "SUCCEEDED", (job.reason, client.logs(job_id, stream="stderr"))
        assert client.get(blob).outputs["tb"].startswith("datastore://results/")
        shows(*tensorboards[0], {f"tb-blob-{blob}": "accuracy"})
        shows(*tensorboards[1], {f"tb-local-{local}": "loss", f"tb-blob-{blob}": "accuracy"})
    finally:
        for proc in [follow, *(t[0] for t in tensorboards)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    p = run_cli(server, "tensorboard", "no-such-thing")
    assert p.returncode == 1 and "no job with id 'no-such-thing' and no experiment named" in p.stderr
