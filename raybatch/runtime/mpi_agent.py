"""Open MPI's rsh agent for raybatch: starts an MPI daemon on another node of the gang
through the job's rank actors instead of ssh.

``mpirun`` (in rank 0) runs ``python3 -m raybatch.runtime.mpi_agent HOST <command…>``
once per node, like ``ssh HOST command``. The agent (stdlib only: it starts in
milliseconds) sends HOST and the command over a Unix socket to the ``AgentServer``
that rank 0's actor runs; the server starts the command in HOST's first rank actor
(``RankActor.exec_start``) and answers with its exit code when it ends. The agent
lasts as long as the daemon, as an ssh session would; when mpirun kills the agent,
the server sees the socket close and stops the daemon."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from raybatch.contract import MPI_AGENT_SOCKET_ENV as SOCKET_ENV  # set by the mpi framework on rank 0

POLL_S = 0.5


# ---- the agent (in mpirun's process tree) -------------------------------------------------
def main(argv: list[str]) -> int:
    words = [w for w in argv if w]
    # ssh-style options before the host (plm_ssh_args): raybatch sets none; skip any "-x"-like flag
    while words and words[0].startswith("-"):
        words.pop(0)
    if len(words) < 2:
        print("usage: python -m raybatch.runtime.mpi_agent HOST COMMAND...", file=sys.stderr)
        return 255
    host = words[0].rsplit("@", 1)[-1]
    command = " ".join(words[1:])
    path = os.environ.get(SOCKET_ENV)
    if not path:
        print(f"raybatch mpi agent: {SOCKET_ENV} is not set (run mpirun through a raybatch job)",
              file=sys.stderr)
        return 255
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as e:
        print(f"raybatch mpi agent: cannot reach rank 0's agent server at {path}: {e}", file=sys.stderr)
        return 255

    def stop(signum: int, _frame: Any) -> None:  # mpirun ends the "ssh session": stop the daemon
        conn.close()
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    conn.sendall(json.dumps({"host": host, "command": command}).encode() + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            print(f"raybatch mpi agent: the agent server closed the connection for {host}", file=sys.stderr)
            return 255
        reply += chunk
    answer = json.loads(reply)
    if answer.get("error"):
        print(f"raybatch mpi agent: {answer['error']}", file=sys.stderr)
    return int(answer.get("exit", 255))


# ---- the server (in rank 0's actor) -------------------------------------------------------
def uts_available() -> bool:
    """Can this node start a process in its own UTS namespace (its own host name)?"""
    try:
        return subprocess.run(["unshare", "--uts", "true"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def daemon_argv(host: str, command: str, own_uts: bool) -> list[str]:
    """How a node runs the daemon's command: ``sh -c``, in a UTS namespace whose host name
    is HOST when the gang's Ray nodes share one machine (Open MPI tells nodes apart by
    host name)."""
    if not own_uts:
        return ["/bin/sh", "-c", command]
    return ["unshare", "--uts", "/bin/sh", "-c", 'hostname "$1" && exec /bin/sh -c "$2"', "sh", host, command]


class AgentServer:
    """Serves the agents of one attempt: HOST -> that node's first rank actor."""

    def __init__(self, path: str, nodes: dict[str, dict], own_uts: bool):
        self.path = path
        self.nodes = nodes
        self.own_uts = own_uts
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="mpi-agent-server").start()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        finally:
            Path(self.path).unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        import ray  # noqa: PLC0415 - the agent side must not import ray

        with conn:
            try:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                request = json.loads(data)
                host, command = request["host"], request["command"]
                node = self.nodes.get(host)
                if node is None:
                    conn.sendall(json.dumps({"exit": 255, "error": f"unknown host '{host}'; the gang's "
                                             f"hosts are {', '.join(self.nodes)}"}).encode() + b"\n")
                    return
                actor = node["actor"]
                handle = ray.get(actor.exec_start.remote(daemon_argv(host, command, self.own_uts),
                                                         node["env"], node["cwd"], node["log_dir"]))
                while True:
                    code = ray.get(actor.exec_wait.remote(handle, POLL_S))
                    if code is not None:
                        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
                        return
                    readable, _, _ = select.select([conn], [], [], 0)
                    if readable and not conn.recv(1):  # the agent is gone: so is the "session"
                        actor.exec_kill.remote(handle)
                        return
            except Exception as e:  # noqa: BLE001 - report to the agent, which prints it for mpirun
                try:
                    conn.sendall(json.dumps({"exit": 255, "error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
