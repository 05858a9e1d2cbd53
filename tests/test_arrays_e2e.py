"""Job arrays end to end: a real 3-node Ray cluster, a real raybatch server, Azurite for a
blob prefix, and the CLI as users run it. Items over local files and a blob prefix;
cancel then `submit --resume-from`; error thresholds; one slot preempted by a
higher-priority job; a quota of one node; the server killed with SIGKILL mid-array.

Each item's script appends to a marks file (one per item, shared by the nodes of this
machine): "<job> <run> start|done|term", so "ran exactly once" is read from what the
processes themselves wrote."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import RayTestCluster, ServerProcess, run_cli, stop_everything, wait_for

pytestmark = pytest.mark.timeout(240)
KEY_ENV = "RB_TEST_ARRAY_KEY"

ITEM_SCRIPT = """\
import os, pathlib, signal, sys, time
key = os.environ["RAYBATCH_ITEM_KEY"]
marks = pathlib.Path(os.environ["MARKS"])

def mark(what):
    with open(marks / (key.replace("/", "_") + ".log"), "a") as f:
        f.write(f"{os.environ['RAYBATCH_JOB_ID']} {os.environ['RAYBATCH_TASK_RUN']} {what}\\n")

def term(*_):
    mark("term")
    sys.exit(143)

signal.signal(signal.SIGTERM, term)
mark("start")
item = os.environ["RAYBATCH_ITEM"]
data = pathlib.Path(item).read_text() if os.path.isfile(item) else item
time.sleep(float(os.environ.get("SLEEP", "0")))
if key in os.environ.get("FAIL_KEYS", "").split(","):
    print("failing", key, file=sys.stderr)
    sys.exit(3)
out = pathlib.Path(os.environ["RAYBATCH_ITEM_OUTPUT_DIR"])
(out / "score.txt").write_text(f"{key}:{len(data)}\\n")
print(f"scored {key} from {item}", flush=True)
mark("done")
os._exit(0)  # no interpreter shutdown after the mark: a stop arriving then would end a run marked done
"""


@pytest.fixture(scope="module")
def env(azurite, tmp_path_factory):
    cluster = RayTestCluster(nodes=3)
    state = tmp_path_factory.mktemp("arrays")
    azurite.create_container("scoring")
    (state / "datastores.yaml").write_text(textwrap.dedent(f"""\
        datastores:
          scoring:
            url: az://scoring
            account: {azurite.account_name}
            endpoint: {azurite.endpoint}
            credential: {{account_key: {{env: {KEY_ENV}}}}}
        """))
    (state / "policy.yaml").write_text("quotas: {capped: {max_nodes: 1}}\n")
    server = ServerProcess(cluster, state, env={KEY_ENV: azurite.account_key,
                                                "RAYBATCH_CACHE_DIR": str(state / "cache")}).start()
    script = state / "item.py"
    script.write_text(ITEM_SCRIPT)
    box = {"cluster": cluster, "server": server, "state": state, "script": script, "azurite": azurite}
    yield box
    try:
        stop_everything(box["server"])
    finally:
        box["server"].stop()
        cluster.shutdown()


def cli(env, *args, check=True):
    return run_cli(env["server"], *args, check=check)


def job_file(env, tmp_path, name, array, **fields) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    spec = {"name": name, "experiment": "arrays", "resources": {"cpus": 1}, "grace_period": "5s",
            "command": f"{sys.executable} {env['script']}", "max_wall_clock": "3m",
            "array": {"item_timeout": "60s", **array}, **fields}
    spec["environment"] = {"MARKS": str(marks), **fields.get("environment", {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def marks(tmp_path) -> dict[str, list[tuple[str, str, str]]]:
    """Item key -> [(job, run, what)] in the order written."""
    out = {}
    for f in (tmp_path / "marks").glob("*.log"):
        out[f.stem] = [tuple(line.split()) for line in f.read_text().splitlines()]
    return out


def submit(env, path: Path, *extra: str) -> str:
    return cli(env, "submit", str(path), *extra).stdout.splitlines()[0].strip()


def wait(env, job_id, timeout=150):
    return env["server"].client().wait(job_id, timeout=timeout, poll=0.3)


def files(tmp_path, n, name="f{:02d}.txt"):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(n):
        (d / name.format(i)).write_text("x" * (i + 1))
    (d / "ignored.dat").write_text("not an item")
    return d


# -------------------------------------------------------------------------------------------
def test_array_over_local_files(env, tmp_path):
    d = files(tmp_path, 30)
    job_id = submit(env, job_file(env, tmp_path, "local-files", {"over": f"{d}/*.txt", "max_concurrent": 3}))
    done = wait(env, job_id)
    assert done.state == "SUCCEEDED", done.reason
    assert "30 of 30 task(s) done" in done.reason
    out = Path(done.outputs["results"]) / "items"
    assert sorted(p.name for p in out.iterdir()) == [f"f{i:02d}.txt" for i in range(30)]
    assert (out / "f07.txt" / "score.txt").read_text() == "f07.txt:8\n"
    seen = marks(tmp_path)
    assert len(seen) == 30 and all([w for _, _, w in m] == ["start", "done"] for m in seen.values())
    items = json.loads(cli(env, "items", job_id, "-o", "json").stdout)
    assert [i["state"] for i in items] == ["done"] * 30 and {i["runs"] for i in items} == {1}
    assert len({i["slot"] for i in items}) >= 2  # the tasks ran on several warm slots
    assert cli(env, "logs", job_id, "--item", "7").stdout.startswith("scored f07.txt from ")
    shown = cli(env, "show", job_id).stdout
    assert "array:" in shown and "Slots" in shown
    queue = cli(env, "queue", "-o", "json")
    assert queue.returncode == 0


def test_array_over_an_azurite_prefix(env, tmp_path):
    container = env["azurite"].service_client().get_container_client("scoring")
    for i in range(12):
        container.upload_blob(f"in/part-{i:02d}.txt", b"y" * (10 + i), overwrite=True)
    container.upload_blob("in/README.md", b"not an item", overwrite=True)
    job_id = submit(env, job_file(env, tmp_path, "blob-prefix",
                                  {"over": "datastore://scoring/in/*.txt", "max_concurrent": 3}))
    done = wait(env, job_id)
    assert done.state == "SUCCEEDED", done.reason
    out = Path(done.outputs["results"]) / "items"
    assert (out / "part-05.txt" / "score.txt").read_text() == "part-05.txt:15\n"
    assert len(list(out.iterdir())) == 12
    log = cli(env, "logs", job_id, "--item", "5").stdout
    assert "scored part-05.txt from /" in log  # a staged local path, not the blob URL


def test_logs_follow_of_an_item_shows_its_retry_and_ends_with_it(env, tmp_path):
    """`raybatch logs ID --item K -f`, as arrays.md tells: it follows the task's runs (a retry
    is its next run) and returns when the task is done, while the job still runs."""
    command = ('echo "run $RAYBATCH_TASK_RUN of ${{item}}"; '
               'if [ "$RAYBATCH_TASK_RUN" = 1 ] && [ ${{item}} = 0 ]; then exit 3; fi; sleep ${{item}}')
    job_id = submit(env, job_file(env, tmp_path, "follow", {"values": [0, 25], "max_concurrent": 2},
                                  command=command))
    followed = cli(env, "logs", job_id, "--item", "0", "-f")
    assert followed.stdout.splitlines() == ["run 1 of 0", "--- attempt 2 ---", "run 2 of 0"], followed.stdout
    # item 1 still sleeps: the job has not ended (on a loaded machine the server may not
    # have recorded RUNNING yet when item 0's two short runs are over)
    assert not env["server"].client().get(job_id).state.is_final
    cli(env, "cancel", job_id)
    assert wait(env, job_id).state == "CANCELLED"


def test_cancel_then_resume_from_runs_each_remaining_item_once(env, tmp_path):
    d = files(tmp_path, 16)
    path = job_file(env, tmp_path, "resumable", {"over": f"{d}/*.txt", "max_concurrent": 3},
                    environment={"SLEEP": "1"})
    first = submit(env, path)
    client = env["server"].client()
    wait_for(lambda: len(client.items(first, state=["done"])) >= 4, 90, "4 items done")
    cli(env, "cancel", first)
    assert wait(env, first).state == "CANCELLED"
    done_first = {tuple(i.keys)[0] for i in client.items(first, state=["done"])}
    second = submit(env, path, "--resume-from", first)
    done = wait(env, second)
    assert done.state == "SUCCEEDED", done.reason
    seen = marks(tmp_path)
    assert len(seen) == 16
    for key, m in seen.items():
        finished = [(j, w) for j, _, w in m if w == "done"]
        assert len(finished) == 1, (key, m)  # each item finished exactly once over both jobs
        if key in done_first:
            assert all(j == first for j, _, _ in m), (key, m)  # not run again
    items = client.items(second)
    assert {i.state for i in items} == {"done", "skipped"}
    assert {tuple(i.keys)[0] for i in items if i.state == "skipped"} == done_first
    # a job that is still running cannot be resumed
    third = submit(env, path)
    p = cli(env, "submit", str(path), "--resume-from", third, check=False)
    assert p.returncode != 0 and "cancel it first" in p.stderr
    cli(env, "cancel", third)


@pytest.mark.parametrize("threshold,state", [(5, "SUCCEEDED"), (2, "FAILED")])
def test_error_threshold(env, tmp_path, threshold, state):
    job_id = submit(env, job_file(env, tmp_path, f"threshold-{threshold}",
                                  {"count": 10, "max_concurrent": 3, "error_threshold": threshold, "retries": 1},
                                  environment={"FAIL_KEYS": "2,5,8"}))
    done = wait(env, job_id)
    assert done.state == state, done.reason
    failed = env["server"].client().items(job_id, state=["failed"])
    if state == "SUCCEEDED":
        assert sorted(i.task for i in failed) == [2, 5, 8] and {i.runs for i in failed} == {2}
        assert "3 item(s) failed" in done.reason
        listed = cli(env, "items", job_id, "--failed").stdout
        assert "USER_ERROR" in listed and "exited with code 3" in listed
    else:
        assert f"more than array.error_threshold ({threshold})" in done.reason and done.exit_code == 3
        assert len(failed) == 3


def test_a_high_priority_job_preempts_one_slot_and_the_item_reruns(env, tmp_path):
    client = env["server"].client()
    blocker = client.submit({"name": "blocker", "experiment": "arrays", "priority": "high", "preemptible": False,
                             "command": "sleep 120", "max_wall_clock": "3m"})
    wait_for(lambda: client.get(blocker.id).state.value == "RUNNING", 60, "the blocker to run")
    array = submit(env, job_file(env, tmp_path, "preemptible", {"count": 6, "max_concurrent": 2},
                                 priority="low", environment={"SLEEP": "4"}))
    wait_for(lambda: sum(1 for s in client.get(array).slots if s.activity == "busy") == 2, 90, "2 busy slots")
    high = client.submit({"name": "urgent", "experiment": "arrays", "priority": "high", "command": "echo urgent"})
    assert client.wait(high.id, timeout=90).state.value == "SUCCEEDED"
    done = wait(env, array)
    assert done.state == "SUCCEEDED", done.reason
    revoked = [s for s in done.slots if s.reason and "preempted by" in s.reason]
    assert len(revoked) == 1 and done.preemptions == 1
    seen = marks(tmp_path)
    reran = [k for k, m in seen.items() if any(w == "term" for _, _, w in m)]
    assert len(reran) == 1, seen
    assert [(r, w) for _, r, w in seen[reran[0]]] == [("1", "start"), ("1", "term"), ("2", "start"), ("2", "done")]
    client.cancel(blocker.id)


def test_a_quota_of_one_node_never_gives_two_slots(env, tmp_path):
    job_id = submit(env, job_file(env, tmp_path, "capped", {"count": 6, "max_concurrent": 3},
                                  experiment="capped", environment={"SLEEP": "0.5"}))
    done = wait(env, job_id)
    assert done.state == "SUCCEEDED", done.reason
    spans = sorted((s.granted_at, s.released_at or time.time()) for s in done.slots)
    assert spans and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_server_killed_mid_array_runs_no_item_twice(env, tmp_path):
    job_id = submit(env, job_file(env, tmp_path, "survivor", {"count": 12, "max_concurrent": 2},
                                  environment={"SLEEP": "1"}))
    client = env["server"].client()
    wait_for(lambda: len(client.items(job_id, state=["done"])) >= 3, 90, "3 items done")
    env["server"].kill(signal.SIGKILL)
    time.sleep(3)  # items go on while no server runs
    env["server"] = ServerProcess(env["cluster"], env["state"], env=env["server"].env).start()
    done = wait(env, job_id)
    assert done.state == "SUCCEEDED", done.reason
    assert len(done.attempts) == 1
    seen = marks(tmp_path)
    assert len(seen) == 12
    assert all([w for _, _, w in m] == ["start", "done"] for m in seen.values()), seen


def test_batch_scoring_recipe_with_the_ddp_recipes_model(env, tmp_path):
    """recipes/batch-scoring as its README runs it: the DDP recipe trains the model, then
    `raybatch score` scores 200 generated files with it, 20 per task."""
    from tests.conftest import RECIPES

    train = submit(env, RECIPES / "pytorch-digits-ddp" / "job.yaml", "--set", "command=python train.py --epochs 3")
    trained = wait(env, train, timeout=200)
    assert trained.state == "SUCCEEDED", trained.reason
    model = trained.outputs["model"]
    inputs = tmp_path / "scoring-in"
    subprocess.run([sys.executable, str(RECIPES / "batch-scoring" / "make_inputs.py"), str(inputs)], check=True)
    dry = cli(env, "score", "--model", model, "--over", f"{inputs}/*.csv", "--code", str(RECIPES / "batch-scoring"),
              "--command", "python score.py", "--items-per-task", "20", "--max-concurrent", "2", "--dry-run")
    assert yaml.safe_load(dry.stdout)["array"]["items_per_task"] == 20
    job_id = cli(env, "score", "--model", model, "--over", f"{inputs}/*.csv", "--code", str(RECIPES / "batch-scoring"),
                 "--command", "python score.py", "--items-per-task", "20", "--max-concurrent", "2",
                 "--experiment", "recipes").stdout.split()[0]
    done = wait(env, job_id, timeout=200)
    assert done.state == "SUCCEEDED", done.reason
    out = Path(done.outputs["predictions"]) / "items"
    predictions = sorted(out.glob("*/*.predictions.csv"))
    assert len(predictions) == 200 and len(list(out.iterdir())) == 10
    log = cli(env, "logs", job_id, "--item", "3").stdout
    accuracy = float(log.rsplit("accuracy ", 1)[1])
    assert "scored 20 file(s), 180 image(s)" in log and accuracy > 0.5, log
