"""The raybatch server on a cluster's head node, as a systemd unit that restarts it.

``raybatch cluster head-setup`` (run on the head by the cluster YAML's
``head_start_ray_commands``, after ``ray start --head``) renders
``raybatch-server.service``, writes it to /etc/systemd/system (through ``sudo``: the
YAML's commands run as the ssh user), reloads systemd and enables the unit. With
``--tls-cert/--tls-key`` it first makes the server's certificate and key there if they are
missing (``ensure_tls``): the key is made on the head and never leaves it. The server
listens on 127.0.0.1 only: clients reach it through an SSH tunnel (``raybatch cluster up``
opens one) and never over the network.

The state directory is the cluster's managed data disk (``raybatch cluster up`` attaches
it after ``ray up``, then mounts it here with ``head-setup --disk-lun N``); until it is
mounted, ``ConditionPathIsMountPoint`` keeps the server from starting on the OS disk.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

UNIT_NAME = "raybatch-server.service"
UNIT_DIR = Path("/etc/systemd/system")
SERVER_PORT = 8765
RAY_ADDRESS = "127.0.0.1:6379"
DASHBOARD_URL = "http://127.0.0.1:8265"

Runner = Callable[[list[str]], None]


def render_unit(*, state_dir: str, cluster_config: str, user: Optional[str] = None, home: Optional[str] = None,
                python: Optional[str] = None, port: int = SERVER_PORT, ray_address: str = RAY_ADDRESS,
                dashboard_url: str = DASHBOARD_URL, require_mount: bool = True,
                tls_cert: Optional[str] = None, tls_key: Optional[str] = None) -> str:
    """The unit file's text. ``python``: the interpreter raybatch is installed in (the one
    Ray runs from on the head); ``home``: the user's home, where Ray's auth token is
    (``~/.ray/auth_token``, put there by the YAML's file_mounts). ``tls_cert``/``tls_key``:
    the server serves HTTPS with them (``~/raybatch-tls``, made on the head by
    ``head-setup``: the key never leaves it)."""
    user = user or getpass.getuser()
    home = home or os.path.expanduser(f"~{user}")
    python = python or sys.executable
    argv = [python, "-m", "raybatch.server", "--state-dir", state_dir, "--ray-address", ray_address,
            "--dashboard-url", dashboard_url, "--cluster-config", cluster_config,
            "--host", "127.0.0.1", "--port", str(port)]
    if tls_cert or tls_key:
        argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
    unit = [
        "[Unit]",
        "Description=raybatch server (job queue, scheduler, REST API on 127.0.0.1)",
        "After=network-online.target",
        "Wants=network-online.target",
    ]
    if require_mount:
        unit.append(f"ConditionPathIsMountPoint={state_dir}")
    unit += [
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"WorkingDirectory={home}",
        f"Environment=HOME={home}",
        "Environment=RAY_AUTH_MODE=token",
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={' '.join(shlex.quote(a) for a in argv)}",
        "Restart=always",
        "RestartSec=5",
        # the store is SQLite in WAL mode: SIGTERM lets the server finish its writes
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(unit)


def ensure_tls(cert: Path, key: Path) -> tuple[Path, Path]:
    """The server's certificate and key on the head (``head-setup --tls-cert --tls-key``):
    made here if either is missing (self-signed; the head's host name and addresses among its
    names), kept otherwise, the key 0600. Made on the head because the key must never be in
    ``file_mounts``, which reach every worker; ``raybatch cluster up`` reads back only the
    certificate."""
    from raybatch.cluster import tls  # noqa: PLC0415

    return tls.pair(cert, key, hosts=tls.local_names())


def _sudo(argv: list[str]) -> list[str]:
    return argv if os.geteuid() == 0 else ["sudo", "-n", *argv]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def install(unit_text: str, *, unit_dir: Path = UNIT_DIR, run: Runner = _run) -> Path:
    """Write the unit, reload systemd and enable it (start it now when its condition holds,
    restart it when it already runs: a new raybatch wheel or command line)."""
    path = unit_dir / UNIT_NAME
    tmp = Path(f"/tmp/{UNIT_NAME}.{os.getpid()}")
    tmp.write_text(unit_text)
    try:
        run(_sudo(["install", "-m", "0644", str(tmp), str(path)]))
    finally:
        tmp.unlink(missing_ok=True)
    run(_sudo(["systemctl", "daemon-reload"]))
    run(_sudo(["systemctl", "enable", UNIT_NAME]))
    run(_sudo(["systemctl", "restart", UNIT_NAME]))
    return path


def mount_state_disk(state_dir: str, lun: int, *, run: Runner = _run, user: Optional[str] = None) -> str:
    """Mount the managed data disk at ``lun`` on ``state_dir``: format it (ext4) only when
    it holds no file system (a disk kept from an earlier cluster keeps its store), add a
    ``nofail`` fstab entry by UUID so a reboot mounts it again, give it to ``user``."""
    device = f"/dev/disk/azure/scsi1/lun{lun}"
    user = user or getpass.getuser()
    script = (
        "set -eu\n"
        f"dev=$(readlink -f {shlex.quote(device)})\n"
        'if ! blkid "$dev" >/dev/null 2>&1; then mkfs.ext4 -q -L raybatch-state "$dev"; fi\n'
        f"mkdir -p {shlex.quote(state_dir)}\n"
        'uuid=$(blkid -s UUID -o value "$dev")\n'
        f"grep -q \"UUID=$uuid \" /etc/fstab || echo \"UUID=$uuid {state_dir} ext4 defaults,nofail 0 2\" >> /etc/fstab\n"
        f"mountpoint -q {shlex.quote(state_dir)} || mount {shlex.quote(state_dir)}\n"
        f"chown {shlex.quote(user)}: {shlex.quote(state_dir)}\n"
    )
    run(_sudo(["sh", "-c", script]))
    return device
