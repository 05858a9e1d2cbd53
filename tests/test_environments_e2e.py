"""Per-job Python environments end to end on a real 2-node Ray cluster with a real
server: ``packages`` (a Ray pip runtime_env per distinct list, built once per node and
reused), a list that cannot be installed (fails at START in seconds, with pip's words),
``image`` without podman, and the ChainerMN recipe in its own environment.

The nodes of ray.cluster_utils share one session directory; each gets its own
runtime_env directory here, as separate machines would have (two runtime-env agents
building the same env in one directory undo each other's work)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import RECIPES, RayTestCluster, wait_for

pytestmark = pytest.mark.timeout(900)

NUMPY_1 = ["numpy<2"]
BROKEN = "this-package-does-not-exist-raybatch==1.0"
PRINT_NUMPY = "python -c 'import numpy, sys; print(\"numpy\", numpy.__version__, sys.executable)'"


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    names = (f"runtime_resources_rb{i}" for i in itertools.count())
    add_node = Cluster.add_node

    def own_env_dir(self, wait=True, **kw):
        kw.setdefault("runtime_env_dir_name", next(names))
        return add_node(self, wait, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Cluster, "add_node", own_env_dir)
        c = RayTestCluster(nodes=2)
    c.env_dirs = [Path(n.get_session_dir_path()) / n._ray_params.runtime_env_dir_name
                  for n in [c.cluster.head_node, *c.workers]]
    yield c
    c.shutdown()  # removes the nodes' env dirs (each env a copy of the node's virtualenv, GBs)


def job(client, **fields):
    base = {"name": "env", "experiment": "tests", "nodes": 2, "resources": {"cpus": 1}}
    return client.submit({**base, **fields})


def driver_log(cluster, job_id: str, attempt: int = 1) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url).get_job_logs(f"raybatch-{job_id}-{attempt}")


def pip_envs(cluster) -> dict[str, int]:
    """Every pip env on every node: path -> inode of its virtualenv (a rebuild changes it)."""
    return {str(v): v.stat().st_ino for d in cluster.env_dirs for v in d.glob("pip/*/virtualenv")}


def first_output_after(client, job_id: str, t0: float, timeout: float) -> float:
    wait_for(lambda: client.logs(job_id).strip(), timeout, "the job's first output", interval=0.1)
    return time.monotonic() - t0


def test_packages_give_the_ranks_their_own_numpy_and_are_built_once(client, ray_cluster):
    t0 = time.monotonic()
    first = job(client, name="numpy1", packages={"pip": NUMPY_1}, command=PRINT_NUMPY)
    build_s = first_output_after(client, first.id, t0, 600)
    done = client.wait(first.id, timeout=120)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(first.id, stream="stderr"))
    for rank in (0, 1):
        line = client.logs(first.id, rank=rank)
        assert re.search(r"numpy 1\.\d+", line), line
        assert "runtime_resources_rb" in line, "the rank's python is the job's env"
    assert len({r.node_id for r in done.attempts[-1].ranks}) == 2
    log = driver_log(ray_cluster, first.id)
    assert "building the job's environment (pip: 1 package) on 2 node(s)" in log, log
    assert "environment ready on 2 node(s)" in log, log
    envs = pip_envs(ray_cluster)
    assert len(envs) == 2, envs  # one per node

    # the same list again: both nodes reuse their env (same directory, not rebuilt)
    t0 = time.monotonic()
    again = job(client, name="numpy1-again", packages={"pip": NUMPY_1}, command=PRINT_NUMPY)
    reuse_s = first_output_after(client, again.id, t0, 120)
    assert client.wait(again.id, timeout=60).state == "SUCCEEDED"
    assert "numpy 1." in client.logs(again.id, rank=1)
    assert pip_envs(ray_cluster) == envs, "the env was rebuilt"
    ready = re.search(r"environment ready on 2 node\(s\) in ([0-9.]+) s", driver_log(ray_cluster, again.id))
    assert ready and float(ready.group(1)) < 20, ready
    assert reuse_s < build_s / 2, (reuse_s, build_s)

    # without packages: the nodes' own numpy 2
    plain = job(client, name="numpy-node", command=PRINT_NUMPY)
    done = client.wait(plain.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    for rank in (0, 1):
        assert re.search(r"numpy 2\.\d+", client.logs(plain.id, rank=rank))
    assert "building the job's environment" not in driver_log(ray_cluster, plain.id)


def pip_dirs(cluster) -> set[Path]:
    return {p for d in cluster.env_dirs for p in d.glob("pip/*")}


def test_a_broken_requirement_fails_at_start_fast_with_pips_words(client, server, ray_cluster):
    before = pip_dirs(ray_cluster)
    t0 = time.monotonic()
    sub = job(client, name="broken-env", command="echo never", packages={"pip": [BROKEN]})
    done = client.wait(sub.id, timeout=90)
    took = time.monotonic() - t0
    assert done.state == "FAILED", done.reason
    assert took < 60, took  # pip's verdict comes in seconds; Ray's build would take minutes
    assert len(done.attempts) == 1, "not retried"
    attempt = done.attempts[-1]
    assert attempt.outcome == "START_FAILED", attempt.outcome
    assert "could not be built" in done.reason and "this-package-does-not-exist-raybatch" in done.reason
    assert "No matching distribution" in done.reason or "Could not find a version" in done.reason
    logs = list((Path(done.logs_dir) / "attempt-1" / "environment").glob("*.txt"))
    assert logs, done.reason
    assert "this-package-does-not-exist-raybatch" in logs[0].read_text()
    assert client.logs(sub.id) == ""  # no rank ran
    # pip ran on a node of the job's gang (a task in its placement group), not in the driver
    assert "on node 0 of the gang" in driver_log(ray_cluster, sub.id)
    from ray.util.state import list_tasks

    checks = list_tasks(address=ray_cluster.dashboard_url, filters=[("name", "=", "raybatch-pip-check")],
                        detail=True, raise_on_missing_output=False)
    assert checks and all(t.placement_group_id for t in checks), checks
    # Ray's agents go on building the list after the job failed (a clone of the node's
    # virtualenv, GBs each), until pip fails there: the next test's build must not share the
    # disk with those copies (it ran out of space on CI)
    wait_for(lambda: pip_dirs(ray_cluster) <= before, 600, "Ray's agents to give up the broken list's env",
             interval=1)


def test_pip_sources_and_credentials_are_refused_at_submit_unless_the_policy_allows_sources(client, server):
    """A path, URL, VCS entry or pip option would have pip build code from it on the
    nodes: refused at submit, naming the entry, unless the server's policy allows them;
    index credentials never get in (nor into Ray's runtime_env, the store or `show`)."""
    import httpx

    def post(pip: list[str]) -> httpx.Response:  # the raw API, past the SDK's own check
        # a resource no node has: an accepted job stays QUEUED (nothing built, nothing run)
        body = {"spec": {"name": "src", "experiment": "tests", "command": "echo x", "packages": {"pip": pip},
                         "resources": {"cpus": 1, "custom": {"rb_test_nowhere": 1}}}}
        return httpx.post(f"{server.url}/api/v1/jobs", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {server.token}"})

    for item in ("-e ./pkg", "git+https://github.com/org/repo", "/abs/pkg", "file:///srv/x.whl",
                 "--index-url http://127.0.0.1:9/simple"):
        r = post(["numpy<2", item])
        assert r.status_code == 400 and f"packages.pip: '{item}'" in r.text and "allow_pip_sources" in r.text, r.text
    secret = "s3cret-index-token"
    r = post([f"--extra-index-url http://raybatch:{secret}@127.0.0.1:9/simple", "numpy<2"])
    assert r.status_code == 400 and "credentials" in r.text and secret not in r.text, r.text

    policy = server.state_dir / "policy.yaml"
    policy.write_text("allow_pip_sources: true\n")
    try:
        accepted = wait_for(lambda: (r := post(["-e ./pkg"])).status_code != 400 and r, 30,
                            "the server to re-read its policy")
        assert accepted.status_code == 201 and accepted.json()["state"] == "QUEUED", accepted.text
        r = post([f"--extra-index-url http://raybatch:{secret}@127.0.0.1:9/simple"])
        assert r.status_code == 400 and secret not in r.text, r.text  # credentials: never, policy or not
    finally:
        policy.unlink()
        for j in client.list(experiment="tests", state=["QUEUED", "STARTING", "RUNNING"]):
            if j.name == "src":
                client.cancel(j.id)


@pytest.mark.skipif(shutil.which("podman") is not None, reason="podman is installed here")
def test_image_without_podman_fails_at_start_with_a_clear_message(client):
    sub = job(client, name="image-env", nodes=1, image="docker.io/library/python:3.11-slim", command="echo never")
    done = client.wait(sub.id, timeout=90)
    assert done.state == "FAILED", done.reason
    assert done.attempts[-1].outcome == "START_FAILED"
    assert "podman is not installed" in done.reason and "image" in done.reason, done.reason
    assert list((Path(done.logs_dir) / "attempt-1" / "environment").glob("node-0.txt"))


def test_chainer_recipe_on_two_nodes(client, ray_cluster):
    sub = client.submit(RECIPES / "chainer-digits-mpi" / "job.yaml")
    done = client.wait(sub.id, timeout=700)
    log = client.logs(sub.id, rank=0)
    assert done.state == "SUCCEEDED", (done.reason, log[-3000:], client.logs(sub.id, stream="stderr")[-3000:])
    ranks = done.attempts[-1].ranks
    assert [r.role for r in ranks] == ["mpirun", "mpi-node"]
    assert len({r.node_id for r in ranks}) == 2
    assert float(re.search(r"test accuracy: ([0-9.]+)", log).group(1)) > 0.9
    assert "weights identical on all ranks: True" in log
    result = json.loads((Path(done.outputs["result"]) / "result.json").read_text())
    assert result["size"] == 2 and result["chainer"] == "7.8.1" and result["numpy"].startswith("1.")
    assert sorted(result["nodes"]) == ["0", "1"], "each MPI process must run under its own Ray node"
