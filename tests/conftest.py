"""Shared fixtures: a real multi-node Ray cluster (ray.cluster_utils.Cluster: each
node its own raylet on this machine) with the dashboard's job API, and a real
raybatch server process on top of it with its own SQLite file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from raybatch.config import API_PREFIX, ray_client_env
from tests.azurite import Azurite

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """A live process (a zombie or a pid that is gone is not), read from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RayTestCluster:
    """A ray.cluster_utils.Cluster with a dashboard, plus the numbers tests need."""

    def __init__(self, nodes: int, cpus: float = 1, health: dict | None = None):
        ray_client_env()
        from ray.cluster_utils import Cluster

        from raybatch.node_health import NODE_HEALTH

        self.dashboard_port = free_port()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus, "include_dashboard": True, "dashboard_port": self.dashboard_port,
                "dashboard_host": "127.0.0.1", "object_store_memory": 100 * 2**20,
                # free ports, not Ray's fixed defaults: another Ray cluster on this machine
                # (a developer's `raybatch up`) must not take the job agent's port
                "dashboard_agent_listen_port": free_port(), "ray_client_server_port": free_port(),
                "resources": {"raybatch_trial": 1000},  # sweeps' trial proxies, as `raybatch up` declares
                # Ray declares a silent node dead as fast as on raybatch's own clusters, so the
                # node-loss tests measure the real path (raybatch.node_health)
                "_system_config": dict(NODE_HEALTH if health is None else health),
            },
        )
        self.workers = [self.add_node(cpus) for _ in range(nodes - 1)]
        self.cluster.wait_for_nodes()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, cpus: float = 1, **kw):
        return self.cluster.add_node(num_cpus=cpus, object_store_memory=100 * 2**20,
                                     dashboard_agent_listen_port=free_port(), **kw)

    def raylet_pid(self, node) -> int:
        """The raylet of one of this cluster's nodes (a ``ray._private.node.Node``)."""
        from types import SimpleNamespace

        from tests.fake_autoscaling import raylet_pid

        pid = raylet_pid(SimpleNamespace(temp_dir=node.get_session_dir_path()), node.node_id)
        assert pid is not None, f"no raylet found for node {node.node_id}"
        return pid

    def node_pids(self, node) -> list[int]:
        """Every process of that node, as a machine holds them: its raylet and what the raylet
        started (workers, agents, the ranks' processes), and the node's own helpers."""
        from tests.fake_autoscaling import with_descendants

        return with_descendants([self.raylet_pid(node), *(proc.pid for _, proc in node.live_processes())])

    def shutdown(self) -> None:
        head = self.cluster.head_node
        session = Path(head.get_session_dir_path()) if head is not None else None
        self.cluster.shutdown()
        if session is not None:
            # the nodes' pip/uv environments, each a full copy of this virtualenv (GBs): Ray
            # keeps them with the session's logs after the cluster is gone
            for d in session.glob("runtime_resources*"):
                shutil.rmtree(d, ignore_errors=True)


class ServerProcess:
    """``python -m raybatch.server`` as a separate process, as in production."""

    def __init__(self, cluster, state_dir: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.cluster = cluster  # anything with .address (GCS) and .dashboard_url
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        log = open(self.state_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raybatch.server", "--state-dir", str(self.state_dir),
             "--ray-address", self.cluster.address, "--dashboard-url", self.cluster.dashboard_url,
             "--port", str(self.port), "--tick", "0.25", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RAYBATCH_PLACEMENT_TIMEOUT_S": "60", **self.env},
        )

        def healthy() -> bool:
            assert self.proc.poll() is None, (self.state_dir / "server.log").read_text()[-3000:]
            try:
                return httpx.get(self.url + API_PREFIX + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the raybatch server")
        return self

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    def client(self):
        from raybatch import Client

        return Client(self.url, self.token)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


RAYBATCH = str(Path(sys.executable).with_name("raybatch"))


def run_cli(server, *args, check=False, timeout=180) -> subprocess.CompletedProcess:
    """The `raybatch` CLI as users run it, against ``server``."""
    env = {**os.environ, "RAYBATCH_ADDRESS": server.url, "RAYBATCH_TOKEN": server.token}
    p = subprocess.run([RAYBATCH, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def stop_everything(server) -> None:
    """Leave nothing running in Ray for the next module: cancel every job, wait for them."""
    c = server.client()
    for job in c.list(state=["QUEUED", "STARTING", "RUNNING"]):
        c.cancel(job.id)
    wait_for(lambda: not c.list(state=["STARTING", "RUNNING"]), 60, "jobs to stop")


@pytest.fixture(scope="module")
def ray_cluster():
    c = RayTestCluster(nodes=2)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    s = ServerProcess(ray_cluster, tmp_path_factory.mktemp("server")).start()
    yield s
    try:
        stop_everything(s)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = server.client()
    yield c
    c.close()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """A real Azure blob service (Azurite) for the whole session; a test may stop() and
    start() it (same port, same data)."""
    a = Azurite(tmp_path_factory.mktemp("azurite"))
    a.start()
    yield a
    a.close()
