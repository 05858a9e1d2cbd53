"""A cluster's life cycle: ``raybatch cluster up|down|scale`` and how ``--cluster NAME``
finds its server.

Everything ``up`` knows about a cluster lives in its render directory,
``<RAYBATCH_HOME>/clusters/<cluster_name>/``::

    cluster.yaml      the config as given, with {render_dir} replaced (what Ray runs from)
    node/dist/        the raybatch wheel the nodes install (Azure)
    node/mounts.yaml  the file systems every node mounts (``--mounts``, or {}; 0600: storage keys)
    ray_auth_token    the Ray cluster's auth token (0600, made once, never printed)
    tls/server.pem    the server's self-signed TLS certificate (Azure; made with its key on
                      the head by head-setup, read back here; the CLI verifies the server
                      with it). Never the key: it stays on the head
    api_token         the raybatch server's API token (0600, fetched from the head)
    state.json        what ``up`` started: provider kind, server url, pids/tunnel
    logs/             what ``up`` started logs here

Two providers:

**Azure** (``provider.type: azure`` or raybatch's subclass): lint -> pre-flight
(quota, sizes, credentials) -> render -> ``ray.autoscaler.sdk.create_or_update_cluster``
(the head's ``head_start_ray_commands`` run ``raybatch cluster head-setup``, which
installs the server's systemd unit and makes its TLS certificate and key there) -> the
state disk (created or re-attached, then mounted on the head by ``head-setup --disk-lun``;
the server starts once it is mounted) -> the server's certificate (not its key) and API
token, read on the head through Ray's command runner -> an SSH
tunnel from a local port to the server's 127.0.0.1 port on the head. ``down`` stops the
server and unmounts the state disk on the head (a head that answers but cannot do so
stops ``down``, unless ``--force``), detaches the disk (Ray deletes the data disks of the
VMs it terminates), then ``teardown_cluster``.

**fake_multinode** (``cluster_configs/local-fake.yaml``: Ray's FakeMultiNodeProvider,
worker "nodes" are raylets on this machine): ``create_or_update_cluster`` cannot drive
it. The provider keeps its nodes in the memory of the process that created it (the
autoscaler's monitor), its head entry is a placeholder whose "IP" is its node id (Ray's
updater would ssh to it) and ``set_node_tags`` raises for that head; and Ray's
``teardown_cluster`` runs ``ray stop`` on the head, which here is this machine: it would
kill every Ray cluster on it. So ``up`` starts the head as ``ray start --head --block
--autoscaling-config <render dir>/cluster.yaml`` in its own session (free ports, a
private ``--temp-dir``, autoscaler v1, which re-reads that file every update) and the
raybatch server beside it, and records every pid (with its start time) and the temp dir
in state.json; ``down`` stops exactly those pids, while they are still the processes
``up`` started, and this user's processes whose command line names the private temp dir
(the fake worker nodes the monitor started), nothing else. ``down`` picks the fake or the
Azure path by the rendered config's provider (state.json must agree): Ray's teardown runs
for Azure clusters only. The server
listens on 127.0.0.1: no tunnel. Fake nodes run from this machine's Python environment
and Ray auth token (``~/.ray/auth_token``, as the local default): no wheel is built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
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
from raybatch.cluster import configs, tls
from raybatch.local.embedded import _alive, free_port

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


def _substitute(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every string (keys too)."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, dict):
        return {_substitute(k, old, new): _substitute(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, old, new) for v in value]
    return value


def _replace_render_dir(value: Any, render_dir: str) -> Any:
    return _substitute(value, configs.RENDER_DIR, render_dir)


def lint_rendered(cluster: "Cluster", config: dict) -> list[str]:
    """raybatch's lints of a rendered config: its render directory is put back as
    ``{render_dir}`` first (the lints check the file_mounts that ``up`` renders)."""
    return configs.lint(_substitute(config, str(cluster.dir), configs.RENDER_DIR), str(cluster.config_path))


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
    node = cluster.dir / "node"  # file_mounts copies it to every node: mounts.yaml holds storage keys
    node.mkdir(mode=0o700, exist_ok=True)
    os.chmod(node, 0o700)
    if mounts is not None:
        try:
            text = Path(mounts).read_text()
            yaml.safe_load(text)
        except (OSError, yaml.YAMLError) as e:
            raise ClusterError(f"--mounts {mounts}: {e}") from None
        _secret_file(node / "mounts.yaml", text)
    elif not (node / "mounts.yaml").exists():
        _secret_file(node / "mounts.yaml", "{}\n")
    else:
        os.chmod(node / "mounts.yaml", 0o600)
    if wheel:
        build_wheel(node / "dist", progress)
    stale_key = cluster.dir / configs.TLS_DIR / tls.KEY_NAME
    if stale_key.exists():  # an older raybatch made the key here and shipped it to every node
        stale_key.unlink()
    rendered = _replace_render_dir(copy.deepcopy(config), str(cluster.dir))
    return cluster, rendered


def write_config(cluster: Cluster, config: dict) -> None:
    """Replace cluster.yaml atomically (the autoscaler and the server re-read it)."""
    tmp = cluster.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(cluster.config_path)


def _server_healthy(url: str, ca_cert: Optional[str] = None) -> bool:
    import ssl  # noqa: PLC0415

    verify = ssl.create_default_context(cafile=ca_cert) if ca_cert else True
    try:
        return httpx.get(url + rb_config.API_PREFIX + "/health", timeout=3, verify=verify).status_code == 200
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


# ---- the processes up started ------------------------------------------------------
# A pid in state.json may belong to someone else by the time it is read (the process
# ended, the pid was reused: a reboot, a long-stopped cluster). Each pid is recorded with
# its start time and signalled only while both still match.
def proc_start(pid: Optional[int]) -> Optional[int]:
    """The process's start time (/proc/<pid>/stat field 22, clock ticks after boot), or None."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": fields[0] is field 3
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_ours(pid: Optional[int], start: Optional[int]) -> bool:
    """Whether ``pid`` is alive and still the process that started at ``start``."""
    return bool(pid) and start is not None and _alive(pid) and proc_start(pid) == start


def stop_ours(pid: Optional[int], start: Optional[int], timeout: float, what: str,
              progress: Progress = lambda _m: None) -> None:
    """SIGTERM the process ``up`` started (its session's group is SIGKILLed after
    ``timeout``) - only while it is that process: a pid now someone else's is left alone."""
    if not pid or not _alive(pid):
        return
    if not is_ours(pid, start):
        progress(f"warning: pid {pid} ({what}) is no longer the process up started: left alone")
        return
    try:
        fd = os.pidfd_open(pid)  # signals through it reach this process, never a later one with its pid
    except ProcessLookupError:
        return
    except OSError:
        fd = None

    def send(sig: int) -> None:
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            elif is_ours(pid, start):
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    try:
        if proc_start(pid) != start:  # ended (and the pid reused) since the check above
            return
        send(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_ours(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_ours(pid, start):
            try:
                os.killpg(pid, signal.SIGKILL)  # started in its own session: its group is its pid
            except (ProcessLookupError, PermissionError):
                pass
            send(signal.SIGKILL)
    finally:
        if fd is not None:
            os.close(fd)


def pids_mentioning(text: str) -> list[int]:
    """This user's processes (other than this one) whose command line holds ``text`` as a
    whole word or path (``/tmp/rbfc_ab`` does not match ``/tmp/rbfc_abc``)."""
    me, uid = os.getpid(), os.getuid()
    word = re.compile(re.escape(text) + r"(?![A-Za-z0-9_])")
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            if p.stat().st_uid != uid:
                continue
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if word.search(cmd):
            out.append(int(p.name))
    return out


# ---- fake_multinode ---------------------------------------------------------------
_FAKE_TEMP_DIR = re.compile(r"^/tmp/rbfc_[A-Za-z0-9_]{6,}$")  # what _fake_up's mkdtemp makes


def _spawn_ours(state: dict[str, Any], what: str, argv: list[str], log: Path, env: dict[str, str],
                cwd: Optional[Path] = None) -> int:
    """Start ``what`` and record its pid and start time in ``state``."""
    pid = _spawn(argv, log, env, cwd)
    state.setdefault("pids", {})[what] = pid
    state.setdefault("starts", {})[what] = proc_start(pid)
    return pid


def _fake_running(state: dict[str, Any], what: str) -> bool:
    return is_ours((state.get("pids") or {}).get(what), (state.get("starts") or {}).get(what))


def _fake_up(cluster: Cluster, config: dict, progress: Progress) -> dict[str, Any]:
    state = cluster.state()
    if state.get("kind") == "fake" and _fake_running(state, "head") and _fake_running(state, "server") \
            and _server_healthy(state["url"]):
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
             "dashboard_url": f"http://127.0.0.1:{dash_port}", "temp_dir": temp_dir, "pids": {}, "starts": {},
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
    _spawn_ours(state, "head", argv, cluster.logs / "ray-head.log", env)
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
    _spawn_ours(
        state, "server",
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
    pids, starts = state.get("pids") or {}, state.get("starts") or {}
    if workers_only:
        # Ray's own workers-only teardown would run through the same provider that cannot be
        # driven from here (see the module docstring)
        raise ClusterError("--workers-only applies to Azure clusters; on fake_multinode `raybatch cluster "
                           "scale --type T --min 0 --max 0` has the autoscaler remove a type's nodes")
    progress("stopping the raybatch server")
    stop_ours(pids.get("server"), starts.get("server"), 20, "the raybatch server", progress)
    progress("stopping the fake_multinode head and its nodes")
    stop_ours(pids.get("head"), starts.get("head"), 30, "the fake_multinode head", progress)
    if temp_dir and not _FAKE_TEMP_DIR.match(str(temp_dir)):
        progress(f"warning: temp_dir {temp_dir!r} in {cluster.state_file} is not one up makes: "
                 "no process was stopped by it")
    elif temp_dir:
        # the fake worker nodes: started by the head's monitor, their command lines name the
        # head's private temp dir
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids_mentioning(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 8
            while pids_mentioning(temp_dir) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = pids_mentioning(temp_dir)
        if left:
            raise ClusterError(f"processes of {cluster.name} still running: {left}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    state.update(pids={}, starts={}, url=None, stopped_at=time.time())
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


def _between(out: str, begin: str, end: str) -> str:
    """What a command printed between ``begin`` and the next ``end`` ('' when either is
    missing): a login shell on the head may print banners around it."""
    start = out.find(begin)
    stop = out.find(end, start + len(begin)) if start >= 0 else -1
    return out[start + len(begin):stop] if stop >= 0 else ""


TOKEN_MARK = "RAYBATCH-API-TOKEN"
TOKEN_WAIT_S = 90      # on the head, per read: the server writes its token once it has imported Ray
TOKEN_READS = 3        # reads before giving up (an ssh session may also fail to start)


def _fetch_api_token(ops: AzureOps, config_path: str) -> str:
    """The server's API token, read on the head once the server has written it (between
    markers: a login shell may print banners). Returned, never printed."""
    f = f"{STATE_DIR_ON_HEAD}/token"
    cmd = (f"for i in $(seq {TOKEN_WAIT_S}); do test -s {f} && break; sleep 1; done; "
           f"echo {TOKEN_MARK}:$(cat {f} 2>/dev/null):{TOKEN_MARK}")
    for _ in range(TOKEN_READS):
        out = _output(ops.run_on_cluster(config_path, cmd=cmd, with_output=True))
        token = _between(out, TOKEN_MARK + ":", ":" + TOKEN_MARK).strip()
        if token:
            return token
    raise ClusterError(f"could not read the server's API token on the head ({f}) within "
                       f"{TOKEN_READS * TOKEN_WAIT_S} s: is raybatch-server.service running? (on the head: "
                       "systemctl status raybatch-server; journalctl -u raybatch-server)")


CERT_BEGIN = "RAYBATCH-TLS-CERT-BEGIN"
CERT_END = "RAYBATCH-TLS-CERT-END"


def _fetch_certificate(ops: AzureOps, config_path: str) -> str:
    """The server's TLS certificate (PEM), read on the head where ``head-setup`` made it
    (between markers: a login shell may print banners). Only the certificate: its key
    never leaves the head."""
    from cryptography import x509  # noqa: PLC0415

    f = f"{configs.TLS_ON_HEAD}/{tls.CERT_NAME}"
    cmd = f"{_marked(CERT_BEGIN)}; cat {f}; {_marked(CERT_END)}"
    problem = "nothing between the markers"
    for _ in range(TOKEN_READS):
        out = _output(ops.run_on_cluster(config_path, cmd=cmd, with_output=True)).replace("\r\n", "\n")
        pem = _between(out, CERT_BEGIN + "\n", CERT_END).strip() + "\n"
        if pem.strip():
            try:
                x509.load_pem_x509_certificate(pem.encode())
                return pem
            except ValueError as e:
                problem = f"not a PEM certificate ({e})"
    raise ClusterError(f"could not read the server's TLS certificate on the head ({f}): {problem}; "
                       "`raybatch cluster head-setup ... --tls-cert ... --tls-key ...` makes it there")


def ensure_tunnel(cluster: Cluster, state: dict[str, Any], ops: Optional[AzureOps] = None) -> dict[str, Any]:
    """Make sure the SSH tunnel to the head's server is open (reopen it if it died)."""
    tunnel = state.get("tunnel") or {}
    if is_ours(tunnel.get("pid"), tunnel.get("start")) and _port_open(tunnel.get("local_port", 0)):
        return state
    ops = ops or AzureOps.real()
    config = cluster.config()
    head_ip = tunnel.get("head_ip") or ops.get_head_node_ip(str(cluster.config_path))
    port = tunnel.get("local_port") if tunnel.get("local_port") and not _port_open(tunnel["local_port"]) else free_port()
    pid = ops.open_tunnel(config, head_ip, port, SERVER_PORT_ON_HEAD, cluster.logs / "tunnel.log")
    state["tunnel"] = {"pid": pid, "start": proc_start(pid), "local_port": port, "head_ip": head_ip,
                       "remote_port": SERVER_PORT_ON_HEAD}
    ca = cluster.dir / configs.TLS_DIR / tls.CERT_NAME  # the head's server speaks HTTPS with it
    state["url"] = f"{'https' if ca.is_file() else 'http'}://127.0.0.1:{port}"
    state["ca_cert"] = str(ca) if ca.is_file() else None
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
    progress("reading the server's TLS certificate on the head (its key stays there)")
    tls_dir = cluster.dir / configs.TLS_DIR
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    cert = tls_dir / tls.CERT_NAME
    tmp = cert.with_suffix(".tmp")
    tmp.write_text(_fetch_certificate(ops, path))
    tmp.replace(cert)
    progress("reading the server's API token on the head")
    _secret_file(cluster.dir / "api_token", _fetch_api_token(ops, path))
    progress("opening the SSH tunnel to the server")
    state = ensure_tunnel(cluster, state, ops)
    _wait("the raybatch server on the head", lambda: _server_healthy(state["url"], state.get("ca_cert")), 120,
          cluster.logs / "tunnel.log")
    return state


HEAD_OK = "RAYBATCH-HEAD-OK"
STOPPED = "RAYBATCH-STOPPED"


def _marked(mark: str) -> str:
    """A shell command printing ``mark``, whose own text does not contain it (an echoed
    command line is not taken for its output)."""
    a, b = mark.rsplit("-", 1)
    return f"printf '%s-%s\\n' {a} {b}"


def _stop_server_on_head(cluster: Cluster, ops: AzureOps, progress: Progress, force: bool) -> None:
    """Stop the server and unmount the state disk on the head, so that the disk is
    detached clean. A head that does not answer has nothing mounted to lose; a head that
    answers but cannot stop or unmount stops ``down`` (unless ``force``)."""
    path = str(cluster.config_path)
    try:
        alive = HEAD_OK in _output(ops.run_on_cluster(path, cmd=_marked(HEAD_OK), with_output=True))
    except Exception as e:  # noqa: BLE001 - Ray's updater fails in many ways on a head that is gone
        progress(f"warning: the head does not answer ({type(e).__name__}): nothing to stop or unmount there")
        return
    if not alive:
        progress("warning: the head does not answer: nothing to stop or unmount there")
        return
    cmd = (f"sudo -n systemctl stop raybatch-server.service && "
           f"{{ ! mountpoint -q {STATE_DIR_ON_HEAD} || sudo -n umount {STATE_DIR_ON_HEAD}; }} && {_marked(STOPPED)}")
    try:
        out = _output(ops.run_on_cluster(path, cmd=cmd, with_output=True))
        why = None if STOPPED in out else (out.strip().splitlines() or ["no output"])[-1][-300:]
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {str(e)[-300:]}"
    if why is None:
        return
    message = (f"could not stop raybatch-server.service and unmount {STATE_DIR_ON_HEAD} on the head ({why}); "
               "detaching the state disk while it is mounted can lose the server's last writes. Fix it on the "
               f"head (`ray attach {path}`; `sudo systemctl stop raybatch-server; sudo umount {STATE_DIR_ON_HEAD}`) "
               f"and run down again, or `raybatch cluster down {cluster.name} --force` to detach it anyway")
    if not force:
        raise ClusterError(message)
    progress(f"warning: {message.split('; ')[0]}: detaching the disk anyway (--force)")


def _azure_down(cluster: Cluster, state: dict[str, Any], progress: Progress, ops: AzureOps,
                workers_only: bool, force: bool = False) -> None:
    config = cluster.config()
    path = str(cluster.config_path)
    if not workers_only:
        tunnel = state.get("tunnel") or {}
        stop_ours(tunnel.get("pid"), tunnel.get("start"), 5, "the SSH tunnel", progress)
        progress("stopping the raybatch server and unmounting the state disk on the head")
        _stop_server_on_head(cluster, ops, progress, force)
        progress("detaching the state disk (Ray would delete it)")
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


def _kind_of(cluster: Cluster) -> str:
    """The cluster's provider kind, from its rendered config (state.json must agree):
    what decides whether Ray's teardown may run at all."""
    try:
        config = cluster.config()
    except ValueError as e:
        raise ClusterError(f"{e}: cannot tell which provider cluster {cluster.name} runs on; nothing was "
                           "stopped") from None
    kind = provider_kind(config)
    recorded = cluster.state().get("kind")
    if recorded is not None and recorded != kind:
        raise ClusterError(f"cluster {cluster.name}: {cluster.config_path} is a {kind!r} cluster but "
                           f"{cluster.state_file} records {recorded!r}; nothing was stopped (fix or remove "
                           f"{cluster.dir} by hand)")
    if kind == "other":
        raise ClusterError(f"cluster {cluster.name}: {cluster.config_path}: provider "
                           f"{(config.get('provider') or {}).get('type')!r} is neither Azure nor fake_multinode; "
                           "nothing was stopped")
    return kind


def down(name: str, workers_only: bool = False, progress: Progress = lambda _m: None,
         ops: Optional[AzureOps] = None, force: bool = False) -> None:
    """Stop the cluster: on fake_multinode only the processes ``up`` started; on Azure the
    server, the state disk (detached, kept), then Ray's teardown. ``force``: detach the
    disk even when the head could not unmount it."""
    cluster = Cluster.named(name)
    kind = _kind_of(cluster)
    state = cluster.state()
    if kind == "fake":
        _fake_down(cluster, state, progress, workers_only)
    elif kind == "azure":  # Ray's teardown runs `ray stop` on the head: never for anything else
        _azure_down(cluster, state, progress, ops or AzureOps.real(), workers_only, force)


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


def ca_cert_of(name: str) -> Optional[str]:
    """The CA certificate to verify cluster ``name``'s server with (its self-signed
    certificate, when its server speaks HTTPS), or None."""
    try:
        return Cluster.named(name).state().get("ca_cert") or None
    except ClusterError:
        return None


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
    problems = lint_rendered(cluster, config)
    if problems:
        raise ClusterError("the scaled config has problems:\n" + "\n".join(problems))
    kind = _kind_of(cluster)
    write_config(cluster, config)
    progress(f"wrote {cluster.config_path}: {node_type} min {min_workers} max {max_workers}")
    if kind == "azure":
        progress("applying it (create_or_update_cluster, no restart)")
        (ops or AzureOps.real()).create_or_update_cluster(str(cluster.config_path), no_restart=True,
                                                          restart_only=False)
    return cluster.config_path


def setup_log(name: str, node: dict[str, Any], ops: Optional[AzureOps] = None) -> str:
    """The node's ``~/.raybatch/setup.log`` (``raybatch node-setup``'s log)."""
    from raybatch.cluster.mounts import default_log_path  # noqa: PLC0415

    cluster = Cluster.named(name)
    state = cluster.state()
    if _kind_of(cluster) == "fake":
        path = default_log_path()  # node-setup's log; fake nodes share this machine's RAYBATCH_HOME
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
