"""``raybatch up`` / ``raybatch down`` and the on-demand start of ``submit``.

A local "cluster" is N Ray nodes on this machine (``ray start --block``, one head
and N-1 workers, each with its own raylet), so multi-node gang jobs run on a
laptop exactly as they would on N machines. Every process is started in its own
session and recorded by pid in ``<home>/local.json``; ``down`` stops exactly
those pids (``ray start --block`` stops its own raylet, GCS and dashboard on
SIGTERM) and never touches other Ray clusters on the machine.
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
from typing import Any, Iterator, Optional

import httpx

from raybatch import config

DEFAULT_NODES = 2
OBJECT_STORE_BYTES = 256 * 2**20  # jobs pass files, not objects: keep /dev/shm use small


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _stop_pid(pid: Optional[int], timeout: float) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)  # type: ignore[arg-type]
        except (ProcessLookupError, PermissionError):
            pass


class LocalError(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, home: Optional[Path] = None):
        self.home = Path(home) if home else config.home()
        self.info_file = self.home / "local.json"
        self.logs = self.home / "logs"

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
        if not info or not _alive(info["pids"].get("server")):
            return None
        try:
            r = httpx.get(info["url"] + config.API_PREFIX + "/health", timeout=5)
            return info if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- start -----------------------------------------------------------------
    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / log_name, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, cwd=self.home)
        return proc.pid

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

    def up(self, nodes: int = DEFAULT_NODES, cpus_per_node: Optional[float] = None,
           port: Optional[int] = None) -> dict[str, Any]:
        """Start the local Ray nodes and the server, or return the running ones."""
        with self._locked():
            info = self.running()
            if info:
                return info
            self._stop_recorded()  # leftovers of a half-dead previous start
            config.ray_client_env()
            # RAY_worker_niceness=0: the rank actors' processes, the user's training, run at
            # normal priority, as Ray's job drivers do (raybatch.runtime.rank._in_child)
            env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_worker_niceness": "0"}
            cpus = cpus_per_node or max(1, (os.cpu_count() or 2) // nodes)
            ray_bin = str(Path(sys.executable).with_name("ray"))
            gcs, dash = free_port(), free_port()
            common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                      "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats"]
            pids: dict[str, Any] = {"workers": []}
            pids["head"] = self._spawn(
                [ray_bin, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dash), "--include-dashboard", "true",
                 "--ray-client-server-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()),
                 # a sweep's Tune trial proxies each hold one (the scheduler's policy ignores it)
                 "--resources", json.dumps({"raybatch_trial": 1000}), *common],
                "ray-head.log", env,
            )
            info = {"url": None, "ray_address": f"127.0.0.1:{gcs}", "dashboard_url": f"http://127.0.0.1:{dash}",
                    "nodes": nodes, "cpus_per_node": cpus, "pids": pids, "started_at": time.time()}
            self._write(info)
            from raybatch.scheduler.cluster import RayClusterView  # noqa: PLC0415

            def nodes_alive(n: int):
                def check() -> bool:
                    try:
                        return sum(1 for x in RayClusterView(info["ray_address"]).snapshot() if x.alive) >= n
                    except Exception:  # noqa: BLE001
                        return False
                return check

            def dashboard_up() -> bool:
                try:
                    return httpx.get(info["dashboard_url"] + "/api/version", timeout=2,
                                     headers=config.ray_http_headers()).status_code == 200
                except httpx.HTTPError:
                    return False

            self._wait("the Ray head node", lambda: nodes_alive(1)() and dashboard_up(), 90,
                       [pids["head"]], "ray-head.log")
            for i in range(1, nodes):
                # Each node on this machine gets its own temp dir: nodes sharing one build the
                # same per-job environment (packages:) into one runtime_resources directory
                # and delete each other's copy. Short: it holds Unix socket paths.
                temp_dir = str(Path(tempfile.gettempdir()) / f"raybatch-ray-{gcs}-{i}")
                info.setdefault("temp_dirs", []).append(temp_dir)
                pids["workers"].append(self._spawn(
                    [ray_bin, "start", "--address", info["ray_address"], "--temp-dir", temp_dir,
                     "--dashboard-agent-listen-port", str(free_port()),
                 # a sweep's Tune trial proxies each hold one (the scheduler's policy ignores it)
                 "--resources", json.dumps({"raybatch_trial": 1000}), *common],
                    f"ray-worker-{i}.log", env,
                ))
                self._write(info)
            self._wait(f"{nodes} local Ray nodes", nodes_alive(nodes), 90,
                       [pids["head"], *pids["workers"]], "ray-head.log")
            server_port = port or free_port()
            info["url"] = f"http://127.0.0.1:{server_port}"
            pids["server"] = self._spawn(
                [sys.executable, "-m", "raybatch.server", "--state-dir", str(self.home),
                 "--ray-address", info["ray_address"], "--dashboard-url", info["dashboard_url"],
                 "--port", str(server_port)],
                "server.log", env,
            )
            self._write(info)

            def server_up() -> bool:
                try:
                    return httpx.get(info["url"] + config.API_PREFIX + "/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            self._wait("the raybatch server", server_up, 60, [pids["server"]], "server.log")
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
        pids = info.get("pids", {})
        _stop_pid(pids.get("server"), 15)
        for pid in pids.get("workers", []):
            _stop_pid(pid, 30)
        _stop_pid(pids.get("head"), 30)
        for temp_dir in info.get("temp_dirs", []):  # logs and per-job environments (GBs each)
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.info_file.unlink(missing_ok=True)
        return True

    def down(self) -> bool:
        """Stop the server and the local Ray nodes this home started. The store
        (queued jobs, history) stays and is picked up by the next ``up``."""
        with self._locked():
            return self._stop_recorded()
