"""A Ray cluster with the fake_multinode autoscaler, for tests (a safe replacement for
ray.cluster_utils.AutoscalingCluster in Ray 2.60).

Why not AutoscalingCluster itself:
  * its constructor reads ray/autoscaler/_private/fake_multi_node/example.yaml, which is
    NOT shipped in the 2.60 wheel -> FileNotFoundError;
  * start() and shutdown() run `ray stop --force`, which kills EVERY Ray cluster on the
    machine (other engineers' clusters included);
  * `ray start --head` with default ports: GCS 6379, dashboard 8265, dashboard agent
    52365, client server 10001 -- all conflict with other clusters.

This one: `ray start --head --block` in its own session with free ports and a private
--temp-dir (fake worker nodes inherit the head's temp dir), the fake_multinode provider
pointed at our GCS via provider.gcs_address; stop() SIGTERMs the head and then kills the
leftover processes whose command line mentions our private temp dir (the fake worker
nodes are started by the monitor process and are not children of `ray start`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raybatch.cluster.lifecycle import pids_mentioning

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # = cluster_utils.FAKE_HEAD_NODE_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmdline(pid: int) -> str:
    """A process's command line, as one string ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_pids_mentioning = pids_mentioning  # the name tests/test_evictions_e2e.py imports


class FakeAutoscalingCluster:
    def __init__(self, head_resources: dict, worker_node_types: dict, *, autoscaler_v2: bool = False,
                 idle_timeout_minutes: float = 0.1, max_workers: int = 8, upscaling_speed: float = 1.0,
                 head_labels: dict | None = None, dashboard: bool = False, extra_env: dict | None = None,
                 log=None):
        self.head_resources = dict(head_resources)
        self.autoscaler_v2 = autoscaler_v2
        self.dashboard = dashboard
        self.head_labels = head_labels or {}
        self.extra_env = extra_env or {}
        self.log = log
        self.gcs_port = free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_port = free_port()
        # short path: unix socket paths live under it (limit ~107 chars)
        self.temp_dir = tempfile.mkdtemp(prefix="rbfk_", dir="/tmp")
        self.config = {
            "cluster_name": "fake_multinode",
            "max_workers": max_workers,
            "provider": {
                # "fake_multinode" makes the v2 monitor load fake_multi_node/example.yaml as its
                # defaults -- missing from the 2.60 wheel -> the v2 monitor crashes. As an
                # "external" provider the same class works with both v1 and v2.
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                # the provider otherwise starts workers against <node ip>:6379
                "gcs_address": self.gcs_address,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": upscaling_speed, "idle_timeout_minutes": idle_timeout_minutes,
            "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        if autoscaler_v2:
            self.config["provider"]["launch_multiple"] = True
            self.config["provider"]["head_node_id"] = FAKE_HEAD_NODE_ID
        self.config_path = os.path.join(self.temp_dir, "autoscaling.json")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "FakeAutoscalingCluster":
        with open(self.config_path, "w") as f:
            json.dump(self.config, f)
        res = dict(self.head_resources)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", "--autoscaling-config", self.config_path,
               "--temp-dir", self.temp_dir, "--node-ip-address", "127.0.0.1",
               "--port", str(self.gcs_port), "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()),
               "--include-dashboard", "true" if self.dashboard else "false",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--disable-usage-stats",
               "--num-cpus", str(res.pop("CPU", 0)), "--num-gpus", str(res.pop("GPU", 0))]
        if "object_store_memory" in res:
            cmd += ["--object-store-memory", str(res.pop("object_store_memory"))]
        else:
            cmd += ["--object-store-memory", str(80 * 2**20)]
        if res:
            cmd += ["--resources", json.dumps(res)]
        if self.head_labels:
            cmd += ["--labels", ",".join(f"{k}={v}" for k, v in self.head_labels.items())]
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
               "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **self.extra_env}
        if self.autoscaler_v2:
            env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        else:
            env["RAY_enable_autoscaler_v2"] = "0"
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, open(self.log_path).read()[-3000:]
            try:
                st = get_cluster_resource_state(GcsClient(address=self.gcs_address))
                if any(n.status in (1, 3) for n in st.node_states):
                    return self
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.3)
        raise TimeoutError("head did not come up: " + open(self.log_path).read()[-3000:])

    @property
    def address(self) -> str:
        return self.gcs_address

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def alive_nodes(self) -> list:
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(GcsClient(address=self.gcs_address))
        return [n for n in state.node_states if n.status in (1, 3)]  # RUNNING, IDLE

    def monitor_alive(self) -> bool:
        return any("monitor.py" in c for c in map(cmdline, pids_mentioning(self.temp_dir)))

    def monitor_log(self) -> str:
        out = []
        for p in Path(self.temp_dir).glob("session_*/logs/monitor.*"):
            out.append(f"== {p}\n" + p.read_text(errors="replace"))
        return "\n".join(out)

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # fake worker nodes (raylet, agents, workers) were started by the monitor: find them
        # by our private temp dir in their command line and stop exactly those pids
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = pids_mentioning(self.temp_dir)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids_mentioning(self.temp_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = pids_mentioning(self.temp_dir)
        assert not left, f"leftover pids {left}"
        if os.environ.get("KEEP_TEMP") is None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


# Ray notices a dead raylet within ~3 s instead of the default ~30 s
FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
LOW_PRIORITY_LABEL = {"raybatch.io/low-priority": "true"}
_REPO = Path(__file__).resolve().parents[1]


def spot_cloud(worker_node_types: dict, **kwargs) -> FakeAutoscalingCluster:
    """A started fake_multinode cluster for spot scenarios: Ray notices dead raylets fast,
    and tests.fake_cloud_provider drops a node whose raylet died from the cloud's list (as
    Azure deletes an evicted Spot VM), so the autoscaler replaces it."""
    c = FakeAutoscalingCluster({"CPU": 0}, json.loads(json.dumps(worker_node_types)), dashboard=True,
                               extra_env={**FAST_HEALTH, "PYTHONPATH": str(_REPO)}, **kwargs)
    c.config["provider"]["module"] = "tests.fake_cloud_provider.FakeCloudProvider"
    return c.start()


def with_descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process under them (by parent pid, read from /proc)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) if p.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(p.name))
    todo, out = list(roots), []
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def kill_node(cluster: FakeAutoscalingCluster, node_id: str) -> list[int]:
    """A VM lost without notice: SIGKILL to the node's raylet and every process under it
    (its workers and the ranks' processes) at once, so no process of the node outlives its
    raylet to act on what happens next. The pids signalled."""
    raylet = raylet_pid(cluster, node_id)
    assert raylet is not None, f"no raylet found for node {node_id}"
    pids = with_descendants([raylet])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def raylet_pid(cluster: FakeAutoscalingCluster, node_id: str) -> int | None:
    """The raylet of that node, if this cluster started it (its temp dir in the command line)."""
    for pid in pids_mentioning(f"--node_id={node_id}"):
        cmd = cmdline(pid)
        if "raylet" in cmd.split(" ")[0] and cluster.temp_dir in cmd:
            return pid
    return None
