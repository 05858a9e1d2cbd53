"""The local default is crash-safe, as a user meets it: real `ray start` nodes, the real
server and supervisor under a tmp RAYBATCH_HOME, driven through the `raybatch` CLI.

(a) a server killed with SIGKILL is restarted by the supervisor and the running 2-node
job finishes with its one attempt; (b) with the supervisor and the server both killed,
`raybatch up` restarts those two only and the job keeps its attempt; (c) a worker node
killed whole is restarted by `raybatch up` and rejoins the same head. One `up` for the
module; every kill is of a pid local.json recorded. Plus, without Ray, the supervisor's
back-off on a server that keeps dying and its exit once `down` removed local.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raybatch.local import supervisor as sup
from raybatch.local.embedded import LocalCluster, _group_members
from tests.conftest import process_alive, wait_for
from tests.fake_autoscaling import cmdline

pytestmark = pytest.mark.timeout(420)
RAYBATCH = str(Path(sys.executable).with_name("raybatch"))
# a 2-node job of ~20 s that needs no checkpoint: any restart of it would show as a 2nd attempt
JOB = """name: ticks
framework: custom
nodes: 2
command: for i in $(seq 1 20); do echo "tick $i rank $RANK attempt $RAYBATCH_ATTEMPT"; sleep 1; done
"""


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervised")
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAYBATCH_ADDRESS", "RAYBATCH_TOKEN")}
    env["RAYBATCH_HOME"] = str(home)
    (root / "job.yaml").write_text(JOB)

    def rb(*args, timeout=180):
        return subprocess.run([RAYBATCH, *args], capture_output=True, text=True, env=env, timeout=timeout)

    def info():
        return json.loads((home / "local.json").read_text())

    def logs():
        return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                       for p in sorted((home / "logs").glob("*.log")) if p.name in ("server.log", "supervisor.log"))

    recorded: list[int] = []
    p = rb("up", "--nodes", "2")
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        yield SimpleNamespace(home=home, rb=rb, info=info, logs=logs, job=str(root / "job.yaml"),
                              recorded=recorded)
    finally:
        if (home / "local.json").exists():
            pids = info()["pids"]
            recorded += [pids["head"], *pids["workers"], pids["server"], pids["supervisor"]]
        down = rb("down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not any(process_alive(pid) for pid in recorded)
    assert not (home / "local.json").exists()


def _parts(local) -> dict[str, dict]:
    p = local.rb("status", "-o", "json")
    assert p.returncode == 0, p.stdout + p.stderr + local.logs()
    return {part["part"]: part for part in json.loads(p.stdout)["local"]["parts"]}


def _running_job(local) -> str:
    p = local.rb("submit", local.job)
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = p.stdout.splitlines()[0]
    wait_for(lambda: json.loads(local.rb("show", job_id, "-o", "json").stdout)["state"] == "RUNNING",
             90, f"job {job_id} to run", interval=1)
    return job_id


def _succeeded_with_one_attempt(local, job_id: str) -> None:
    p = local.rb("wait", job_id, "--timeout", "150", timeout=200)
    shown = json.loads(local.rb("show", job_id, "-o", "json").stdout)
    assert p.returncode == 0 and shown["state"] == "SUCCEEDED", p.stderr + json.dumps(shown)[-1500:] + local.logs()
    assert [a["outcome"] for a in shown["attempts"]] == ["SUCCEEDED"], shown["attempts"]
    assert len({r["node_id"] for r in shown["attempts"][0]["ranks"]}) == 2
    out = local.rb("logs", job_id, "--rank", "1").stdout
    assert "tick 20 rank 1 attempt 1" in out, out


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), 10, f"pid {pid} to die")


def test_a_killed_server_is_restarted_by_the_supervisor_and_the_job_keeps_its_attempt(local):
    before = local.info()["pids"]
    job_id = _running_job(local)
    _kill(before["server"])
    # the supervisor starts a new server on the same port; it re-adopts the running attempt
    wait_for(lambda: local.info()["pids"]["server"] != before["server"], 30, "the supervisor to restart the server")
    # `status` exits 1 (and says to run `raybatch up`) until the new server answers
    wait_for(lambda: local.rb("status").returncode == 0, 60, "the restarted server to answer", interval=1)
    parts = _parts(local)
    assert parts["server"]["alive"] and parts["server"]["answers"], parts
    assert parts["server"]["restarts"] == 1, parts
    assert parts["server"]["last_restart"]["why"].startswith("restarted by the supervisor"), parts
    _succeeded_with_one_attempt(local, job_id)
    after = local.info()["pids"]
    assert (after["head"], after["workers"], after["supervisor"]) == \
        (before["head"], before["workers"], before["supervisor"])


def test_b_up_restarts_only_the_killed_supervisor_and_server(local):
    before = local.info()["pids"]
    restarts = _parts(local)["server"]["restarts"]
    job_id = _running_job(local)
    _kill(before["supervisor"])  # first, so it cannot restart the server itself
    _kill(before["server"])
    # what the CLI says now, and what it tells the user to run
    p = local.rb("status")
    assert p.returncode == 1 and "raybatch up" in p.stderr, p.stdout + p.stderr
    assert "DEAD" in p.stdout
    p = local.rb("up")
    assert p.returncode == 0, p.stdout + p.stderr + local.logs()
    assert "restarted:       server, supervisor" in p.stdout, p.stdout
    after = local.info()["pids"]
    assert (after["head"], after["workers"]) == (before["head"], before["workers"])
    assert after["server"] != before["server"] and after["supervisor"] != before["supervisor"]
    parts = _parts(local)
    assert all(part["alive"] for part in parts.values()), parts
    assert (parts["server"]["restarts"], parts["supervisor"]["restarts"]) == (restarts + 1, 1), parts
    _succeeded_with_one_attempt(local, job_id)


def test_c_up_restarts_a_killed_node_which_rejoins_the_same_head(local):
    before = local.info()["pids"]
    alive_before = {n["node_id"] for n in json.loads(local.rb("status", "-o", "json").stdout)["nodes"] if n["alive"]}
    assert len(alive_before) == 2
    node = before["workers"][0]  # its `ray start --block`, leader of the node's process group
    group = _group_members(node)
    raylets = [pid for pid in group if "raylet" in cmdline(pid).split(" ")[0]]
    assert raylets, f"no raylet in process group {node}"
    os.killpg(node, signal.SIGKILL)  # the whole node: ray start, raylet, agents, workers
    wait_for(lambda: not _group_members(node), 15, "the node's processes to die")
    p = local.rb("up")
    assert p.returncode == 0, p.stdout + p.stderr + local.logs()
    assert "restarted:       ray-node-1" in p.stdout, p.stdout
    after = local.info()["pids"]
    assert after["head"] == before["head"] and after["server"] == before["server"]
    assert after["workers"][0] != node and process_alive(after["workers"][0])

    def rejoined():  # two alive nodes again: the head and the new one (the old one is dead)
        nodes = json.loads(local.rb("status", "-o", "json").stdout)["nodes"]
        alive = {n["node_id"] for n in nodes if n["alive"]}
        return len(alive) == 2 and alive - alive_before

    wait_for(rejoined, 90, "the restarted node to rejoin and the dead one to be marked dead", interval=2)
    assert _parts(local)["ray-node-1"]["restarts"] == 1


def test_supervisor_backs_off_a_server_that_keeps_dying_and_exits_after_down(tmp_path, monkeypatch):
    """The supervisor's loop for real (real processes, local.json, the lock) with a "server"
    that exits 3 at once: restarts spaced by the back-off, each counted with why; then
    local.json removed as `down` does: it exits and starts nothing more."""
    monkeypatch.setattr(sup, "POLL_S", 0.05)
    monkeypatch.setattr(sup, "BACKOFF_S", (0, 0.4, 0.8))
    head = subprocess.Popen(["sleep", "120"], start_new_session=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    local = LocalCluster(tmp_path)
    local._write({"url": "http://127.0.0.1:9", "ray_address": "127.0.0.1:8", "dashboard_url": "http://127.0.0.1:7",
                  "nodes": 1, "cpus_per_node": 1, "temp_dirs": [],
                  "pids": {"head": head.pid, "workers": [], "server": gone.pid, "supervisor": os.getpid()}})
    starts: list[float] = []

    def crashing_server(info, env):
        proc = local.popen(["sh", "-c", "exit 3"], "server.log", env)
        info["pids"]["server"] = proc.pid
        local._write(info)
        starts.append(time.monotonic())
        return proc

    s = sup.Supervisor(tmp_path)
    s.local = local
    local.start_server = crashing_server
    t = threading.Thread(target=s.run, daemon=True)
    try:
        t.start()
        wait_for(lambda: len(starts) >= 4, 20, "four restarts")
        info = local.info()
        assert info["restarts"]["server"] >= 4
        assert info["last_restart"]["server"]["why"] == "restarted by the supervisor: it exited with code 3"
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert gaps[0] >= 0.4 and gaps[1] >= 0.8 and gaps[2] >= 0.8, gaps  # not one restart per poll
        local.info_file.unlink()  # what `down` does, under the lock, after stopping the supervisor
        t.join(5)
        assert not t.is_alive(), "the supervisor kept running after local.json was removed"
        n = len(starts)
        time.sleep(1)
        assert len(starts) == n
    finally:
        head.kill()
        head.wait()
