"""A cluster's life cycle: ``raybatch cluster up|down|scale`` and how ``--cluster NAME``
finds its server.

Everything ``up`` knows about a cluster lives in its render directory,
``<RAYBATCH_HOME>/clusters/<cluster_name>/``::

    cluster.yaml      the config as given, with {render_dir} replaced (what Ray runs from)
    node/dist/        the raybatch wheel the nodes install (Azure)
    node/mounts.yaml  the file systems every node mounts (``--mounts``, or {})
    ray_auth_token    the Ray cluster's auth token (0600, made once, never printed)
    api_token         the raybatch server's API token (0600, fetched from the head)
    state.json        what ``up`` started: provider kind, server url, pids/tunnel
    logs/             what ``up`` started logs here

Two providers:

**Azure** (``provider.type: azure`` or raybatch's subclass): lint -> pre-flight
(quota, sizes, credentials) -> render -> ``ray.autoscaler.sdk.create_or_update_cluster``
(the head's ``head_start_ray_commands`` run ``raybatch cluster head-setup``, which
installs the server's systemd unit) -> the state disk (created or re-attached, then
mounted on the head by ``head-setup --disk-lun``; the server starts once it is mounted)
-> the server's API token, read on the head through Ray's command runner -> an SSH
tunnel from a local port to the server's 127.0.0.1 port on the head. ``down`` detaches
the state disk first (Ray deletes the data disks of the VMs it terminates), then
``teardown_cluster``.

**fake_multinode** (``cluster_configs/local-fake.yaml``: Ray's FakeMultiNodeProvider,
worker "nodes" are raylets on this machine): ``create_or_update_cluster`` cannot drive
it. The provider keeps its nodes in the memory of the process that created it (the
autoscaler's monitor), its head entry is a placeholder whose "IP" is its node id (Ray's
updater would ssh to it) and ``set_node_tags`` raises for that head; and Ray's
``teardown_cluster`` runs ``ray stop`` on the head, which here is this machine: it would
kill every Ray cluster on it. So ``up`` starts the head as ``ray start --head --block
--autoscaling-config <render dir>/cluster.yaml`` in its own session (free ports, a
private ``--temp-dir``, autoscaler v1, which re-reads that file every update) and the
raybatch server beside it, and records every pid and the temp dir in state.json;
``down`` stops exactly those pids and the processes whose command line names the
private temp dir (the fake worker nodes the monitor started), nothing else. The server
listens on 127.0.0.1: no tunnel. Fake nodes run from this machine's Python environment
and Ray auth token (``~/.ray/auth_token``, as the local default): no wheel is built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import yaml

from raybatch import config as rb_config
from raybatch.cluster import configs
from raybatch.local.embedded import _alive, _stop_pid, free_port

STATE_DIR_ON_HEAD = "/mnt/raybatch-state"
SERVER_PORT_ON_HEAD = 8765
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"

Progress = Callable[[str], None]


class ClusterError(RuntimeError):
    """A cluster command failed; the message says what to do."""


def clusters_dir() -> Path:
    return rb_config.home() / "clusters"


def known_clusters() -> list[str]:
    d = clusters_dir()
    return sorted(p.name for p in d.iterdir() if (p / "state.json").exists()) if d.exists() else []


def provider_kind(config: dict) -> str:
    """"azure", "fake" (Ray's fake_multinode provider) or "other"."""
    if configs.is_azure(config):
        return "azure"
    p = config.get("provider") or {}
    if p.get("type") == "fake_multinode" or (p.get("type") == "external" and p.get("module") == FAKE_PROVIDER):
        return "fake"
    return "other"


# ---- the render directory ---------------------------------------------------------
@dataclass
class Cluster:
    """One cluster's render directory and what ``up`` recorded there."""

    name: str
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = clusters_dir() / self.name

    @classmethod
    def named(cls, name: str) -> "Cluster":
        c = cls(name)
        if not c.state_file.exists():
            known = known_clusters()
            raise ClusterError(f"no cluster named {name!r} on this machine (under {clusters_dir()}); "
                               + (f"known: {', '.join(known)}" if known else "none is known: "
                                  "`raybatch cluster up FILE` creates one"))
        return c

    @property
    def config_path(self) -> Path:
        return self.dir / "cluster.yaml"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def config(self) -> dict:
        return configs.load(self.config_path)

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def api_token(self) -> Optional[str]:
        path = self.state().get("token_file")
        return Path(path).read_text().strip() if path and Path(path).exists() else None


def _secret_file(path: Path, value: str) -> None:
    """Write a secret readable by this user only (created 0600, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.chmod(path, 0o600)


def _replace_render_dir(value: Any, render_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace(configs.RENDER_DIR, render_dir)
    if isinstance(value, dict):
        return {_replace_render_dir(k, render_dir): _replace_render_dir(v, render_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_render_dir(v, render_dir) for v in value]
    return value


def project_dir() -> Path:
    """The raybatch source tree the wheel is built from (an editable or source install)."""
    import raybatch  # noqa: PLC0415

    root = Path(raybatch.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ClusterError(f"raybatch is installed from a wheel ({root}), not a source tree: the cluster's "
                           "nodes need a wheel of it; install raybatch from its source (pip install -e .)")
    return root


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([root / "pyproject.toml", *(root / "raybatch").rglob("*")]):
        if p.is_file() and "__pycache__" not in p.parts:
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_wheel(dist: Path, progress: Progress = lambda _m: None) -> Path:
    """The raybatch wheel in ``dist``: built with ``pip wheel --no-deps`` from the source
    tree, or the one already there when the tree has not changed since."""
    root = project_dir()
    digest = _tree_digest(root)
    stamp = dist / ".source-digest"
    wheels = sorted(dist.glob("raybatch-*.whl"))
    if len(wheels) == 1 and stamp.exists() and stamp.read_text() == digest:
        progress(f"raybatch wheel unchanged: {wheels[0].name}")
        return wheels[0]
    progress("building the raybatch wheel for the nodes (pip wheel --no-deps)")
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir(parents=True)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(root)], capture_output=True, text=True)
    wheels = sorted(dist.glob("raybatch-*.whl"))
    if p.returncode != 0 or len(wheels) != 1:
        raise ClusterError(f"building the raybatch wheel failed:\n{(p.stdout + p.stderr)[-2000:]}")
    stamp.write_text(digest)
    return wheels[0]


def render(source: Path, mounts: Optional[Path] = None, progress: Progress = lambda _m: None,
           wheel: bool = True) -> tuple[Cluster, dict]:
    """Lint ``source`` and write its render directory; returns (cluster, rendered config).
    The Ray auth token is created once and kept: nodes already up hold it."""
    config = configs.load(source)
    problems = configs.lint(config, str(source))
    if problems:
        raise ClusterError("the cluster config has problems:\n" + "\n".join(problems))
    name = str(config.get("cluster_name") or "")
    if not name or "/" in name or name.startswith("."):
        raise ClusterError(f"{source}: cluster_name: required, a plain name (it names {clusters_dir()}/<name>)")
    cluster = Cluster(name)
    cluster.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cluster.dir, 0o700)
    progress(f"rendering the config into {cluster.dir}")
    token = cluster.dir / "ray_auth_token"
    if not token.exists():
        _secret_file(token, secrets.token_hex(32))
    node = cluster.dir / "node"
    node.mkdir(exist_ok=True)
    if mounts is not None:
        try:
            text = Path(mounts).read_text()
            yaml.safe_load(text)
        except (OSError, yaml.YAMLError) as e:
            raise ClusterError(f"--mounts {mounts}: {e}") from None
        (node / "mounts.yaml").write_text(text)
    elif not (node / "mounts.yaml").exists():
        (node / "mounts.yaml").write_text("{}\n")
    if wheel:
        build_wheel(node / "dist", progress)
    rendered = _replace_render_dir(copy.deepcopy(config), str(cluster.dir))
    return cluster, rendered


def write_config(cluster: Cluster, config: dict) -> None:
    """Replace cluster.yaml atomically (the autoscaler and the server re-read it)."""
    tmp = cluster.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(cluster.config_path)


def _server_healthy(url: str) -> bool:
    try:
        return httpx.get(url + rb_config.API_PREFIX + "/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(what: str, check: Callable[[], bool], timeout: float, log: Optional[Path] = None,
          pids: tuple[int, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if any(not _alive(p) for p in pids):
            break
        time.sleep(0.3)
    tail = ""
    if log is not None and log.exists():
        tail = ":\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise ClusterError(f"{what} did not come up" + (f" (see {log})" if log else "") + tail)


def _spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Optional[Path] = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=cwd)
    return proc.pid


# ---- fake_multinode ---------------------------------------------------------------
def _pids_mentioning(text: str) -> list[int]:
    me = os.getpid()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(p.name))
    return out


def _fake_up(cluster: Cluster, config: dict, progress: Progress) -> dict[str, Any]:
    state = cluster.state()
    if state.get("kind") == "fake" and _alive(state.get("pids", {}).get("head")) \
            and _alive(state.get("pids", {}).get("server")) and _server_healthy(state["url"]):
        # running: the new config (limits, types) is picked up by the autoscaler's next
        # update and the server's next cycle; the head's ports stay
        config["provider"]["gcs_address"] = state["ray_address"]
        write_config(cluster, config)
        progress("already up: config updated (the autoscaler and the server re-read it)")
        return state
    if state.get("kind") == "fake":
        _fake_down(cluster, state, progress)  # leftovers of a half-dead earlier start
    from raybatch.config import ray_client_env  # noqa: PLC0415

    ray_client_env()
    head_type = config["head_node_type"]
    head_res = {k: v for k, v in (config["available_node_types"][head_type].get("resources") or {}).items()}
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rbfc_", dir="/tmp")  # short: it holds unix socket paths
    ray_address = f"127.0.0.1:{gcs_port}"
    provider = config["provider"]
    provider.update(gcs_address=ray_address, use_node_id_as_ip=True, disable_node_updaters=True,
                    disable_launch_config_check=True)
    write_config(cluster, config)
    state = {"kind": "fake", "name": cluster.name, "ray_address": ray_address,
             "dashboard_url": f"http://127.0.0.1:{dash_port}", "temp_dir": temp_dir, "pids": {},
             "url": None, "token_file": str(cluster.dir / "server" / "token"),
             "cluster_config": str(cluster.config_path), "started_at": time.time()}
    cluster.write_state(state)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    argv = [ray_bin, "start", "--head", "--block", "--autoscaling-config", str(cluster.config_path),
            "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
            "--disable-usage-stats", "--num-cpus", str(int(head_res.pop("CPU", 0))),
            "--num-gpus", str(int(head_res.pop("GPU", 0))), "--object-store-memory", str(128 * 2**20)]
    head_res.pop("memory", None)
    if head_res:
        argv += ["--resources", json.dumps(head_res)]
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           # v1: what `ray start` runs by default; it re-reads --autoscaling-config every update
           "RAY_enable_autoscaler_v2": "0", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_worker_niceness": "0"}
    progress(f"starting the fake_multinode head (GCS {ray_address}, temp dir {temp_dir})")
    state["pids"]["head"] = _spawn(argv, cluster.logs / "ray-head.log", env)
    cluster.write_state(state)

    def head_up() -> bool:
        try:
            st = httpx.get(state["dashboard_url"] + "/api/version", timeout=2, headers=rb_config.ray_http_headers())
            return st.status_code == 200
        except httpx.HTTPError:
            return False

    _wait("the fake_multinode head", head_up, 90, cluster.logs / "ray-head.log", (state["pids"]["head"],))
    port = free_port()
    state["url"] = f"http://127.0.0.1:{port}"
    progress("starting the raybatch server")
    state["pids"]["server"] = _spawn(
        [sys.executable, "-m", "raybatch.server", "--state-dir", str(cluster.dir / "server"),
         "--ray-address", ray_address, "--dashboard-url", state["dashboard_url"],
         "--cluster-config", str(cluster.config_path), "--host", "127.0.0.1", "--port", str(port)],
        cluster.logs / "server.log", env, cwd=cluster.dir)
    cluster.write_state(state)
    _wait("the raybatch server", lambda: _server_healthy(state["url"]), 60, cluster.logs / "server.log",
          (state["pids"]["server"],))
    return state


def _fake_down(cluster: Cluster, state: dict[str, Any], progress: Progress, workers_only: bool = False) -> None:
    temp_dir = state.get("temp_dir")
    pids = state.get("pids", {})
    if workers_only:
        # Ray's own workers-only teardown would run through the same provider that cannot be
        # driven from here (see the module docstring)
        raise ClusterError("--workers-only applies to Azure clusters; on fake_multinode `raybatch cluster "
                           "scale --type T --min 0 --max 0` has the autoscaler remove a type's nodes")
    progress("stopping the raybatch server")
    _stop_pid(pids.get("server"), 20)
    progress("stopping the fake_multinode head and its nodes")
    _stop_pid(pids.get("head"), 30)
    if temp_dir:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_mentioning(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 8
            while _pids_mentioning(temp_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = _pids_mentioning(temp_dir)
        if left:
            raise ClusterError(f"processes of {cluster.name} still running: {left}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    state.update(pids={}, url=None, stopped_at=time.time())
    cluster.write_state(state)


# ---- Azure ------------------------------------------------------------------------
@dataclass
class AzureOps:
    """What ``up``/``down`` call for an Azure cluster: Ray's autoscaler SDK and raybatch's
    ARM helpers. Tests replace these (Azure cannot be reached from a test)."""

    create_or_update_cluster: Callable[..., Any]
    teardown_cluster: Callable[..., Any]
    run_on_cluster: Callable[..., Any]
    get_head_node_ip: Callable[[str], str]
    preflight: Callable[[dict], list]
    ensure_state_disk: Callable[[dict], dict]
    detach_state_disk: Callable[[dict], Any]
    open_tunnel: Callable[..., int]

    @classmethod
    def real(cls) -> "AzureOps":
        from ray.autoscaler import sdk  # noqa: PLC0415

        def credential():
            from azure.identity import DefaultAzureCredential  # noqa: PLC0415

            return DefaultAzureCredential()

        def preflight(config: dict) -> list:
            from raybatch.cluster import preflight as pf  # noqa: PLC0415

            return pf.check(config)

        def ensure(config: dict) -> dict:
            from raybatch.cluster import azure  # noqa: PLC0415

            return azure.ensure_state_disk(config, credential=credential())

        def detach(config: dict) -> Any:
            from raybatch.cluster import azure  # noqa: PLC0415

            return azure.detach_state_disk(config, credential=credential())

        return cls(sdk.create_or_update_cluster, sdk.teardown_cluster, sdk.run_on_cluster, sdk.get_head_node_ip,
                   preflight, ensure, detach, open_ssh_tunnel)


def _ssh_base(config: dict) -> list[str]:
    auth = config.get("auth") or {}
    key = os.path.expanduser(str(auth.get("ssh_private_key", "~/.ssh/id_rsa")))
    return ["ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "ServerAliveInterval=30", "-o", "ConnectTimeout=15"]


def open_ssh_tunnel(config: dict, head_ip: str, local_port: int, remote_port: int, log: Path) -> int:
    """``ssh -N -L 127.0.0.1:local:127.0.0.1:remote user@head`` in its own session; its pid."""
    user = (config.get("auth") or {}).get("ssh_user", "ubuntu")
    argv = [*_ssh_base(config), "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", f"{user}@{head_ip}"]
    return _spawn(argv, log, dict(os.environ))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _output(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


TOKEN_MARK = "RAYBATCH-API-TOKEN"


def _fetch_api_token(ops: AzureOps, config_path: str) -> str:
    """The server's API token, read on the head (between markers: a login shell may print
    banners). Returned, never printed."""
    out = _output(ops.run_on_cluster(config_path, cmd=f"echo {TOKEN_MARK}:$(cat {STATE_DIR_ON_HEAD}/token):{TOKEN_MARK}",
                                     with_output=True))
    start = out.find(TOKEN_MARK + ":")
    end = out.find(":" + TOKEN_MARK, start + 1)
    token = out[start + len(TOKEN_MARK) + 1:end].strip() if start >= 0 and end > start else ""
    if not token:
        raise ClusterError(f"could not read the server's API token on the head ({STATE_DIR_ON_HEAD}/token): "
                           "is raybatch-server.service running? (ssh to the head: systemctl status raybatch-server)")
    return token


def ensure_tunnel(cluster: Cluster, state: dict[str, Any], ops: Optional[AzureOps] = None) -> dict[str, Any]:
    """Make sure the SSH tunnel to the head's server is open (reopen it if it died)."""
    tunnel = state.get("tunnel") or {}
    if _alive(tunnel.get("pid")) and _port_open(tunnel.get("local_port", 0)):
        return state
    ops = ops or AzureOps.real()
    config = cluster.config()
    head_ip = tunnel.get("head_ip") or ops.get_head_node_ip(str(cluster.config_path))
    port = tunnel.get("local_port") if tunnel.get("local_port") and not _port_open(tunnel["local_port"]) else free_port()
    pid = ops.open_tunnel(config, head_ip, port, SERVER_PORT_ON_HEAD, cluster.logs / "tunnel.log")
    state["tunnel"] = {"pid": pid, "local_port": port, "head_ip": head_ip, "remote_port": SERVER_PORT_ON_HEAD}
    state["url"] = f"http://127.0.0.1:{port}"
    cluster.write_state(state)
    _wait("the SSH tunnel to the head", lambda: _port_open(port), 30, cluster.logs / "tunnel.log", (pid,))
    return state


def _azure_up(cluster: Cluster, config: dict, progress: Progress, ops: AzureOps, restart: bool) -> dict[str, Any]:
    write_config(cluster, config)
    path = str(cluster.config_path)
    state = cluster.state()
    running = state.get("kind") == "azure" and state.get("head_ip")
    progress("creating or updating the cluster with Ray's autoscaler (ray up)"
             + ("; Ray is not restarted on the running head" if running and not restart else ""))
    ops.create_or_update_cluster(path, no_restart=bool(running and not restart), restart_only=False)
    head_ip = ops.get_head_node_ip(path)
    state.update(kind="azure", name=cluster.name, head_ip=head_ip, cluster_config=path,
                 token_file=str(cluster.dir / "api_token"), started_at=state.get("started_at") or time.time())
    cluster.write_state(state)
    progress("attaching the state disk to the head")
    disk = ops.ensure_state_disk(config) or {}
    state["state_disk"] = {k: v for k, v in disk.items() if isinstance(v, (str, int, float, bool))}
    cluster.write_state(state)
    lun = disk.get("lun")
    progress(f"mounting it at {STATE_DIR_ON_HEAD} and starting the raybatch server (systemd)")
    ops.run_on_cluster(path, cmd=f"{configs.HEAD_SETUP}" + (f" --disk-lun {int(lun)}" if lun is not None else ""))
    progress("reading the server's API token on the head")
    _secret_file(cluster.dir / "api_token", _fetch_api_token(ops, path))
    progress("opening the SSH tunnel to the server")
    state = ensure_tunnel(cluster, state, ops)
    _wait("the raybatch server on the head", lambda: _server_healthy(state["url"]), 120, cluster.logs / "tunnel.log")
    return state


def _azure_down(cluster: Cluster, state: dict[str, Any], progress: Progress, ops: AzureOps,
                workers_only: bool) -> None:
    config = cluster.config()
    path = str(cluster.config_path)
    if not workers_only:
        tunnel = state.get("tunnel") or {}
        _stop_pid(tunnel.get("pid"), 5)
        progress("stopping the raybatch server and detaching the state disk (Ray would delete it)")
        try:
            ops.run_on_cluster(path, cmd="sudo -n systemctl stop raybatch-server.service; "
                                         f"sudo -n umount {STATE_DIR_ON_HEAD} || true")
        except Exception as e:  # noqa: BLE001 - a head that is gone cannot stop anything
            progress(f"(could not stop the server on the head: {type(e).__name__}: {e})")
        ops.detach_state_disk(config)
    progress("tearing down " + ("the worker nodes" if workers_only else "the cluster") + " (Ray's teardown)")
    ops.teardown_cluster(path, workers_only=workers_only, keep_min_workers=False)
    if not workers_only:
        state.update(tunnel=None, url=None, head_ip=None, stopped_at=time.time())
        cluster.write_state(state)


# ---- the commands -----------------------------------------------------------------
def up(source: Path, mounts: Optional[Path] = None, progress: Progress = lambda _m: None,
       ops: Optional[AzureOps] = None, restart: bool = False) -> dict[str, Any]:
    """Create the cluster or bring it in line with ``source`` (idempotent); returns state.json."""
    config = configs.load(source)
    kind = provider_kind(config)
    if kind == "other":
        raise ClusterError(f"{source}: provider {config.get('provider', {}).get('type')!r}: raybatch cluster "
                           "supports Azure (type: azure or raybatch's provider) and fake_multinode")
    if kind == "azure":
        ops = ops or AzureOps.real()
        progress("pre-flight checks (credentials, sizes, quota)")
        problems = ops.preflight(config)
        errors = [p for p in problems if getattr(p, "level", "error") == "error"]
        for p in problems:
            if p not in errors:
                progress(f"warning: {p}")
        if errors:
            raise ClusterError("pre-flight found problems (nothing was created):\n" + "\n".join(map(str, errors)))
    cluster, rendered = render(source, mounts, progress, wheel=kind == "azure")
    if kind == "fake":
        state = _fake_up(cluster, rendered, progress)
    else:
        assert ops is not None
        state = _azure_up(cluster, rendered, progress, ops, restart)
    return state


def down(name: str, workers_only: bool = False, progress: Progress = lambda _m: None,
         ops: Optional[AzureOps] = None) -> None:
    cluster = Cluster.named(name)
    state = cluster.state()
    if state.get("kind") == "fake":
        _fake_down(cluster, state, progress, workers_only)
    else:
        _azure_down(cluster, state, progress, ops or AzureOps.real(), workers_only)


def connect(name: str) -> tuple[str, Optional[str]]:
    """(server url, API token) of cluster ``name``, reopening its SSH tunnel if it died."""
    cluster = Cluster.named(name)
    state = cluster.state()
    if state.get("kind") == "azure":
        if not state.get("head_ip"):
            raise ClusterError(f"cluster {name} is down: `raybatch cluster up {cluster.config_path}`")
        state = ensure_tunnel(cluster, state)
    if not state.get("url"):
        raise ClusterError(f"cluster {name} is down: `raybatch cluster up {cluster.config_path}`")
    return state["url"], cluster.api_token()


def scale(name: str, node_type: str, min_workers: int, max_workers: int, progress: Progress = lambda _m: None,
          ops: Optional[AzureOps] = None) -> Path:
    """Set a worker type's min/max in the cluster's rendered config and apply it; the
    file rewritten is returned. The autoscaler (v1 re-reads its config every update) and
    the raybatch server (``--cluster-config`` is re-read when it changes) follow it."""
    if not 0 <= min_workers <= max_workers:
        raise ClusterError(f"--min {min_workers} --max {max_workers}: need 0 <= min <= max")
    cluster = Cluster.named(name)
    config = cluster.config()
    types = config.get("available_node_types") or {}
    if node_type not in types or node_type == config.get("head_node_type"):
        workers = [t for t in types if t != config.get("head_node_type")]
        raise ClusterError(f"--type {node_type}: not a worker type of {name} (its types: {', '.join(workers)})")
    types[node_type]["min_workers"], types[node_type]["max_workers"] = min_workers, max_workers
    total = sum(int(t.get("max_workers", 0) or 0) for n, t in types.items() if n != config.get("head_node_type"))
    if int(config.get("max_workers", 0) or 0) < max_workers:
        config["max_workers"] = max(max_workers, min(total, int(config.get("max_workers", 0) or 0) + max_workers))
    problems = configs.lint(config, str(cluster.config_path))
    if problems:
        raise ClusterError("the scaled config has problems:\n" + "\n".join(problems))
    write_config(cluster, config)
    progress(f"wrote {cluster.config_path}: {node_type} min {min_workers} max {max_workers}")
    if cluster.state().get("kind") == "azure":
        progress("applying it (create_or_update_cluster, no restart)")
        (ops or AzureOps.real()).create_or_update_cluster(str(cluster.config_path), no_restart=True,
                                                          restart_only=False)
    return cluster.config_path


def setup_log(name: str, node: dict[str, Any], ops: Optional[AzureOps] = None) -> str:
    """The node's ``~/.raybatch/setup.log`` (``raybatch node-setup``'s log)."""
    cluster = Cluster.named(name)
    state = cluster.state()
    if state.get("kind") == "fake":
        path = Path.home() / ".raybatch" / "setup.log"
        if not path.exists():
            raise ClusterError(f"{path} does not exist: fake_multinode nodes are processes on this machine and "
                               "run no set-up commands (no node-setup log)")
        return path.read_text(errors="replace")
    config = cluster.config()
    if node.get("head"):
        return _output((ops or AzureOps.real()).run_on_cluster(
            str(cluster.config_path), cmd="cat ~/.raybatch/setup.log", with_output=True))
    ip = node.get("ip")
    if not ip:
        raise ClusterError(f"node {node.get('node_id')}: no address known")
    user = (config.get("auth") or {}).get("ssh_user", "ubuntu")
    base = _ssh_base(config)
    jump = " ".join([*base, "-W", "%h:%p", f"{user}@{state.get('head_ip')}"])
    p = subprocess.run([*base, "-o", f"ProxyCommand={jump}", f"{user}@{ip}", "cat ~/.raybatch/setup.log"],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise ClusterError(f"ssh to {ip} (through the head) failed: {p.stderr.strip()[-500:]}")
    return p.stdout
