"""``raybatch up`` / ``raybatch down`` and the on-demand start of ``submit``.

A local "cluster" is N Ray nodes on this machine (``ray start --block``, one head
and N-1 workers, each with its own raylet), so multi-node gang jobs run on a
laptop exactly as they would on N machines, plus the raybatch server and a small
supervisor that restarts the server when it dies (raybatch.local.supervisor).
Every process is started in its own session and recorded by pid (and start time,
so a recycled pid is never taken for ours) in ``<home>/local.json``; ``down``
stops exactly those (``ray start --block`` stops its own raylet, GCS and dashboard
on SIGTERM) and never touches other Ray clusters on the machine.

``up`` on a recorded cluster restarts only the parts that are dead: running jobs
live in the Ray nodes, so a dead server (or supervisor) is restarted alone and the
new server re-adopts their attempts, and a dead worker node is restarted and rejoins
the same head. Only a dead Ray head (its GCS holds every job) means starting afresh.
Every change of ``local.json`` happens under ``<home>/.lock``, which is how ``up``,
``down`` and the supervisor never fight over a part.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx

from raybatch import config

DEFAULT_NODES = 2
OBJECT_STORE_BYTES = 256 * 2**20  # jobs pass files, not objects: keep /dev/shm use small
HEAD, SERVER, SUPERVISOR = "ray-head", "server", "supervisor"  # part names, as `status` shows them


def node_part(i: int) -> str:
    """The part name of local worker node ``i`` (1-based: the head is node 0)."""
    return f"ray-node-{i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: Optional[int]) -> Optional[int]:
    """When a process started (clock ticks since boot): with its pid, which process it is."""
    fields = _stat(pid) if pid else None
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    fields = _stat(pid)
    return fields is None or fields[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``: what a node leaves behind when its
    ``ray start`` (the group's leader) was killed alone (raylet, GCS, workers)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _stop_pid(pid: Optional[int], timeout: float, start: Optional[int] = None) -> None:
    """SIGTERM a recorded process (only if it is still the one recorded: ``start``), wait,
    then SIGKILL what is left of its process group: a ``ray start --block`` stops its
    node's processes on SIGTERM, and a node whose ``ray start`` died leaves them behind."""
    if not pid:
        return
    if _alive(pid):
        if start is not None and _proc_start(pid) != start:
            return  # a recycled pid: Linux reuses no pid that still names a group, so ours is empty
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for member in _group_members(pid):  # stragglers, or the leader if SIGTERM was not enough
        try:
            os.kill(member, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class LocalError(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, home: Optional[Path] = None):
        self.home = Path(home) if home else config.home()
        self.info_file = self.home / "local.json"
        self.logs = self.home / "logs"
        self.restarted: list[str] = []  # the parts the last up() restarted

    # ---- inspection --------------------------------------------------------
    def info(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.info_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def token(self) -> Optional[str]:
        p = self.home / "token"
        return p.read_text().strip() if p.exists() else None

    def running(self) -> Optional[dict[str, Any]]:
        """The local.json record if the server answers, else None."""
        info = self.info()
        if not info or not info.get("url") or not self.pid_alive(info, info["pids"].get("server")):
            return None
        return info if self._server_answers(info, 5) else None

    @staticmethod
    def _server_answers(info: dict[str, Any], timeout: float = 2) -> bool:
        try:
            return httpx.get(info["url"] + config.API_PREFIX + "/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def pid_alive(info: dict[str, Any], pid: Optional[int]) -> bool:
        """Whether a pid of ``info`` still runs the process recorded (not a recycled pid)."""
        if not _alive(pid):
            return False
        start = info.get("starts", {}).get(str(pid))
        return start is None or _proc_start(pid) == start

    def parts(self, info: dict[str, Any]) -> list[tuple[str, Optional[int]]]:
        """Every part of a recorded cluster and its pid, in start order."""
        pids = info.get("pids", {})
        return [(HEAD, pids.get("head")),
                *((node_part(i), pid) for i, pid in enumerate(pids.get("workers", []), start=1)),
                (SERVER, pids.get("server")), (SUPERVISOR, pids.get("supervisor"))]

    def health(self) -> Optional[dict[str, Any]]:
        """Each part's pid, whether it is alive and how often it was restarted, as
        ``raybatch status`` shows them; None when nothing was started under this home."""
        info = self.info()
        if not info:
            return None
        restarts, last = info.get("restarts", {}), info.get("last_restart", {})
        parts = []
        for name, pid in self.parts(info):
            alive = self.pid_alive(info, pid)
            part = {"part": name, "pid": pid, "alive": alive, "restarts": restarts.get(name, 0),
                    "last_restart": last.get(name)}
            if name == SERVER:
                part["answers"] = bool(alive and info.get("url") and self._server_answers(info))
            parts.append(part)
        return {"home": str(self.home), "url": info.get("url"), "ray_address": info.get("ray_address"),
                "dashboard_url": info.get("dashboard_url"), "parts": parts}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``<home>/.lock``: whoever changes local.json or starts a part holds it."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.home / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- start -----------------------------------------------------------------
    def popen(self, argv: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / log_name, "ab") as log:
            # umask 077: Ray's, the server's and the jobs' files on this machine are the user's alone
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, cwd=self.home, umask=0o077)

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> int:
        return self.popen(argv, log_name, env).pid

    def _wait(self, what: str, check, timeout: float, pids: list[int], log_name: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            dead = [p for p in pids if not _alive(p)]
            if dead:
                break
            time.sleep(0.25)
        tail = ""
        log = self.logs / log_name
        if log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise LocalError(f"{what} did not come up (see {log}):\n{tail}")

    @staticmethod
    def _env() -> dict[str, str]:
        """The environment of every part (the supervisor passes it on to the servers it starts)."""
        config.ray_client_env()
        # Ray's node health checks as raybatch sets them: a lost node is seen within 1-3 s
        # (raybatch.node_health); RAY_health_check_* in the user's environment wins
        from raybatch.node_health import node_health_env  # noqa: PLC0415

        # RAY_worker_niceness=0: the rank actors' processes, the user's training, run at
        # normal priority, as Ray's job drivers do (raybatch.runtime.rank._in_child)
        env = {**node_health_env(), **os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_worker_niceness": "0"}
        return env

    @staticmethod
    def _common(cpus: float) -> list[str]:
        """The ``ray start`` flags every local node shares."""
        common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                  "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
        return common

    @staticmethod
    def _worker_argv(info: dict[str, Any], i: int) -> list[str]:
        """``ray start`` of local worker node ``i``: its first start and every restart."""
        ray_bin = str(Path(sys.executable).with_name("ray"))
        return [ray_bin, "start", "--address", info["ray_address"], "--temp-dir", info["temp_dirs"][i - 1],
                "--dashboard-agent-listen-port", str(free_port()),
                # a sweep's Tune trial proxies each hold one (the scheduler's policy ignores it)
                "--resources", json.dumps({"raybatch_trial": 1000}),
                *LocalCluster._common(info["cpus_per_node"])]

    def _note(self, info: dict[str, Any], pid: int) -> None:
        """Record who ``pid`` is (its start time), so a recycled pid is never taken for it."""
        info.setdefault("starts", {})[str(pid)] = _proc_start(pid)

    def count_restart(self, info: dict[str, Any], part: str, why: str) -> None:
        info.setdefault("restarts", {})[part] = info.get("restarts", {}).get(part, 0) + 1
        info.setdefault("last_restart", {})[part] = {"at": time.time(), "why": why}
        if part not in self.restarted:
            self.restarted.append(part)

    def start_server(self, info: dict[str, Any], env: dict[str, str]) -> subprocess.Popen:
        """Start the server on the port of ``info["url"]`` (set on the first start), so a
        restarted server is where every client already looks; records its pid."""
        port = int(info["url"].rsplit(":", 1)[1])
        proc = self.popen(
            [sys.executable, "-m", "raybatch.server", "--state-dir", str(self.home),
             "--ray-address", info["ray_address"], "--dashboard-url", info["dashboard_url"],
             "--port", str(port)],
            "server.log", env,
        )
        info["pids"]["server"] = proc.pid
        self._note(info, proc.pid)
        self._write(info)
        return proc

    def _start_supervisor(self, info: dict[str, Any], env: dict[str, str]) -> None:
        pid = self._spawn([sys.executable, "-m", "raybatch.local.supervisor", "--home", str(self.home)],
                          "supervisor.log", env)
        info["pids"]["supervisor"] = pid
        self._note(info, pid)
        self._write(info)

    def _nodes_alive(self, info: dict[str, Any], n: int, not_in: frozenset = frozenset()) -> Callable[[], bool]:
        """A check: at least ``n`` alive Ray nodes whose ids are not in ``not_in``."""
        from raybatch.scheduler.cluster import RayClusterView  # noqa: PLC0415

        def check() -> bool:
            try:
                return sum(1 for x in RayClusterView(info["ray_address"]).snapshot()
                           if x.alive and x.node_id not in not_in) >= n
            except Exception:  # noqa: BLE001
                return False
        return check

    def up(self, nodes: int = DEFAULT_NODES, cpus_per_node: Optional[float] = None,
           port: Optional[int] = None) -> dict[str, Any]:
        """Start the local Ray nodes, the server and its supervisor; on a recorded cluster
        whose Ray head runs, restart only the parts that are dead (``self.restarted``)."""
        self.restarted = []
        with self.locked():
            info = self.info()
            if info and info.get("url") and len(info["pids"].get("workers", [])) == info["nodes"] - 1 \
                    and self.pid_alive(info, info["pids"].get("head")):
                return self._repair(info)
            self._stop_recorded()  # leftovers of a half-dead previous start, or of a dead head
            return self._start(nodes, cpus_per_node, port)

    def _repair(self, info: dict[str, Any]) -> dict[str, Any]:
        """Restart the dead parts of a cluster whose Ray head runs: a dead worker node
        rejoins the head, a dead server is started alone on its port (it re-adopts the
        running attempts), a dead supervisor is started again. Live parts are not touched."""
        env = self._env()
        pids = info["pids"]
        dead_nodes = [i for i, pid in enumerate(pids["workers"], start=1) if not self.pid_alive(info, pid)]
        if dead_nodes:
            from raybatch.scheduler.cluster import RayClusterView  # noqa: PLC0415

            try:
                before = frozenset(x.node_id for x in RayClusterView(info["ray_address"]).snapshot())
            except Exception as e:  # noqa: BLE001
                raise LocalError(f"the local Ray head at {info['ray_address']} runs (pid {pids['head']}) but "
                                 f"does not answer: {e}; `raybatch down` then `raybatch up` starts afresh "
                                 "(running jobs are requeued)") from None
            for i in dead_nodes:
                _stop_pid(pids["workers"][i - 1], 5, info.get("starts", {}).get(str(pids["workers"][i - 1])))
                pid = self._spawn(self._worker_argv(info, i), f"ray-worker-{i}.log", env)
                pids["workers"][i - 1] = pid
                self._note(info, pid)
                self.count_restart(info, node_part(i), "restarted by `raybatch up`: its process had exited")
                self._write(info)
            self._wait(f"{len(dead_nodes)} restarted local Ray node(s)",
                       self._nodes_alive(info, len(dead_nodes), before), 90,
                       [pids["workers"][i - 1] for i in dead_nodes], f"ray-worker-{dead_nodes[0]}.log")
        if not self.pid_alive(info, pids.get("server")):
            self.start_server(info, env)
            self.count_restart(info, SERVER, "restarted by `raybatch up`: its process had exited")
            self._write(info)
        if not self.pid_alive(info, pids.get("supervisor")):
            self._start_supervisor(info, env)
            self.count_restart(info, SUPERVISOR, "restarted by `raybatch up`: its process had exited")
            self._write(info)
        # a server just (re)started, by us or by the supervisor, answers within seconds
        self._wait("the raybatch server", lambda: self._server_answers(info), 60, [pids["server"]], "server.log")
        return info

    def _start(self, nodes: int, cpus_per_node: Optional[float], port: Optional[int]) -> dict[str, Any]:
        env = self._env()
        cpus = cpus_per_node or max(1, (os.cpu_count() or 2) // nodes)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        gcs, dash = free_port(), free_port()
        # The head's own temp dir too (not Ray's shared /tmp/ray): its per-job environments
        # are copies of this virtualenv (GBs each), and `down` removes them with the dir.
        # Short: it holds Unix socket paths.
        head_temp = str(Path(tempfile.gettempdir()) / f"raybatch-ray-{gcs}-0")
        pids: dict[str, Any] = {"workers": []}
        pids["head"] = self._spawn(
            [ray_bin, "start", "--head", "--port", str(gcs), "--temp-dir", head_temp, "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), "--include-dashboard", "true",
             "--ray-client-server-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()),
             # a sweep's Tune trial proxies each hold one (the scheduler's policy ignores it)
             "--resources", json.dumps({"raybatch_trial": 1000}), *self._common(cpus)],
            "ray-head.log", env,
        )
        info = {"url": None, "ray_address": f"127.0.0.1:{gcs}", "dashboard_url": f"http://127.0.0.1:{dash}",
                "nodes": nodes, "cpus_per_node": cpus, "pids": pids, "started_at": time.time(),
                "temp_dirs": [], "head_temp_dir": head_temp, "starts": {}, "restarts": {}, "last_restart": {}}
        self._note(info, pids["head"])
        self._write(info)

        def dashboard_up() -> bool:
            try:
                return httpx.get(info["dashboard_url"] + "/api/version", timeout=2,
                                 headers=config.ray_http_headers()).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait("the Ray head node", lambda: self._nodes_alive(info, 1)() and dashboard_up(), 90,
                   [pids["head"]], "ray-head.log")
        for i in range(1, nodes):
            # Each node on this machine gets its own temp dir: nodes sharing one build the
            # same per-job environment (packages:) into one runtime_resources directory
            # and delete each other's copy. Short: it holds Unix socket paths.
            info["temp_dirs"].append(str(Path(tempfile.gettempdir()) / f"raybatch-ray-{gcs}-{i}"))
            pids["workers"].append(self._spawn(self._worker_argv(info, i), f"ray-worker-{i}.log", env))
            self._note(info, pids["workers"][-1])
            self._write(info)
        self._wait(f"{nodes} local Ray nodes", self._nodes_alive(info, nodes), 90,
                   [pids["head"], *pids["workers"]], "ray-head.log")
        info["url"] = f"http://127.0.0.1:{port or free_port()}"
        self.start_server(info, env)
        self._wait("the raybatch server", lambda: self._server_answers(info), 60, [pids["server"]], "server.log")
        self._start_supervisor(info, env)
        return info

    def _write(self, info: dict[str, Any]) -> None:
        tmp = self.info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(self.info_file)

    # ---- stop ------------------------------------------------------------------
    def _stop_recorded(self) -> bool:
        info = self.info()
        if not info:
            return False
        pids, starts = info.get("pids", {}), info.get("starts", {})
        # the supervisor first, so it never sees the server go and starts another
        _stop_pid(pids.get("supervisor"), 5, starts.get(str(pids.get("supervisor"))))
        _stop_pid(pids.get("server"), 15, starts.get(str(pids.get("server"))))
        for pid in pids.get("workers", []):
            _stop_pid(pid, 30, starts.get(str(pid)))
        _stop_pid(pids.get("head"), 30, starts.get(str(pids.get("head"))))
        for temp_dir in [*info.get("temp_dirs", []), *filter(None, [info.get("head_temp_dir")])]:
            shutil.rmtree(temp_dir, ignore_errors=True)  # logs and per-job environments (GBs each)
        self.info_file.unlink(missing_ok=True)
        return True

    def down(self) -> bool:
        """Stop the supervisor, the server and the local Ray nodes this home started. The
        store (queued jobs, history) stays and is picked up by the next ``up``."""
        with self.locked():
            return self._stop_recorded()
