"""Open MPI's rsh agent for raybatch: starts an MPI daemon on another node of the gang
through the job's rank actors instead of ssh.

``mpirun`` (in rank 0) runs ``python3 -m raybatch.runtime.mpi_agent HOST <command…>``
once per node, like ``ssh HOST command``. The agent (stdlib only: it starts in
milliseconds) sends HOST and the command over a Unix socket to the ``AgentServer``
that rank 0's actor runs; the server starts the command in HOST's first rank actor
(``RankActor.exec_start``) and answers with its exit code when it ends. The agent
lasts as long as the daemon, as an ssh session would; when mpirun kills the agent,
the server sees the socket close and stops the daemon.

Who may ask: the socket is in this user's 0700 directory (``<tmp>/raybatch-<uid>/mpi``),
and every request carries the attempt's key, a random secret the server writes 0600
beside its socket (``<socket>.key``) and names in rank 0's environment
(``RAYBATCH_MPI_AGENT_KEY_FILE``, what mpirun's agents inherit); a connection without it
is refused (``hmac.compare_digest``). Another process of the same user on the node that
knows neither path cannot start commands in this attempt's rank actors.

The key alone does not stop another job of the same user: its ranks run as this uid and
can read the 0600 key file. So the server also checks who is at the other end of the
socket (``SO_PEERCRED``): the peer must be in rank 0's process session. Rank 0's process is
started in a session of its own (``RankActor.start``: ``start_new_session=True``, so its
session id is its pid), and mpirun and its agents inherit that session; another job's
processes are in their own rank's session. Until the rank actor names the session
(``AgentServer.expect_session``, right after it starts rank 0's process) every
connection is refused."""

from __future__ import annotations

import hmac
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from raybatch.contract import MPI_AGENT_KEY_ENV as KEY_ENV  # the attempt's key file (rank 0's environment)
from raybatch.contract import MPI_AGENT_SOCKET_ENV as SOCKET_ENV  # set by the mpi framework on rank 0
from raybatch.contract import mpi_agent_key_file as key_file

POLL_S = 0.5
MAX_REQUEST = 1 << 20  # a host and a daemon's command line


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
    try:
        key = Path(os.environ.get(KEY_ENV) or key_file(path)).read_text().strip()
    except OSError as e:
        print(f"raybatch mpi agent: cannot read the attempt's key ({KEY_ENV}): {e}", file=sys.stderr)
        conn.close()
        return 255

    def stop(signum: int, _frame: Any) -> None:  # mpirun ends the "ssh session": stop the daemon
        conn.close()
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    conn.sendall(json.dumps({"host": host, "command": command, "key": key}).encode() + b"\n")
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


def _write_key(path: str, key: str) -> None:
    """0600 from the start (never readable by others, not even for a moment)."""
    Path(path).unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")


def peer_pid(conn: socket.socket) -> Optional[int]:
    """The pid of the process at the other end of a Unix socket (``SO_PEERCRED``: the
    kernel's word, not the peer's), or None if it is not this user's or cannot be told."""
    try:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except (OSError, AttributeError):  # AttributeError: no SO_PEERCRED (not Linux)
        return None
    return pid if pid > 0 and uid == os.getuid() else None


def session_of(pid: Optional[int]) -> Optional[int]:
    if pid is None:
        return None
    try:
        return os.getsid(pid)
    except OSError:  # gone already
        return None


class AgentServer:
    """Serves the agents of one attempt: HOST -> that node's first rank actor; only
    requests from a process in rank 0's session (``expect_session``) that carry the
    attempt's key (``self.key``, in ``key_file(path)``)."""

    def __init__(self, path: str, nodes: dict[str, dict], own_uts: bool, session: Optional[int] = None):
        from raybatch.private_dir import ensure_private_parents  # noqa: PLC0415

        self.path = path
        self.nodes = nodes
        self.own_uts = own_uts
        self.key = secrets.token_hex(32)  # one per attempt: a new server per attempt
        self.session = session  # rank 0's process session; None: refuse everyone
        ensure_private_parents(path)  # <tmp>/raybatch-<uid>/mpi: created 0700, or checked to be ours
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_key(key_file(path), self.key)
        Path(path).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="mpi-agent-server").start()

    def expect_session(self, session: int) -> None:
        """Rank 0's process has started: serve the processes of its session (its pid, as
        it was started with ``start_new_session=True``)."""
        self.session = session

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        finally:
            Path(self.path).unlink(missing_ok=True)
            Path(key_file(self.path)).unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def allowed(self, request: Any) -> bool:
        """Does the request carry this attempt's key? (constant time)"""
        key = request.get("key") if isinstance(request, dict) else None
        return isinstance(key, str) and hmac.compare_digest(key.encode(), self.key.encode())

    def peer_allowed(self, conn: socket.socket) -> bool:
        """Is the process at the other end in rank 0's session (mpirun's process tree)?"""
        return self.session is not None and session_of(peer_pid(conn)) == self.session

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                    if len(data) > MAX_REQUEST:
                        conn.sendall(b'{"exit": 255, "error": "request too large"}\n')
                        return
                try:
                    request = json.loads(data)
                except ValueError:
                    request = None
                if not self.peer_allowed(conn):
                    conn.sendall(json.dumps({"exit": 255, "error": "refused: the connecting process is not in "
                                             "rank 0's process session (mpirun's process tree)"}).encode()
                                 + b"\n")
                    return
                if not self.allowed(request):
                    conn.sendall(json.dumps({"exit": 255, "error": "refused: the request does not carry this "
                                             f"attempt's key ({KEY_ENV})"}).encode() + b"\n")
                    return
                import ray  # noqa: PLC0415 - the agent side must not import ray

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
