"""Scheduling policy on a real 2-node Ray cluster with a real server: preemption
of a training job that checkpoints and resumes, EASY backfill, the queue view,
quotas from the policy file and rejection at submit."""

from __future__ import annotations

import json
import re
import time

import pytest

from raybatch.client import RaybatchError
from tests.conftest import RECIPES, wait_for
from tests.test_cli_and_restart import cli

pytestmark = pytest.mark.timeout(300)
RECIPE = RECIPES / "pytorch-digits-ddp" / "job.yaml"


def _accuracy(log: str) -> float:
    return float(re.search(r"test accuracy: ([0-9.]+)", log).group(1))


def test_high_priority_job_preempts_a_low_one_which_resumes_from_its_checkpoint(client):
    low = client.submit(RECIPE, overrides=[
        "name=low-train", "priority=low", "grace_period=20s",
        "command=python train.py --epochs 30 --sleep-per-epoch 0.3"])
    wait_for(lambda: re.search(r"epoch [3-9]/30", client.logs(low.id)), 120, "low: epoch 3")
    high = client.submit(RECIPE, overrides=["name=high-train", "priority=high",
                                            "command=python train.py --epochs 20"])
    # the low job gets SIGTERM, finishes its epoch, writes its checkpoint and is requeued
    wait_for(lambda: client.get(low.id).preemptions == 1, 90, "low to be preempted")
    detail = client.get(low.id)
    assert detail.preempted_by == high.id
    assert detail.attempts[0].outcome == "PREEMPTED"
    assert "SIGTERM received: checkpoint saved at epoch" in client.logs(low.id, attempt=1)
    preempted = next(t for t in detail.transitions if t.to_state.value == "PREEMPTED")
    assert f"preempted by {high.id}" in preempted.reason
    # while the high job runs, the low one waits at the head of the queue, saying why
    wait_for(lambda: client.get(high.id).state.value in ("RUNNING", "SUCCEEDED"), 90, "high to start")
    if client.get(low.id).state.value == "QUEUED":
        entries = client.queue()
        mine = next(e for e in entries if e.id == low.id)
        assert mine.position == 1 and "needs 2 nodes" in mine.reason

    done_high = client.wait(high.id, timeout=180)
    assert done_high.state == "SUCCEEDED", done_high.reason
    assert _accuracy(client.logs(high.id)) > 0.9
    done_low = client.wait(low.id, timeout=240)
    assert done_low.state == "SUCCEEDED", done_low.reason
    assert [a.outcome for a in done_low.attempts] == ["PREEMPTED", "SUCCEEDED"]
    assert done_low.infra_retries == 0 if hasattr(done_low, "infra_retries") else True
    second = client.logs(low.id, attempt=2)
    resumed = int(re.search(r"resumed from checkpoint at epoch (\d+)", second).group(1))
    assert resumed >= 3
    assert _accuracy(second) > 0.9
    # the high job started only after the low one had stopped: their ranks never overlapped
    high_start = client.get(high.id).attempts[0].running_at
    assert high_start >= done_low.attempts[0].ended_at - 1.0


def test_a_non_preemptible_job_is_not_preempted(client):
    protected = client.submit({"name": "protected", "priority": "low", "preemptible": False,
                               "nodes": 2, "command": "sleep 6; echo done", "max_wall_clock": "1m"})
    wait_for(lambda: client.get(protected.id).state.value == "RUNNING", 60, "protected RUNNING")
    urgent = client.submit({"name": "urgent", "priority": "high", "nodes": 2, "command": "echo urgent"})
    time.sleep(2)
    assert client.get(protected.id).preempt_requested is False
    assert "needs 2 nodes" in client.get(urgent.id).waiting_reason
    assert client.wait(protected.id, timeout=60).state == "SUCCEEDED"
    assert client.wait(urgent.id, timeout=60).state == "SUCCEEDED"
    assert client.get(protected.id).preemptions == 0


def test_easy_backfill_runs_a_short_job_without_delaying_the_wide_one(client, server):
    # the runner holds its node through the checks below, even on a slow machine
    runner = client.submit({"name": "runner", "command": "sleep 25", "max_wall_clock": "30s",
                            "grace_period": "5s"})
    wait_for(lambda: client.get(runner.id).state.value == "RUNNING", 60, "runner RUNNING")
    wide = client.submit({"name": "wide", "nodes": 2, "command": "echo wide", "max_wall_clock": "1m"})
    long = client.submit({"name": "long", "command": "echo long", "max_wall_clock": "1h"})
    short = client.submit({"name": "short", "command": "echo short", "max_wall_clock": "10s"})
    # short ends before the runner's limit, when the wide job's nodes are reserved: it backfills
    assert client.wait(short.id, timeout=60).state == "SUCCEEDED"
    assert client.get(wide.id).state.value == "QUEUED"
    # (until Ray's view shows short's node free again, long simply does not fit)
    wait_for(lambda: "would delay " + wide.id in (client.get(long.id).waiting_reason or ""), 15,
             "long to wait for the reservation")
    entries = {e.id: e for e in client.queue()}
    assert entries[wide.id].position == 1 and entries[long.id].position == 2
    assert entries[wide.id].estimated_start is not None
    # the runner may hold its node for max_wall_clock + grace_period
    assert entries[wide.id].estimated_start <= client.get(runner.id).attempts[0].started_at + 35 + 1
    # the CLI view, as users run it
    p = cli(server, "queue", "-o", "json", check=True)
    assert [e["id"] for e in json.loads(p.stdout)][:2] == [wide.id, long.id]
    p = cli(server, "queue", check=True)
    assert "would delay" in p.stdout and wide.id in p.stdout
    for j in (runner, wide, long):
        assert client.wait(j.id, timeout=90).state == "SUCCEEDED"
    assert client.get(wide.id).started_at <= client.get(long.id).started_at


def test_quota_from_the_policy_file_and_rejection_at_submit(client, server):
    policy = server.state_dir / "policy.yaml"
    policy.write_text("quotas:\n  capped: {max_nodes: 1}\n")
    try:
        wait_for(lambda: client.scheduler().policy["quotas"].get("capped"), 10, "the policy to load")
        with pytest.raises(RaybatchError, match=r"can never run: nodes: 2 is more than experiment "
                                                r"'capped''s quota of 1 node"):
            client.submit({"name": "too-wide", "experiment": "capped", "nodes": 2, "command": "true"})
        a = client.submit({"name": "a", "experiment": "capped", "command": "sleep 3"})
        b = client.submit({"name": "b", "experiment": "capped", "command": "true"})
        wait_for(lambda: client.get(a.id).state.value == "RUNNING", 60, "a RUNNING")
        assert "at its quota: 1 of 1 node(s)" in client.get(b.id).waiting_reason
        assert client.wait(b.id, timeout=60).state == "SUCCEEDED"
        # the CLI reports a bad policy file and keeps the last good policy
        policy.write_text("quotas:\n  capped: {max_nodez: 1}\n")
        wait_for(lambda: client.scheduler().policy_error, 10, "the policy error")
        p = cli(server, "status", check=True)
        assert "max_nodez: unknown field" in p.stdout
    finally:
        policy.unlink()
    wait_for(lambda: not client.scheduler().policy["quotas"], 10, "the default policy")


def test_batch_submission_is_all_or_nothing(client):
    before = len(client.list(limit=100_000))
    good = {"spec": {"name": "ok", "command": "true"}}
    bad = {"spec": {"name": "bad", "command": "true"}, "code_package": "0" * 64}
    with pytest.raises(RaybatchError, match=r"jobs\[1\]: code package 0+ was not uploaded"):
        client._request("POST", "/jobs/batch", json={"jobs": [good, bad, good]})
    assert len(client.list(limit=100_000)) == before  # nothing was queued
    jobs = client.submit_many([{"name": f"array-{k}", "command": f"echo item {k}"} for k in range(3)])
    assert [j.name for j in jobs] == ["array-0", "array-1", "array-2"]
    for k, j in enumerate(jobs):
        assert client.wait(j.id, timeout=60).state == "SUCCEEDED"
        assert client.logs(j.id).strip() == f"item {k}"
