"""The mpi adapter and the rsh agent's client side, without Ray."""

from __future__ import annotations

import json
import os
import signal
import stat
import socket
import subprocess
import sys
import threading

import pytest

from raybatch import frameworks
from raybatch.frameworks.base import RankContext
from raybatch.frameworks.mpi import agent_socket, daemon_env, host_name
from raybatch.runtime import mpi_agent
from raybatch.spec.job import JobSpec


def ctx(rank: int, ppn: int = 1, nodes: int = 2) -> RankContext:
    return RankContext(job_id="j1", attempt=1, rank=rank, local_rank=rank % ppn, node_rank=rank // ppn,
                       num_nodes=nodes, processes_per_node=ppn, master_addr="10.0.0.1", master_port=2222,
                       node_ip="10.0.0.1", job_dir="/jobs/j1", stdouterr_dir="/jobs/j1/so", checkpoint_dir="/c",
                       job_temp=f"/tmp/rb/node-{rank // ppn}", shared_job_temp="/s", workdir="/code")


def spec(**kw) -> JobSpec:
    return JobSpec(**{"name": "m", "command": "python allreduce.py", "framework": "mpi", "nodes": 2, **kw})


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """The agent installs SIGTERM/SIGINT/SIGHUP handlers (it is a process of its own)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_rank0_runs_mpirun_over_every_slot_and_the_others_run_nothing():
    s = spec(processes_per_node=2, mpi={"mpirun_args": "--mca btl tcp,self"})
    fw = frameworks.get("mpi")
    argv = fw.command(s, ctx(0, ppn=2))
    assert argv[:8] == ["mpirun", "-np", "4", "--map-by", "slot", "--bind-to", "none", "--mca"]
    assert argv[-3:-1] == ["/bin/bash", "-c"] and argv[-1].endswith("; python allreduce.py")
    assert all(fw.command(s, ctx(r, ppn=2)) is None for r in (1, 2, 3))
    assert [fw.role(s, r) for r in range(4)] == ["mpirun", "idle", "mpi-node", "idle"]
    assert fw.ends_with_rank0(s)
    assert fw.files(s, ctx(0, ppn=2)) == {"/tmp/rb/node-0/mpi-hostfile": "rbh-0 slots=2\nrbh-1 slots=2\n"}
    assert fw.files(s, ctx(2, ppn=2)) == {}


def test_mpirun_env_sends_every_node_through_the_agent():
    s = spec()
    env = frameworks.get("mpi").rank_env(s, ctx(0))
    assert env["PRTE_MCA_plm_ssh_agent"] == "python3 -m raybatch.runtime.mpi_agent"
    assert env["PRTE_MCA_prte_default_hostfile"] == env["RAYBATCH_MPI_HOSTFILE"] == "/tmp/rb/node-0/mpi-hostfile"
    assert env["PRTE_MCA_rml_base_radix"] == "64"  # no tree spawn: the socket is on rank 0's node
    assert frameworks.get("mpi").rank_env(spec(nodes=300), ctx(0))["PRTE_MCA_rml_base_radix"] == "300"
    assert env["RAYBATCH_MPI_AGENT_SOCKET"] == agent_socket("j1", 1)
    assert len(agent_socket("j" * 64, 99)) < 100  # a Unix socket path holds 107 bytes
    assert "PRTE_MCA_plm_ssh_agent" not in frameworks.get("mpi").rank_env(s, ctx(1))


def test_daemon_env_drops_per_rank_variables():
    env = frameworks.get("mpi").rank_env(spec(environment={"MY": "1"}), ctx(1))
    d = daemon_env(env)
    assert "RANK" not in d and "LOCAL_RANK" not in d and "AZ_BATCHAI_TASK_INDEX" not in d
    assert d["RAYBATCH_NODE_RANK"] == "1" and d["MY"] == "1"
    assert host_name(3) == "rbh-3"


def test_chainer_and_horovod_launch_like_mpi():
    for name in ("chainer", "horovod"):
        fw = frameworks.get(name)
        s = spec(framework=name)
        assert fw.command(s, ctx(0))[0] == "mpirun" and fw.command(s, ctx(1)) is None
    assert frameworks.get("chainer").rank_env(spec(framework="chainer"), ctx(0))[
        "RAYBATCH_CHAINERMN_COMMUNICATOR"] == "naive"


def test_daemon_argv_own_uts_namespace_when_nodes_share_a_host_name():
    assert mpi_agent.daemon_argv("rbh-1", "prted --x", False) == ["/bin/sh", "-c", "prted --x"]
    argv = mpi_agent.daemon_argv("rbh-1", "prted --x", True)
    assert argv[:2] == ["unshare", "--uts"] and argv[-2:] == ["rbh-1", "prted --x"]


def test_agent_sends_host_and_command_and_exits_with_the_daemons_code(tmp_path, monkeypatch):
    path = str(tmp_path / "a.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    got = {}

    def serve():
        conn, _ = server.accept()
        with conn:
            got.update(json.loads(conn.makefile().readline()))
            conn.sendall(b'{"exit": 7}\n')

    t = threading.Thread(target=serve)
    t.start()
    (tmp_path / "key").write_text("k3y\n")
    monkeypatch.setenv(mpi_agent.SOCKET_ENV, path)
    monkeypatch.setenv(mpi_agent.KEY_ENV, str(tmp_path / "key"))
    assert mpi_agent.main(["root@rbh-1", "PRTE_PREFIX=/v;export", "PRTE_PREFIX;", "/v/bin/prted", "--x"]) == 7
    t.join()
    server.close()
    assert got == {"host": "rbh-1", "command": "PRTE_PREFIX=/v;export PRTE_PREFIX; /v/bin/prted --x", "key": "k3y"}


def test_agent_outside_a_job_says_why(monkeypatch, capsys):
    monkeypatch.delenv(mpi_agent.SOCKET_ENV, raising=False)
    assert mpi_agent.main(["rbh-1", "prted"]) == 255
    assert "RAYBATCH_MPI_AGENT_SOCKET is not set" in capsys.readouterr().err
    monkeypatch.setenv(mpi_agent.SOCKET_ENV, "/nonexistent/x.sock")
    assert mpi_agent.main(["rbh-1", "prted"]) == 255
    assert "cannot reach rank 0's agent server" in capsys.readouterr().err


def ask(path: str, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        c.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(c.makefile().readline())


def _recording_server(path: str):
    """An agent server for one host whose rank actor only records what reaches its
    exec_start (what a refused request must never reach); (server, the calls it got)."""
    ran: list = []

    class Actor:
        class exec_start:  # noqa: N801
            @staticmethod
            def remote(*a):
                ran.append(a)
                raise RuntimeError("ran")

    server = mpi_agent.AgentServer(path, {"rbh-1": {"actor": Actor, "env": {}, "cwd": None, "log_dir": "/x"}},
                                   own_uts=False)
    return server, ran


def test_the_agent_server_refuses_a_connection_without_the_attempts_key(monkeypatch, capsys):
    """Any process of the user could connect to the socket; only mpirun's agents, which
    were handed the attempt's key, get a command run in a rank actor."""
    s = spec()
    env0 = frameworks.get("mpi").rank_env(s, ctx(0))
    path = env0[mpi_agent.SOCKET_ENV]
    assert env0[mpi_agent.KEY_ENV] == mpi_agent.key_file(path)
    server, ran = _recording_server(path)
    server.expect_session(os.getsid(0))  # as if this test's process were rank 0's mpirun
    try:
        root = os.path.dirname(os.path.dirname(path))  # <tmp>/raybatch-<uid>/mpi/<x>.sock
        assert root.endswith(f"raybatch-{os.getuid()}")
        for d in (root, os.path.dirname(path)):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        assert stat.S_IMODE(os.stat(mpi_agent.key_file(path)).st_mode) == 0o600
        key = open(mpi_agent.key_file(path)).read().strip()
        assert len(key) == 64 and key == server.key

        for bad in ({}, {"key": ""}, {"key": "0" * 64}, {"key": key[:-1]}, {"key": 7}):
            answer = ask(path, {"host": "rbh-1", "command": "touch /tmp/pwned", **bad})
            assert answer["exit"] == 255 and answer["error"].startswith("refused"), answer
        assert ran == []
        # the key gets the request through to the rank actor (here: one that fails on purpose)
        answer = ask(path, {"host": "rbh-1", "command": "prted", "key": key})
        assert len(ran) == 1 and "RuntimeError: ran" in answer["error"]
        # mpirun's agent, with rank 0's environment, carries the key
        ran.clear()
        monkeypatch.setenv(mpi_agent.SOCKET_ENV, path)
        monkeypatch.setenv(mpi_agent.KEY_ENV, env0[mpi_agent.KEY_ENV])
        assert mpi_agent.main(["rbh-1", "prted"]) == 255 and len(ran) == 1
        # other nodes' daemons (and the job's MPI processes) do not get the agent's socket or key
        assert mpi_agent.SOCKET_ENV not in daemon_env(env0) and mpi_agent.KEY_ENV not in daemon_env(env0)
    finally:
        server.close()
    assert not os.path.exists(path) and not os.path.exists(mpi_agent.key_file(path))


ASK = ("import json, socket, sys; c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); "
       "c.sendall(sys.argv[2].encode() + b'\\n'); print(c.makefile().readline(), end='')")


def ask_from_child(path: str, request: dict, new_session: bool) -> dict:
    """Ask from another process: in this process's session, or in a session of its own (as
    another job's rank is: each rank's process is started with start_new_session=True)."""
    out = subprocess.run([sys.executable, "-c", ASK, path, json.dumps(request)], capture_output=True,
                         text=True, timeout=30, start_new_session=new_session)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_agent_server_serves_only_rank0s_session_even_with_the_key():
    """Another job of the same user can read the 0600 key file; its processes are in their
    own rank's session, not in rank 0's, so the server refuses them (SO_PEERCRED)."""
    path = agent_socket("jsess", 1)
    server, ran = _recording_server(path)
    try:
        request = {"host": "rbh-1", "command": "prted", "key": server.key}
        # rank 0's process has not started yet: nobody's session is served
        answer = ask(path, request)
        assert answer["exit"] == 255 and answer["error"].startswith("refused: the connecting process"), answer
        server.expect_session(os.getsid(0))  # rank 0's process: this test's session
        answer = ask_from_child(path, request, new_session=True)  # another job's rank, with the key
        assert answer["exit"] == 255 and "not in rank 0's process session" in answer["error"], answer
        assert ran == []
        answer = ask_from_child(path, request, new_session=False)  # mpirun's agent: rank 0's session
        assert len(ran) == 1 and "RuntimeError: ran" in answer["error"], answer
        # the right session without the key is still refused
        answer = ask_from_child(path, {**request, "key": "0" * 64}, new_session=False)
        assert answer["error"].startswith("refused: the request does not carry"), answer
        assert len(ran) == 1
    finally:
        server.close()
