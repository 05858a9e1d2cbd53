"""Fault tolerance on a real 3-node Ray cluster: a node killed mid-training, a
killed driver, a server killed with SIGKILL while jobs run or finish, retry
budgets, stall detection. Nothing is lost and nothing runs twice."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import RECIPES, RayTestCluster, ServerProcess, process_alive, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_cluster():
    c = RayTestCluster(nodes=3)
    yield c
    c.shutdown()


def _rank_pids(detail, attempt=-1):
    return [r.pid for r in detail.attempts[attempt].ranks]


def test_node_killed_mid_training_resumes_from_checkpoint(client, ray_cluster):
    sub = client.submit(RECIPES / "pytorch-digits-ddp" / "job.yaml",
                        overrides=["command=python train.py --epochs 30 --sleep-per-epoch 0.3"])
    wait_for(lambda: re.search(r"epoch [3-9]/30", client.logs(sub.id)), 120, "epoch 3")
    first = client.get(sub.id)
    assert first.state == "RUNNING"
    rank_nodes = {r.node_id for r in first.attempts[0].ranks}
    victim = next(n for n in ray_cluster.cluster.worker_nodes if n.node_id in rank_nodes)
    old_pids = _rank_pids(first)
    ray_cluster.cluster.remove_node(victim)
    try:
        done = client.wait(sub.id, timeout=180)
        assert done.state == "SUCCEEDED", done.reason
        assert [a.outcome for a in done.attempts] == ["NODE_LOST", "SUCCEEDED"]
        assert "was lost" in done.attempts[0].reason
        # attempt 2 ran on healthy nodes only
        assert victim.node_id not in {r.node_id for r in done.attempts[1].ranks}
        assert len({r.node_id for r in done.attempts[1].ranks}) == 2
        second_log = client.logs(sub.id, attempt=2)
        resumed = int(re.search(r"resumed from checkpoint at epoch (\d+)", second_log).group(1))
        assert resumed > 0
        assert float(re.search(r"test accuracy: ([0-9.]+)", second_log).group(1)) > 0.9
        # both attempts' logs are kept, per rank
        for attempt in (1, 2):
            for rank in (0, 1):
                assert Path(done.job_dir, "stdouterr", f"attempt-{attempt}", f"rank-{rank}", "stdout.txt").exists()
        assert "epoch 3/30" in client.logs(sub.id, attempt=1)
        metrics = json.loads((Path(done.outputs["model"]) / "metrics.json").read_text())
        assert metrics["resumed_from_epoch"] == resumed
        wait_for(lambda: all(not process_alive(p) for p in old_pids), 15, "attempt 1's processes to exit")
        states = [t.to_state.value for t in done.transitions]
        assert states == ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "QUEUED", "STARTING", "RUNNING",
                          "SUCCEEDED"]
    finally:
        ray_cluster.add_node(1)


def test_killed_driver_is_retried_on_the_infrastructure_budget(client, server):
    sub = client.submit({"name": "driver-dies", "nodes": 2, "resources": {"cpus": 1},
                         "command": 'echo "attempt $RAYBATCH_ATTEMPT"; sleep 4'})
    wait_for(lambda: client.get(sub.id).state.value == "RUNNING", 60, "RUNNING")
    status = json.loads((server.state_dir / "attempts" / sub.id / "1" / "status.json").read_text())
    pids = _rank_pids(client.get(sub.id))
    os.kill(status["pid"], signal.SIGKILL)
    done = client.wait(sub.id, timeout=120)
    assert done.state == "SUCCEEDED"
    assert [a.outcome for a in done.attempts] == ["DRIVER_LOST", "SUCCEEDED"]
    assert all(not process_alive(p) for p in pids)
    assert "attempt 2" in client.logs(sub.id)


def test_server_killed_while_jobs_run_completes_each_exactly_once(ray_cluster, tmp_path):
    marks = tmp_path / "marks"
    (tmp_path / "state").mkdir()
    srv = ServerProcess(ray_cluster, tmp_path / "state").start()
    try:  # a failure before the kill must not leave this server running
        c = srv.client()
        cmd = 'echo "$RAYBATCH_ATTEMPT $RANK" >> "$RAYBATCH_OUTPUT_MARKS/$RAYBATCH_JOB_NAME"; sleep {s}; echo finished'
        short = c.submit({"name": "short", "command": cmd.format(s=2), "outputs": {"marks": str(marks)}})
        # long enough to outlive the kill, the pause and a slow restart on a loaded machine
        long = c.submit({"name": "long", "command": cmd.format(s=30), "outputs": {"marks": str(marks)}})
        # both have started their commands (their marks are written), and the server saw long running
        wait_for(lambda: (marks / "short").exists() and (marks / "long").exists()
                 and c.get(long.id).state.value == "RUNNING", 60, "both to start")
    finally:
        srv.kill(signal.SIGKILL)
    time.sleep(5)  # 'short' finishes while no server is running
    restarted = ServerProcess(ray_cluster, tmp_path / "state").start()
    try:
        c2 = restarted.client()
        assert c2.get(long.id).state.value == "RUNNING"  # re-adopted, not started again
        for j in (short, long):
            done = c2.wait(j.id, timeout=90)
            assert done.state == "SUCCEEDED", done.reason
            assert len(done.attempts) == 1
            assert c2.logs(j.id).strip() == "finished"
            assert (marks / j.name).read_text().splitlines() == ["1 0"]
    finally:
        restarted.stop()


def test_user_error_retries_then_fails_with_history(client):
    sub = client.submit({"name": "flaky", "command": "echo try $RAYBATCH_ATTEMPT; exit 3",
                         "retries": {"user": 2}})
    done = client.wait(sub.id, timeout=120)
    assert done.state == "FAILED" and done.exit_code == 3
    assert [a.outcome for a in done.attempts] == ["USER_ERROR"] * 3
    assert "no retries left" in done.reason
    reasons = [t.reason for t in done.transitions]
    assert any("user-error retry 1 of 2" in r for r in reasons)
    assert any("user-error retry 2 of 2" in r for r in reasons)
    assert [client.logs(sub.id, attempt=n).strip() for n in (1, 2, 3)] == ["try 1", "try 2", "try 3"]


def test_user_retries_limited_to_listed_exit_codes(client):
    sub = client.submit({"name": "not-retried", "command": "exit 4",
                         "retries": {"user": 3, "user_exit_codes": [75]}})
    done = client.wait(sub.id, timeout=60)
    assert done.state == "FAILED" and len(done.attempts) == 1
    assert "exit code 4 is not in retries.user_exit_codes" in done.reason


def test_stalled_job_fails_with_reason_stalled(client):
    sub = client.submit({"name": "stalls", "command": "echo working; sleep 120", "stall_timeout": "3s",
                         "grace_period": "1s"})
    done = client.wait(sub.id, timeout=60)
    assert done.state == "FAILED"
    assert done.attempts[-1].outcome == "STALLED"
    assert "stall_timeout" in done.reason


def test_lost_rank_retry_avoids_its_node(client):
    sub = client.submit({"name": "rank-lost", "nodes": 2, "resources": {"cpus": 1},
                         "command": 'echo "on $RAYBATCH_NODE_RANK"; sleep 5'})
    wait_for(lambda: client.get(sub.id).state.value == "RUNNING", 60, "RUNNING")
    rank1 = client.get(sub.id).attempts[0].ranks[1]
    with open(f"/proc/{rank1.pid}/stat") as f:
        actor_pid = int(f.read().split(")")[-1].split()[1])  # the rank actor's worker process
    os.kill(actor_pid, signal.SIGKILL)  # the node stays up; only the rank is lost
    done = client.wait(sub.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    first, second = done.attempts
    assert first.outcome == "NODE_LOST" and first.lost_nodes == [rank1.node_id]
    assert rank1.node_id not in {r.node_id for r in second.ranks}
    assert not process_alive(rank1.pid)


def test_mpi_node_lost_mid_run_is_node_lost_and_retried_with_nothing_left_behind(client, ray_cluster):
    """mpirun notices a dead daemon before Ray reports the node: still NODE_LOST (infra
    budget), not the user's error, and attempt 1's processes are gone everywhere."""
    from tests.test_mpi_e2e import _job_processes

    sub = client.submit(RECIPES / "mpi-allreduce" / "job.yaml",
                        overrides=['command=python allreduce.py --epochs '
                                   '$([ "$RAYBATCH_ATTEMPT" = 1 ] && echo 200000 || echo 300)'])
    try:
        wait_for(lambda: client.logs(sub.id).count("rank ") >= 2, 120, "both MPI processes to start")
    except AssertionError:
        d = client.get(sub.id)
        raise AssertionError((d.state, d.reason, client.logs(sub.id), client.logs(sub.id, stream="stderr"),
                              client.logs(sub.id, rank=1, stream="stderr")))
    first = client.get(sub.id)
    workers = {n.node_id: n for n in ray_cluster.cluster.worker_nodes}
    victim_rank = next(r for r in first.attempts[0].ranks if r.node_id in workers)
    ray_cluster.cluster.remove_node(workers[victim_rank.node_id])
    removed = time.time()
    try:
        done = client.wait(sub.id, timeout=240)
        assert [a.outcome for a in done.attempts][:1] == ["NODE_LOST"], [a.reason for a in done.attempts]
        assert "was lost" in done.attempts[0].reason
        assert done.state == "SUCCEEDED", done.reason
        assert victim_rank.node_id not in {r.node_id for r in done.attempts[-1].ranks}
        assert "allreduce sum: 3 (expected 3)" in client.logs(sub.id, attempt=len(done.attempts))
        assert not _job_processes(sub.id)
        assert done.attempts[0].ended_at - removed < 60, "the loss is noticed within Ray's failure detection"
    finally:
        ray_cluster.add_node(1)
