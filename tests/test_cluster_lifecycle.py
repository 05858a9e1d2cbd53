"""`raybatch cluster up|status|nodes|scale|down` end to end, as users run them (the real
CLI in subprocesses), on cluster_configs/local-fake.yaml (Ray's fake_multinode provider:
worker nodes are raylets on this machine that the autoscaler starts), with RAYBATCH_HOME
in a temporary directory; and the Azure-only steps of `up`/`down` in order, against
stand-ins for Ray's SDK and the ARM helpers (Azure cannot be reached from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, RayTestCluster, wait_for

pytestmark = pytest.mark.timeout(240)
RAYBATCH = str(Path(sys.executable).with_name("raybatch"))


def cli(home: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAYBATCH_ADDRESS", "RAYBATCH_TOKEN")}
    p = subprocess.run([RAYBATCH, *args], capture_output=True, text=True, timeout=timeout,
                       env={**env, "RAYBATCH_HOME": str(home)})
    if check:
        assert p.returncode == 0, f"raybatch {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p


def jobfile(tmp: Path, nodes: int, sleep: float) -> Path:
    f = tmp / f"job{nodes}.yaml"
    f.write_text(yaml.safe_dump({"name": f"n{nodes}", "nodes": nodes, "resources": {"cpus": 2},
                                 "command": f"echo rank $RANK; sleep {sleep}"}))
    return f


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def other_cluster():
    """Someone else's Ray cluster on this machine: `down` must leave it alone."""
    c = RayTestCluster(nodes=1)
    yield c
    c.shutdown()


def test_fake_cluster_life_cycle(tmp_path, other_cluster):
    home = tmp_path / "home"
    started = time.monotonic()
    out = cli(home, "cluster", "up", str(ROOT / "cluster_configs" / "local-fake.yaml"))
    assert "cluster local-fake is up" in out.stdout
    state = json.loads((home / "clusters" / "local-fake" / "state.json").read_text())
    assert state["kind"] == "fake" and state["temp_dir"].startswith("/tmp/rbfc_")
    try:
        token = home / "clusters" / "local-fake" / "ray_auth_token"
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        # up again: idempotent, nothing restarted
        cli(home, "cluster", "up", str(ROOT / "cluster_configs" / "local-fake.yaml"))
        assert json.loads((home / "clusters" / "local-fake" / "state.json").read_text())["pids"] == state["pids"]
        # no spot nodes: a 3-node job cannot fit two cpu2 nodes
        cli(home, "cluster", "scale", "local-fake", "--type", "cpu2-spot", "--min", "0", "--max", "0")
        rendered = yaml.safe_load((home / "clusters" / "local-fake" / "cluster.yaml").read_text())
        assert rendered["available_node_types"]["cpu2-spot"]["max_workers"] == 0

        def never_runs() -> bool:
            p = cli(home, "--cluster", "local-fake", "submit", str(jobfile(tmp_path, 3, 1)), check=False)
            return p.returncode != 0 and "can never run" in p.stderr
        wait_for(never_runs, 15, "the server to re-read the scaled config")
        job = cli(home, "--cluster", "local-fake", "submit", str(jobfile(tmp_path, 2, 4))).stdout.strip()

        def state_of(job_id: str) -> str:
            return json.loads(cli(home, "--cluster", "local-fake", "show", job_id, "-o", "json").stdout)["state"]
        wait_for(lambda: state_of(job) == "RUNNING", 60, "the 2-node job to run on autoscaled nodes", 0.5)
        nodes = json.loads(cli(home, "cluster", "nodes", "local-fake", "-o", "json").stdout)
        workers = [n for n in nodes if not n["head"]]
        assert len(workers) == 2 and {n["node_type"] for n in workers} == {"cpu2"}
        assert all(job in n["jobs"] for n in workers) and all(not n["spot"] for n in workers)
        assert [n for n in nodes if n["head"]][0]["node_type"] == "ray.head.default"
        status = json.loads(cli(home, "cluster", "status", "local-fake", "-o", "json").stdout)
        assert status["counts"]["idle"] + status["counts"]["running"] == 2
        assert "steady" in cli(home, "cluster", "status", "local-fake").stdout or status["phase"] == "resizing"
        wait_for(lambda: state_of(job) == "SUCCEEDED", 60, "the 2-node job to finish", 0.5)
        # a larger max takes effect: the server plans with it and the autoscaler launches a 3rd node
        cli(home, "cluster", "scale", "local-fake", "--type", "cpu2", "--min", "0", "--max", "3")
        big = None

        def submitted() -> bool:
            nonlocal big
            p = cli(home, "--cluster", "local-fake", "submit", str(jobfile(tmp_path, 3, 1)), check=False)
            big = p.stdout.strip() if p.returncode == 0 else None
            return big is not None
        wait_for(submitted, 15, "the server to accept a 3-node job after scale")
        wait_for(lambda: state_of(big) in ("RUNNING", "SUCCEEDED"), 60, "the 3-node job on 3 cpu2 nodes", 0.5)
        detail = json.loads(cli(home, "--cluster", "local-fake", "show", big, "-o", "json").stdout)
        assert len({r["node_id"] for r in detail["attempts"][-1]["ranks"]}) == 3
    finally:
        cli(home, "cluster", "down", "local-fake", "--yes")
    assert not _pids_mentioning(state["temp_dir"]), "down left processes of the cluster running"
    for pid in state["pids"].values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    # the other Ray cluster on this machine is alive
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    alive = [n for n in get_cluster_resource_state(GcsClient(address=other_cluster.address)).node_states
             if n.status in (1, 3)]
    assert alive, "down stopped another Ray cluster"
    p = cli(home, "--cluster", "local-fake", "list", check=False)
    assert p.returncode != 0 and "is down" in p.stderr
    p = cli(home, "--cluster", "nope", "list", check=False)
    assert p.returncode != 0 and "known: local-fake" in p.stderr
    assert time.monotonic() - started < 150


# ---- Azure, with stand-ins for what cannot be reached from here ----------------------
class FakeOps:
    """Records the order of calls `up`/`down` make (Ray's SDK, pre-flight, ARM disk, ssh)."""

    def __init__(self, problems=()):
        self.calls: list[tuple] = []
        self.problems = list(problems)
        self.sockets: list = []

    def ops(self):
        from raybatch.cluster.lifecycle import AzureOps

        def rec(name, result=None):
            def f(*a, **kw):
                self.calls.append((name, a, kw))
                return result(*a, **kw) if callable(result) else result
            return f

        def run(path, cmd=None, with_output=False):
            self.calls.append(("run_on_cluster", (path,), {"cmd": cmd}))
            return b"banner\nRAYBATCH-API-TOKEN:secret-api-token:RAYBATCH-API-TOKEN\n" if with_output else ""

        def tunnel(config, head_ip, local, remote, log):
            self.calls.append(("open_tunnel", (head_ip, remote), {}))
            import socket

            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", local))
            srv.listen(16)
            self.sockets.append(srv)  # stands in for ssh's forwarded port while the test runs
            self.ssh = subprocess.Popen(["sleep", "60"])  # stands in for the ssh process (`down` stops it)
            return self.ssh.pid

        return AzureOps(rec("create_or_update_cluster"), rec("teardown_cluster"), run,
                        rec("get_head_node_ip", "20.1.2.3"), rec("preflight", lambda c: self.problems),
                        rec("ensure_state_disk", {"lun": 3, "name": "rb-state"}), rec("detach_state_disk"), tunnel)


def azure_config(tmp_path: Path) -> Path:
    src = ROOT / "cluster_configs" / "azure-cpu.yaml"
    if not src.exists():
        pytest.skip("cluster_configs/azure-cpu.yaml is not written yet")
    cfg = yaml.safe_load(src.read_text())
    cfg["provider"]["subscription_id"] = "00000000-0000-0000-0000-000000000000"
    out = tmp_path / "azure.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_azure_up_and_down_steps_in_order(tmp_path, monkeypatch):
    from raybatch.cluster import lifecycle

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(lifecycle, "build_wheel", lambda dist, progress=None: dist)  # (pip wheel: slow)
    monkeypatch.setattr(lifecycle, "_server_healthy", lambda url: True)
    fake = FakeOps()
    state = lifecycle.up(azure_config(tmp_path), progress=lambda m: None, ops=fake.ops())
    names = [c[0] for c in fake.calls]
    assert names[:5] == ["preflight", "create_or_update_cluster", "get_head_node_ip", "ensure_state_disk",
                         "run_on_cluster"]
    assert fake.calls[1][2] == {"no_restart": False, "restart_only": False}
    assert "--disk-lun 3" in fake.calls[4][2]["cmd"] and "head-setup" in fake.calls[4][2]["cmd"]
    d = Path(state["cluster_config"]).parent
    assert (d / "api_token").read_text() == "secret-api-token" and oct((d / "api_token").stat().st_mode & 0o777) == "0o600"
    assert "{render_dir}" not in (d / "cluster.yaml").read_text()
    assert state["url"].startswith("http://127.0.0.1:") and state["tunnel"]["head_ip"] == "20.1.2.3"
    # up again: Ray is not restarted on the running head
    fake.calls.clear()
    lifecycle.up(azure_config(tmp_path), ops=fake.ops())
    assert next(c for c in fake.calls if c[0] == "create_or_update_cluster")[2]["no_restart"] is True
    # down: the disk is detached before Ray's teardown deletes the head's disks
    fake.calls.clear()
    lifecycle.down(state["name"], ops=fake.ops())
    assert fake.ssh.wait(timeout=10) is not None, "down stops the tunnel"
    names = [c[0] for c in fake.calls]
    assert names.index("detach_state_disk") < names.index("teardown_cluster")
    assert fake.calls[-1][2] == {"workers_only": False, "keep_min_workers": False}


def test_azure_preflight_errors_stop_up_before_anything_is_created(tmp_path, monkeypatch):
    from raybatch.cluster import lifecycle
    from raybatch.cluster.preflight import Problem

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    fake = FakeOps([Problem("error", "cpu", "quota", "standardDSv3Family: needs 8 cores, 4 free")])
    with pytest.raises(lifecycle.ClusterError, match="needs 8 cores"):
        lifecycle.up(azure_config(tmp_path), ops=fake.ops())
    assert [c[0] for c in fake.calls] == ["preflight"]
    assert not (tmp_path / "home" / "clusters").exists()
