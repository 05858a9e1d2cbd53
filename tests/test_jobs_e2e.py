"""End to end on a real 2-node Ray cluster (ray.cluster_utils) with a real
raybatch server process: the recipe, gang queuing, failures, cancel, ordering,
the env contract, logs."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from raybatch.config import ray_http_headers
from tests.conftest import RECIPES, process_alive, wait_for

pytestmark = pytest.mark.timeout(240)


def job(client, **fields):
    base = {"name": "t", "experiment": "tests", "resources": {"cpus": 1}}
    return client.submit({**base, **fields})


def state_of(client, job_id):
    return client.get(job_id).state.value


def _live_placement_groups(cluster, name: str) -> list:
    from ray.util.state import list_placement_groups

    pgs = list_placement_groups(address=cluster.dashboard_url, filters=[("name", "=", name)],
                                raise_on_missing_output=False)
    return [p for p in pgs if p.state != "REMOVED"]


def test_pytorch_recipe_on_two_nodes(client):
    sub = client.submit(RECIPES / "pytorch-digits-ddp" / "job.yaml",
                        overrides=["command=python train.py --epochs 15"])
    done = client.wait(sub.id, timeout=180)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(sub.id, stream="stderr"))
    ranks = done.attempts[-1].ranks
    assert [r.rank for r in ranks] == [0, 1]
    assert len({r.node_id for r in ranks}) == 2, "ranks must run on distinct nodes"
    assert all(r.exit_code == 0 for r in ranks)
    log = client.logs(sub.id, rank=0)
    acc = float(re.search(r"test accuracy: ([0-9.]+)", log).group(1))
    assert acc > 0.9
    model_dir = Path(done.outputs["model"])
    assert (model_dir / "model.pt").stat().st_size > 0
    assert json.loads((model_dir / "metrics.json").read_text())["world_size"] == 2
    assert (Path(done.checkpoint_dir) / "checkpoint.pt").exists()
    assert "rank 1/2" in client.logs(sub.id, rank=1)


def test_gang_waits_for_a_third_node(client, ray_cluster):
    sub = job(client, name="three", nodes=3, command="echo node $RAYBATCH_NODE_RANK")
    time.sleep(3)
    detail = client.get(sub.id)
    assert detail.state == "QUEUED"
    assert "needs 3 nodes" in detail.waiting_reason and "2 such nodes are free" in detail.waiting_reason
    node = ray_cluster.add_node(1)
    try:
        done = client.wait(sub.id, timeout=90)
        assert done.state == "SUCCEEDED", done.reason
        assert len({r.node_id for r in done.attempts[-1].ranks}) == 3
    finally:
        ray_cluster.cluster.remove_node(node)


def test_failing_rank_fails_job_with_its_exit_code(client):
    cmd = 'if [ "$RANK" = 1 ]; then echo "boom from rank 1" >&2; exit 7; fi; sleep 120'
    sub = job(client, name="fails", nodes=2, command=cmd)
    done = client.wait(sub.id, timeout=90)
    assert done.state == "FAILED"
    assert done.exit_code == 7
    assert "rank 1 exited with code 7" in done.reason
    assert "boom from rank 1" in client.logs(sub.id, rank=1, stream="stderr")
    ranks = {r.rank: r for r in done.attempts[-1].ranks}
    assert ranks[1].exit_code == 7
    assert ranks[0].exit_code == 143  # the other rank was stopped with SIGTERM
    assert done.ended_at - done.started_at < 60


def test_an_environment_the_kernel_would_refuse_is_refused_at_submit(client):
    # the kernel refuses any one argument or environment string over 128 KiB (E2BIG). Such a
    # job used to be admitted and fail in its rank actors (recorded as NODE_LOST, retried 4
    # times on the infrastructure budget, with a coloured traceback for a reason; later a
    # USER_ERROR); the job file's limits now refuse it before anything is queued.
    from raybatch.client import RaybatchError  # noqa: PLC0415
    from raybatch.errors import SpecError  # noqa: PLC0415

    with pytest.raises((SpecError, RaybatchError)) as err:  # the SDK checks the spec before sending it
        job(client, name="e2big", nodes=2, command="echo never", environment={"HUGE": "x" * 200_000})
    text = str(err.value)
    assert "environment" in text and "'HUGE' is 200005 bytes" in text and "at most 100 KiB" in text, text
    assert "Traceback" not in text
    assert not [j for j in client.list(limit=1000) if j.name == "e2big"]  # nothing queued


def test_cancel_stops_every_process_and_frees_the_gang(client, ray_cluster):
    # rank 1 ignores SIGTERM: it must be SIGKILLed after the grace period
    cmd = ('if [ "$RANK" = 1 ]; then trap "" TERM; fi; echo started; '
           'sleep 300 & child=$!; echo child $child; wait $child')
    sub = job(client, name="cancel-me", nodes=2, command=cmd, grace_period="3s")
    wait_for(lambda: state_of(client, sub.id) == "RUNNING", 60, "RUNNING")
    wait_for(lambda: "child" in client.logs(sub.id, rank=1), 30, "rank 1 to start its child")
    detail = client.get(sub.id)
    pids = [r.pid for r in detail.attempts[-1].ranks]
    children = [int(client.logs(sub.id, rank=r).split("child ")[1].split()[0]) for r in (0, 1)]
    assert all(process_alive(p) for p in pids + children)
    client.cancel(sub.id)
    done = client.wait(sub.id, timeout=60)
    assert done.state == "CANCELLED"
    wait_for(lambda: all(not process_alive(p) for p in pids + children), 15, "user processes to exit")
    pg_name = f"raybatch-{sub.id}-1"
    wait_for(lambda: not _live_placement_groups(ray_cluster, pg_name), 15, "placement group removal")
    # the gang's resources are free again: a 2-node job starts at once
    again = job(client, name="after-cancel", nodes=2, command="true")
    assert client.wait(again.id, timeout=60).state == "SUCCEEDED"


def test_cancel_queued_job(client):
    sub = job(client, name="never-fits", nodes=9, command="true")
    assert client.cancel(sub.id).state == "CANCELLED"
    history = [t.to_state.value for t in client.get(sub.id).transitions]
    assert history == ["QUEUED", "CANCELLED"]


def test_priority_then_submission_order(client):
    blocker = job(client, name="blocker", nodes=2, command="sleep 4")
    wait_for(lambda: state_of(client, blocker.id) in ("STARTING", "RUNNING"), 30, "blocker to start")
    low = job(client, name="low", nodes=2, priority="low", command="true")
    normal_1 = job(client, name="normal-1", nodes=2, command="true")
    high = job(client, name="high", nodes=2, priority=900, command="true")
    normal_2 = job(client, name="normal-2", nodes=2, command="true")
    order = [low, normal_1, high, normal_2]
    done = [client.wait(j.id, timeout=120) for j in order]
    assert all(d.state == "SUCCEEDED" for d in done)
    started = sorted(done, key=lambda d: d.started_at)
    assert [d.name for d in started] == ["high", "normal-1", "normal-2", "low"]


def test_env_contract_and_processes_per_node(client, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "envs"
    cmd = ('env | grep -E "^(RAYBATCH_|AZ_BATCHAI_|RANK=|WORLD_SIZE=|LOCAL_RANK=|NODE_RANK=|'
           'MASTER_ADDR=|MASTER_PORT=|MY_VAR=)" | sort > "$RAYBATCH_OUTPUT_ENVS/rank-$RANK.env"')
    sub = job(client, name="env", nodes=2, processes_per_node=2, framework="pytorch", command=cmd,
              environment={"MY_VAR": "hello"}, inputs={"data": str(data)},
              outputs={"envs": {"path": str(out)}})
    done = client.wait(sub.id, timeout=90)
    assert done.state == "SUCCEEDED", done.reason
    envs = {}
    for r in range(4):
        lines = (out / f"rank-{r}.env").read_text().splitlines()
        envs[r] = dict(line.split("=", 1) for line in lines)
    for r, env in envs.items():
        assert env["RANK"] == str(r) == env["AZ_BATCHAI_TASK_INDEX"]
        assert env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(r % 2)
        assert env["NODE_RANK"] == env["RAYBATCH_NODE_RANK"] == str(r // 2)
        assert env["RAYBATCH_NUM_NODES"] == "2"
        assert env["RAYBATCH_JOB_ID"] == sub.id and env["RAYBATCH_ATTEMPT"] == "1"
        assert env["RAYBATCH_INPUT_DATA"] == env["AZ_BATCHAI_INPUT_data"] == str(data)
        assert env["RAYBATCH_OUTPUT_ENVS"] == env["AZ_BATCHAI_OUTPUT_envs"] == str(out)
        assert env["RAYBATCH_CHECKPOINT_DIR"] == done.checkpoint_dir
        assert env["RAYBATCH_STDOUTERR_DIR"].endswith(f"stdouterr/attempt-1/rank-{r}")
        assert env["MY_VAR"] == "hello"
        assert env["AZ_BATCHAI_PYTORCH_INIT_METHOD"] == f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    assert len({e["MASTER_PORT"] for e in envs.values()}) == 1
    nodes = {r.rank: r.node_id for r in done.attempts[-1].ranks}
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3]


def test_missing_input_fails_at_start_with_the_path(client, tmp_path):
    sub = job(client, name="no-input", command="true", inputs={"data": str(tmp_path / "nope")})
    done = client.wait(sub.id, timeout=60)
    assert done.state == "FAILED"
    assert "input 'data'" in done.reason and str(tmp_path / "nope") in done.reason
    assert done.attempts[-1].outcome == "START_FAILED"


def test_follow_logs_while_running(client):
    sub = job(client, name="ticker", command="for i in 1 2 3 4 5; do echo tick $i; sleep 0.5; done")
    wait_for(lambda: state_of(client, sub.id) == "RUNNING", 60, "RUNNING")
    first = client.logs(sub.id)
    assert "tick 5" not in first  # read while the job runs
    text = "".join(client.follow_logs(sub.id, poll=0.2))
    assert [f"tick {i}" for i in range(1, 6)] == re.findall(r"tick \d", text)


def test_user_retry_resumes_recipe_from_checkpoint(client, server):
    # attempt 1 is stopped (SIGTERM, the recipe checkpoints and exits 143) once a
    # checkpoint exists; the retry must resume from it.
    cmd = ('if [ "$RAYBATCH_ATTEMPT" = 1 ]; then '
           'python train.py --epochs 12 --sleep-per-epoch 0.4 & p=$!; '
           'while [ ! -f "$RAYBATCH_CHECKPOINT_DIR/checkpoint.pt" ]; do sleep 0.1; done; sleep 1; '
           'kill -TERM $p; wait $p; else python train.py --epochs 12; fi')
    sub = client.submit(RECIPES / "pytorch-digits-ddp" / "job.yaml",
                        overrides=[f"command={cmd}", "retries.user=1"])
    followed: list[str] = []
    follower_client = server.client()  # its own connection: this one runs in a thread
    follower = threading.Thread(
        target=lambda: followed.extend(follower_client.follow_logs(sub.id, poll=0.2)), daemon=True)
    follower.start()
    done = client.wait(sub.id, timeout=200)
    assert done.state == "SUCCEEDED", done.reason
    assert [a.outcome for a in done.attempts] == ["USER_ERROR", "SUCCEEDED"]
    assert done.attempts[0].exit_code == 143
    first = client.logs(sub.id, attempt=1)
    second = client.logs(sub.id, attempt=2)
    assert "SIGTERM received: checkpoint saved" in first
    resumed = int(re.search(r"resumed from checkpoint at epoch (\d+)", second).group(1))
    assert 0 < resumed < 12
    assert float(re.search(r"test accuracy: ([0-9.]+)", second).group(1)) > 0.9
    states = [t.to_state.value for t in done.transitions]
    assert states == ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "QUEUED", "STARTING", "RUNNING",
                      "SUCCEEDED"]
    # `logs --follow` started with the job goes through both attempts and ends with it
    follower.join(timeout=30)
    assert not follower.is_alive()
    assert "".join(followed) == first + "--- attempt 2 ---\n" + second


def test_ray_dashboard_metadata(client, ray_cluster):
    from ray.job_submission import JobSubmissionClient

    sub = job(client, name="meta", command="true", environment={"SECRET_TOKEN": "hunter2"})
    client.wait(sub.id, timeout=60)
    info = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_http_headers()).get_job_info(
        f"raybatch-{sub.id}-1")
    assert info.metadata["raybatch_job_id"] == sub.id
    assert info.metadata["raybatch_job_name"] == "meta"
    assert info.metadata["raybatch_experiment"] == "tests"
    assert info.metadata["raybatch_attempt"] == "1"
    assert "hunter2" not in json.dumps(info.metadata) + json.dumps(info.runtime_env or {})
    assert os.path.basename(info.entrypoint.split()[-1]) == "attempt.json"


def test_max_wall_clock_is_enforced(client):
    sub = job(client, name="too-long", command="echo start; sleep 120", max_wall_clock="3s",
              grace_period="1s")
    done = client.wait(sub.id, timeout=60)
    assert done.state == "FAILED"
    assert done.attempts[-1].outcome == "TIMEOUT"
    assert "max_wall_clock" in done.reason
    assert done.ended_at - done.started_at < 20


def test_ray_job_stopped_outside_raybatch_is_an_infrastructure_failure(client, ray_cluster):
    from ray.job_submission import JobSubmissionClient

    sub = job(client, name="stopped-outside", nodes=2, command="echo up; sleep 120",
              retries={"infrastructure": 1})
    wait_for(lambda: state_of(client, sub.id) == "RUNNING", 60, "RUNNING")
    pids = [r.pid for r in client.get(sub.id).attempts[-1].ranks]
    JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_http_headers()).stop_job(
        f"raybatch-{sub.id}-1")
    # requeued on the infrastructure budget and started again as attempt 2
    wait_for(lambda: client.get(sub.id).attempt == 2, 60, "attempt 2")
    first = client.get(sub.id).attempts[0]
    assert first.outcome == "DRIVER_LOST"
    assert "SIGTERM from outside raybatch" in first.reason
    wait_for(lambda: all(not process_alive(p) for p in pids), 15, "attempt 1's processes to exit")
    client.cancel(sub.id)
    done = client.wait(sub.id, timeout=60)
    assert done.state == "CANCELLED"
    assert "infrastructure retry 1 of 1" in " ".join(t.reason for t in done.transitions)


def test_job_temp_is_removed_after_the_attempt(client):
    sub = job(client, name="scratch", nodes=2,
              command='echo data > "$RAYBATCH_JOB_TEMP/scratch.txt"; echo "$RAYBATCH_JOB_TEMP"; pwd')
    done = client.wait(sub.id, timeout=60)
    assert done.state == "SUCCEEDED", done.reason
    temp, cwd = client.logs(sub.id).split()
    assert cwd == temp  # a job without code runs in its scratch directory
    assert temp.endswith(f"raybatch-{os.getuid()}/jobs/{sub.id}/node-0")  # private per-user scratch
    assert not Path(temp).parent.exists()


def test_batchai_job_json_of_the_recipe_runs_as_is(client):
    """The Batch AI job.json of the PyTorch recipe, submitted as it is: its script path is
    under $AZ_BATCHAI_JOB_MOUNT_ROOT (the repo stands in for the mount), its output is
    AZ_BATCHAI_OUTPUT_MODEL, its backend comes from communicationBackend."""
    import warnings

    from raybatch.spec.loader import ConversionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = client.submit(RECIPES / "pytorch-digits-ddp" / "job.batchai.json",
                            mount_root=str(RECIPES.parent))
    assert any(issubclass(w.category, ConversionWarning) and "cluster: ignored" in str(w.message)
               for w in caught)
    done = client.wait(sub.id, timeout=180)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(sub.id, stream="stderr"))
    assert done.name == "pytorch-digits-ddp-batchai" and done.spec.framework == "pytorch"
    assert len({r.node_id for r in done.attempts[-1].ranks}) == 2
    acc = float(re.search(r"test accuracy: ([0-9.]+)", client.logs(sub.id, rank=0)).group(1))
    assert acc > 0.9
    assert (Path(done.outputs["MODEL"]) / "model.pt").stat().st_size > 0


def test_prepare_runs_once_per_node_before_the_ranks(client):
    """Batch AI's jobPreparation: once on every node, before any rank, with its own logs."""
    sub = job(client, name="prep", nodes=2, processes_per_node=1,
              prepare="echo prepared node $RAYBATCH_NODE_RANK; echo ready > $RAYBATCH_JOB_TEMP/marker",
              command="cat $RAYBATCH_JOB_TEMP/marker")
    done = client.wait(sub.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    assert client.logs(sub.id, rank=0).strip() == "ready" and client.logs(sub.id, rank=1).strip() == "ready"
    files = {f.path for f in client.files(sub.id, "stdouterr/attempt-1/prepare")}
    assert files == {f"stdouterr/attempt-1/prepare/node-{k}/{s}.txt" for k in (0, 1) for s in ("stdout", "stderr")}
    prep_log = Path(done.logs_dir) / "attempt-1" / "prepare" / "node-1" / "stdout.txt"
    assert prep_log.read_text().strip() == "prepared node 1"


def test_a_failing_prepare_fails_the_job_at_start_with_its_output(client):
    sub = job(client, name="prep-fails", nodes=2, prepare="echo 'no such package: torchh' >&2; exit 3",
              command="echo should never run")
    done = client.wait(sub.id, timeout=120)
    assert done.state == "FAILED"
    last = done.attempts[-1]
    assert last.outcome == "START_FAILED"
    assert "prepare failed on node" in last.reason and "exit code 3" in last.reason
    assert "no such package: torchh" in last.reason
    assert all(r.pid is None for r in last.ranks)  # no rank ever started


def test_code_runs_from_the_node_cache_with_the_code_first_on_pythonpath(client, server, ray_cluster, tmp_path):
    """The job's code reaches every node through the object store and the node's cache
    (no Ray working_dir): the ranks run in it, it comes first on PYTHONPATH (a script in
    a subdirectory imports the code's top-level package), the job's own PYTHONPATH
    follows, and a second job with the same code finds it cached on both nodes."""
    import uuid

    from ray.job_submission import JobSubmissionClient

    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "tools").mkdir()
    (code / "pkg" / "__init__.py").write_text(f"TAG = {uuid.uuid4().hex!r}\n")  # a new package
    (code / "tools" / "where.py").write_text(
        "import os, pkg\n"
        "print(os.getcwd(), os.environ['PYTHONPATH'].split(os.pathsep)[1], pkg.TAG)\n")
    spec = {"name": "code", "experiment": "tests", "resources": {"cpus": 1}, "nodes": 2,
            "code": str(code), "command": "python tools/where.py", "environment": {"PYTHONPATH": "/extra"}}
    first = client.submit(spec)
    done = client.wait(first.id, timeout=90)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(first.id, stream="stderr"))
    tag = (code / "pkg" / "__init__.py").read_text().split("'")[1]
    for rank in (0, 1):
        cwd, second_path, got = client.logs(first.id, rank=rank).split()
        assert Path(cwd).parent.name == "code" and (Path(cwd) / "tools" / "where.py").is_file()
        assert second_path == "/extra" and got == tag
    sha = Path(cwd).name
    assert (server.state_dir / "code" / f"{sha}.zip").is_file()  # the server keeps the zip
    second = client.wait(client.submit(spec).id, timeout=90)
    assert second.state == "SUCCEEDED", second.reason
    logs = JobSubmissionClient(ray_cluster.dashboard_url)
    assert f"code {sha[:12]}: unpacked on 1 node(s), cached on 1" in logs.get_job_logs(f"raybatch-{first.id}-1") \
        or f"code {sha[:12]}: unpacked on 2 node(s), cached on 0" in logs.get_job_logs(f"raybatch-{first.id}-1")
    assert f"code {sha[:12]}: unpacked on 0 node(s), cached on 2" in logs.get_job_logs(f"raybatch-{second.id}-1")


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a niceness needs root (or CAP_SYS_NICE)")
def test_ranks_run_at_normal_priority_although_ray_nices_its_workers(client):
    """Ray starts workers (so rank actors) at niceness 15; the user's processes run at 0, as
    Ray's own job drivers do."""
    sub = job(client, name="nice", command='python -c "import os; print(os.nice(0))"')
    done = client.wait(sub.id, timeout=60)
    assert done.state == "SUCCEEDED", done.reason
    assert client.logs(sub.id).strip() == "0"


def test_a_locked_store_answers_503_within_a_second_and_never_stalls_health(client, server):
    # another process holds the database's write lock (a backup, a sqlite3 shell): the submit
    # waited 5 s on the event loop, stalling /health, then answered 500
    import concurrent.futures
    import sqlite3

    import httpx

    from raybatch.config import API_PREFIX

    before = len(client.list(limit=100000))
    headers = {"Authorization": f"Bearer {server.token}"}
    body = {"spec": {"name": "locked", "experiment": "tests", "command": "true", "resources": {"cpus": 1}}}
    holder = sqlite3.connect(server.state_dir / "raybatch.db", timeout=5, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            fut = pool.submit(httpx.post, server.url + API_PREFIX + "/jobs", json=body, headers=headers, timeout=30)
            slowest = 0.0
            while not fut.done():
                t = time.monotonic()
                assert httpx.get(server.url + API_PREFIX + "/health", timeout=5).status_code == 200
                slowest = max(slowest, time.monotonic() - t)
            r = fut.result()
            took = time.monotonic() - t0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 503, r.text
    assert "job store is unavailable" in r.json()["detail"] and "locked" in r.json()["detail"]
    assert took < 3.0, took  # 0.8 s of waiting, on a loaded machine
    assert slowest < 0.5, slowest
    assert len(client.list(limit=100000)) == before  # nothing half written
    r = httpx.post(server.url + API_PREFIX + "/jobs", json=body, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    client.cancel(r.json()["id"])
