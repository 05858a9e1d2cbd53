"""`raybatch cluster up|status|nodes|scale|down` end to end, as users run them (the real
CLI in subprocesses), on cluster_configs/local-fake.yaml (Ray's fake_multinode provider:
worker nodes are raylets on this machine that the autoscaler starts), with RAYBATCH_HOME
in a temporary directory; and the Azure-only steps of `up`/`down` in order, against
stand-ins for Ray's SDK and the ARM helpers (Azure cannot be reached from here)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raybatch.cluster.lifecycle import pids_mentioning
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
        c = status["counts"]
        assert c["idle"] + c["running"] == 2, status
        # resizing exactly when something is launched, set up, leaving or asked for
        busy = bool(status["launching"] or c["preparing"] or c["leaving"] or (status["demand"] or {}).get("to_add"))
        assert status["phase"] == ("resizing" if busy else "steady") and bool(status["why"]) == busy, status
        shown = cli(home, "cluster", "status", "local-fake").stdout.splitlines()[0]
        assert shown == "cluster local-fake: steady" or shown.startswith("cluster local-fake: resizing ("), shown
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
    assert not pids_mentioning(state["temp_dir"]), "down left processes of the cluster running"
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
TOKEN_OUT = b"banner\nRAYBATCH-API-TOKEN:secret-api-token:RAYBATCH-API-TOKEN\n"


class FakeOps:
    """Records the order of calls `up`/`down` make (Ray's SDK, pre-flight, ARM disk, ssh) and
    answers commands on the head as a head would: the API token (``token_reads``: the
    answers to the successive reads; the last one repeats), stopping the server and
    unmounting the state disk (``stop_error``: what that raises), whether the head answers.
    ``head_home``: the head's home directory: head-setup makes the server's TLS certificate
    and key there (with the real ``systemd.ensure_tls``), and reading the certificate reads it."""

    def __init__(self, problems=(), token_reads=(TOKEN_OUT,), stop_error=None, head_answers=True, head_home=None):
        self.calls: list[tuple] = []
        self.head_home = head_home
        self.problems = list(problems)
        self.sockets: list = []
        self.token_reads = list(token_reads)
        self.stop_error = stop_error
        self.head_answers = head_answers

    def names(self):
        return [c[0] for c in self.calls]

    def ops(self):
        from raybatch.cluster.lifecycle import AzureOps

        def rec(name, result=None):
            def f(*a, **kw):
                self.calls.append((name, a, kw))
                return result(*a, **kw) if callable(result) else result
            return f

        def run(path, cmd=None, with_output=False):
            self.calls.append(("run_on_cluster", (path,), {"cmd": cmd}))
            if "raybatch cluster head-setup" in cmd:
                from raybatch.cluster import systemd

                argv = [a.replace("~", str(self.head_home)) for a in shlex.split(cmd)]
                systemd.ensure_tls(Path(argv[argv.index("--tls-cert") + 1]), Path(argv[argv.index("--tls-key") + 1]))
            if not with_output:
                return ""
            if "RAYBATCH-TLS-CERT" in cmd:
                assert "RAYBATCH-TLS-CERT-BEGIN" not in cmd and "cat ~/raybatch-tls/server.pem;" in cmd, cmd
                pem = (self.head_home / "raybatch-tls" / "server.pem").read_text().replace("\n", "\r\n")
                return f"banner\r\nRAYBATCH-TLS-CERT-BEGIN\r\n{pem}RAYBATCH-TLS-CERT-END\r\n".encode()
            if "RAYBATCH-API-TOKEN" in cmd:
                return self.token_reads.pop(0) if len(self.token_reads) > 1 else self.token_reads[0]
            if not self.head_answers:
                raise RuntimeError("ssh: connect to host 20.1.2.3 port 22: Connection refused")
            if "RAYBATCH-HEAD OK" in cmd:
                return "banner\nRAYBATCH-HEAD-OK\n"
            if "systemctl stop" in cmd:
                if self.stop_error:
                    raise RuntimeError(self.stop_error)
                return "RAYBATCH-STOPPED\n"
            raise AssertionError(f"unexpected command on the head: {cmd}")

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


@pytest.fixture
def azure_up(tmp_path, monkeypatch):
    """An Azure cluster brought up through the stand-ins: (lifecycle, FakeOps, state)."""
    from raybatch.cluster import lifecycle

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(lifecycle, "build_wheel", lambda dist, progress=None: dist)  # (pip wheel: slow)
    monkeypatch.setattr(lifecycle, "_server_healthy", lambda url, ca_cert=None: True)
    fake = FakeOps(token_reads=(b"banner\nRAYBATCH-API-TOKEN::RAYBATCH-API-TOKEN\n", TOKEN_OUT),
                   head_home=tmp_path / "head")
    mounts = tmp_path / "mounts.yaml"
    mounts.write_text("azureFileShares: [{accountName: sa, accountKey: SECRET-KEY, shareName: s}]\n")
    state = lifecycle.up(azure_config(tmp_path), mounts, progress=lambda m: None, ops=fake.ops())
    yield lifecycle, fake, state
    if getattr(fake, "ssh", None) is not None and fake.ssh.poll() is None:
        fake.ssh.kill()
        fake.ssh.wait()


def test_azure_up_and_down_steps_in_order(azure_up, tmp_path):
    lifecycle, fake, state = azure_up
    names = fake.names()
    assert names[:5] == ["preflight", "create_or_update_cluster", "get_head_node_ip", "ensure_state_disk",
                         "run_on_cluster"]
    assert fake.calls[1][2] == {"no_restart": False, "restart_only": False}
    assert "--disk-lun 3" in fake.calls[4][2]["cmd"] and "head-setup" in fake.calls[4][2]["cmd"]
    # the server writes its token after importing Ray: read on the head once written, again if empty
    reads = [c[2]["cmd"] for c in fake.calls if c[0] == "run_on_cluster" and "RAYBATCH-API-TOKEN" in c[2]["cmd"]]
    assert len(reads) == 2 and all("test -s /mnt/raybatch-state/token" in r for r in reads)
    d = Path(state["cluster_config"]).parent
    assert (d / "api_token").read_text() == "secret-api-token" and oct((d / "api_token").stat().st_mode & 0o777) == "0o600"
    # what file_mounts copies to the nodes holds storage keys: this user's only
    assert oct((d / "node").stat().st_mode & 0o777) == "0o700"
    assert oct((d / "node" / "mounts.yaml").stat().st_mode & 0o777) == "0o600"
    assert "SECRET-KEY" in (d / "node" / "mounts.yaml").read_text()
    assert "{render_dir}" not in (d / "cluster.yaml").read_text()
    assert state["url"].startswith("https://127.0.0.1:") and state["tunnel"]["head_ip"] == "20.1.2.3"
    # the server's TLS certificate and key: made on the head by head-setup, the key 0600 in a
    # 0700 directory there; only the certificate comes back, the CLI's CA for this cluster.
    # Nothing of it is in file_mounts, which Ray copies to every worker.
    head_tls = tmp_path / "head" / "raybatch-tls"
    assert oct(head_tls.stat().st_mode & 0o777) == "0o700"
    assert oct((head_tls / "server.key").stat().st_mode & 0o777) == "0o600"
    assert state["ca_cert"] == str(d / "tls" / "server.pem") and lifecycle.ca_cert_of(state["name"]) == state["ca_cert"]
    assert (d / "tls" / "server.pem").read_bytes() == (head_tls / "server.pem").read_bytes()
    assert sorted(p.name for p in (d / "tls").iterdir()) == ["server.pem"], "the client never has the key"
    assert not any("PRIVATE KEY" in p.read_text(errors="replace") for p in d.rglob("*") if p.is_file())
    assert "raybatch-tls" not in json.dumps(yaml.safe_load((d / "cluster.yaml").read_text())["file_mounts"])
    assert "--tls-cert ~/raybatch-tls/server.pem --tls-key ~/raybatch-tls/server.key" in fake.calls[4][2]["cmd"]
    cert_reads = [i for i, c in enumerate(fake.calls) if "RAYBATCH-TLS-CERT" in (c[2].get("cmd") or "")]
    assert cert_reads == [5], "read once, after head-setup made it"
    key_before = (head_tls / "server.key").read_bytes()
    assert state["tunnel"]["start"] == lifecycle.proc_start(fake.ssh.pid)
    # up again: Ray is not restarted on the running head
    fake.calls.clear()
    lifecycle.up(azure_config(tmp_path), ops=fake.ops())
    assert next(c for c in fake.calls if c[0] == "create_or_update_cluster")[2]["no_restart"] is True
    # the head keeps its key and certificate across re-runs: clients keep trusting it
    assert (head_tls / "server.key").read_bytes() == key_before
    assert (d / "tls" / "server.pem").read_bytes() == (head_tls / "server.pem").read_bytes()
    # down: the server is stopped and the disk unmounted, then detached before Ray's teardown
    # deletes the head's disks
    fake.calls.clear()
    lifecycle.down(state["name"], ops=fake.ops())
    assert fake.ssh.wait(timeout=10) is not None, "down stops the tunnel"
    names = fake.names()
    stop = next(i for i, c in enumerate(fake.calls) if "systemctl stop" in (c[2].get("cmd") or ""))
    assert "umount /mnt/raybatch-state" in fake.calls[stop][2]["cmd"]
    assert stop < names.index("detach_state_disk") < names.index("teardown_cluster")
    assert fake.calls[-1][2] == {"workers_only": False, "keep_min_workers": False}


def test_azure_token_never_written_is_a_clear_error(tmp_path, monkeypatch):
    from raybatch.cluster import lifecycle

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(lifecycle, "build_wheel", lambda dist, progress=None: dist)
    fake = FakeOps(token_reads=(b"RAYBATCH-API-TOKEN::RAYBATCH-API-TOKEN\n",), head_home=tmp_path / "head")
    with pytest.raises(lifecycle.ClusterError, match="could not read the server's API token"):
        lifecycle.up(azure_config(tmp_path), ops=fake.ops())
    assert sum("RAYBATCH-API-TOKEN" in (c[2].get("cmd") or "") for c in fake.calls) == lifecycle.TOKEN_READS


def test_azure_certificate_not_on_the_head_is_a_clear_error(tmp_path, monkeypatch):
    """No certificate to read back: `up` says so; and a key an older raybatch left in the
    render directory (it shipped it by file_mounts) is removed, never used again."""
    from raybatch.cluster import lifecycle

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(lifecycle, "build_wheel", lambda dist, progress=None: dist)
    path = azure_config(tmp_path)
    old = tmp_path / "home" / "clusters" / yaml.safe_load(path.read_text())["cluster_name"] / "tls"
    old.mkdir(parents=True)
    (old / "server.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    fake = FakeOps(head_home=tmp_path / "head")
    real_ops = fake.ops()
    real_run = real_ops.run_on_cluster

    def run(path, cmd=None, with_output=False):
        out = real_run(path, cmd=cmd, with_output=with_output)
        return b"banner\nRAYBATCH-TLS-CERT-BEGIN\ncat: no such file\nRAYBATCH-TLS-CERT-END\n" if "TLS-CERT" in cmd else out

    ops = lifecycle.AzureOps(*[run if f.name == "run_on_cluster" else getattr(real_ops, f.name)
                               for f in dataclasses.fields(real_ops)])
    with pytest.raises(lifecycle.ClusterError, match=r"could not read the server's TLS certificate on the head "
                       r"\(~/raybatch-tls/server.pem\): not a PEM certificate"):
        lifecycle.up(path, ops=ops)
    assert not (old / "server.key").exists() and not (old / "server.pem").exists()
    assert sum("TLS-CERT" in (c[2].get("cmd") or "") for c in fake.calls) == lifecycle.TOKEN_READS


def test_azure_scale_lints_the_rendered_config_and_applies_it(azure_up):
    lifecycle, fake, state = azure_up
    fake.calls.clear()
    path = lifecycle.scale(state["name"], "cpu_d16", 1, 3, ops=fake.ops())
    rendered = yaml.safe_load(path.read_text())
    assert rendered["available_node_types"]["cpu_d16"]["min_workers"] == 1
    assert rendered["available_node_types"]["cpu_d16"]["max_workers"] == 3
    assert rendered["file_mounts"]["~/raybatch-setup"] == str(path.parent / "node")  # still rendered
    assert fake.calls == [("create_or_update_cluster", (str(path),), {"no_restart": True, "restart_only": False})]
    with pytest.raises(lifecycle.ClusterError, match="not a worker type"):
        lifecycle.scale(state["name"], "head", 0, 1, ops=fake.ops())


def test_azure_down_workers_only_keeps_the_head_and_its_disk(azure_up):
    lifecycle, fake, state = azure_up
    fake.calls.clear()
    lifecycle.down(state["name"], workers_only=True, ops=fake.ops())
    assert fake.names() == ["teardown_cluster"]
    assert fake.calls[0][2] == {"workers_only": True, "keep_min_workers": False}
    assert fake.ssh.poll() is None, "the tunnel to the head's server stays"
    after = json.loads((Path(state["cluster_config"]).parent / "state.json").read_text())
    assert after["head_ip"] == "20.1.2.3" and after["url"] == state["url"]


def test_azure_down_stops_when_the_head_cannot_unmount_the_state_disk(azure_up):
    lifecycle, fake, state = azure_up
    fake.calls.clear()
    fake.stop_error = "umount: /mnt/raybatch-state: target is busy."
    with pytest.raises(lifecycle.ClusterError, match="target is busy.*--force"):
        lifecycle.down(state["name"], ops=fake.ops())
    assert "detach_state_disk" not in fake.names() and "teardown_cluster" not in fake.names()
    # --force: detached anyway, with a warning
    fake.calls.clear()
    said: list[str] = []
    lifecycle.down(state["name"], ops=fake.ops(), force=True, progress=said.append)
    assert fake.names()[-2:] == ["detach_state_disk", "teardown_cluster"]
    assert any(m.startswith("warning: could not stop") and "--force" in m for m in said)


def test_azure_down_of_a_head_that_does_not_answer_detaches_the_disk(azure_up):
    lifecycle, fake, state = azure_up
    fake.calls.clear()
    fake.head_answers = False
    lifecycle.down(state["name"], ops=fake.ops())
    assert fake.names()[-2:] == ["detach_state_disk", "teardown_cluster"]
    assert not any("systemctl stop" in (c[2].get("cmd") or "") for c in fake.calls)


def test_azure_preflight_errors_stop_up_before_anything_is_created(tmp_path, monkeypatch):
    from raybatch.cluster import lifecycle
    from raybatch.cluster.preflight import Problem

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    fake = FakeOps([Problem("error", "cpu", "quota", "standardDSv3Family: needs 8 cores, 4 free")])
    with pytest.raises(lifecycle.ClusterError, match="needs 8 cores"):
        lifecycle.up(azure_config(tmp_path), ops=fake.ops())
    assert [c[0] for c in fake.calls] == ["preflight"]
    assert not (tmp_path / "home" / "clusters").exists()


# ---- down on fake_multinode: only what up started, never Ray's teardown ----------------
@pytest.fixture
def fake_rendered(tmp_path, monkeypatch):
    """local-fake's render directory as `up` leaves it, with nothing started."""
    from raybatch.cluster import lifecycle

    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    cluster, rendered = lifecycle.render(ROOT / "cluster_configs" / "local-fake.yaml", wheel=False)
    lifecycle.write_config(cluster, rendered)
    return lifecycle, cluster


def test_down_never_runs_rays_teardown_on_a_fake_cluster(fake_rendered):
    lifecycle, cluster = fake_rendered
    fake = FakeOps()
    cluster.state_file.write_text("{not json")  # unreadable: {}
    lifecycle.down(cluster.name, ops=fake.ops())
    assert fake.calls == [], "Ray's teardown runs `ray stop` on the head: this machine"
    cluster.write_state({"kind": "azure", "head_ip": "20.1.2.3"})
    with pytest.raises(lifecycle.ClusterError, match="is a 'fake' cluster but .* records 'azure'"):
        lifecycle.down(cluster.name, ops=fake.ops())
    config = yaml.safe_load(cluster.config_path.read_text())
    config["provider"] = {"type": "aws", "region": "us-west-2"}
    cluster.config_path.write_text(yaml.safe_dump(config))
    cluster.write_state({})
    with pytest.raises(lifecycle.ClusterError, match="neither Azure nor fake_multinode"):
        lifecycle.down(cluster.name, ops=fake.ops())
    assert fake.calls == []


def test_down_signals_a_recorded_pid_only_while_it_is_the_process_up_started(fake_rendered, tmp_path):
    lifecycle, cluster = fake_rendered
    # a temp_dir that is not one up makes (kept inside this test's own directory: run against
    # a `down` without the checks, it must not reach beyond it)
    bogus = tmp_path / "not-a-fake-cluster-temp-dir"
    bogus.mkdir()
    # stand-ins for the head and the server, in their own sessions as up starts them; their
    # command lines name that directory
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(bogus)],
                              start_new_session=True) for _ in range(2)]
    try:
        starts = [lifecycle.proc_start(p.pid) for p in procs]
        assert all(starts)
        said: list[str] = []
        # a stale state.json: the pids are alive but started at another time (someone else's now)
        cluster.write_state({"kind": "fake", "pids": {"server": procs[0].pid, "head": procs[1].pid},
                             "starts": {"server": starts[0] + 1, "head": starts[1] - 1}, "temp_dir": str(bogus)})
        lifecycle.down(cluster.name, progress=said.append)
        time.sleep(0.3)
        assert [p.poll() for p in procs] == [None, None], "down signalled processes it did not start"
        assert sum("no longer the process up started: left alone" in m for m in said) == 2
        assert any(f"temp_dir '{bogus}'" in m and "no process was stopped" in m for m in said)
        assert bogus.is_dir()
        # without a start time recorded: left alone too
        cluster.write_state({"kind": "fake", "pids": {"server": procs[0].pid}, "temp_dir": None})
        lifecycle.down(cluster.name)
        assert procs[0].poll() is None
        # the right start times: stopped
        cluster.write_state({"kind": "fake", "pids": {"server": procs[0].pid, "head": procs[1].pid},
                             "starts": {"server": starts[0], "head": starts[1]}, "temp_dir": None})
        lifecycle.down(cluster.name)
        assert all(p.wait(timeout=10) is not None for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_fake_setup_log_is_read_from_raybatch_home(fake_rendered, tmp_path):
    lifecycle, cluster = fake_rendered
    cluster.write_state({"kind": "fake", "pids": {}})
    (tmp_path / "home" / "setup.log").write_text("mounted /mnt/raybatch/data\n")
    assert lifecycle.setup_log(cluster.name, {"node_id": "n1"}) == "mounted /mnt/raybatch/data\n"


# ---- the CLI's errors ---------------------------------------------------------------------
def test_cli_turns_any_failure_of_down_and_scale_into_one_error_line(monkeypatch):
    from typer.testing import CliRunner

    from raybatch.cli.main import app
    from raybatch.cluster import lifecycle
    from raybatch.cluster.azure import ArmError

    def arm_fails(*a, **kw):
        raise ArmError("detaching rb-state", "OperationNotAllowed",
                       "see https://x.blob.core.windows.net/c?sv=1&sig=SECRETSIG and retry")

    monkeypatch.setattr(lifecycle, "down", arm_fails)
    r = CliRunner().invoke(app, ["cluster", "down", "c1", "--yes"])
    assert r.exit_code == 1, r.output
    assert "error: ArmError: detaching rb-state: OperationNotAllowed" in r.output
    assert "Traceback" not in r.output and "SECRETSIG" not in r.output

    def bad_value(*a, **kw):
        raise ValueError("c1/cluster.yaml: not valid YAML at line 3, column 1: mapping values")

    monkeypatch.setattr(lifecycle, "scale", bad_value)
    r = CliRunner().invoke(app, ["cluster", "scale", "c1", "--type", "cpu", "--min", "0", "--max", "1"])
    assert r.exit_code == 1 and "error: c1/cluster.yaml: not valid YAML at line 3" in r.output, r.output
    azure_exc = pytest.importorskip("azure.core.exceptions")

    def http_fails(*a, **kw):
        raise azure_exc.HttpResponseError(message="(AuthorizationFailed) no access to rb-rg")

    monkeypatch.setattr(lifecycle, "down", http_fails)
    r = CliRunner().invoke(app, ["cluster", "down", "c1", "--yes", "--force"])
    assert r.exit_code == 1 and "error: HttpResponseError: (AuthorizationFailed)" in r.output, r.output
    assert "Traceback" not in r.output


def test_cluster_check_runs_raybatchs_lints_before_the_preflight(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from raybatch.cli.main import app
    from raybatch.cluster import preflight

    seen = []
    monkeypatch.setattr(preflight, "check", lambda config: seen.append(config) or [
        preflight.Problem("warning", "cpu_d16", "max_workers", "quota for 4 of 8")])
    good = azure_config(tmp_path)
    r = CliRunner().invoke(app, ["cluster", "check", str(good)])
    assert r.exit_code == 0 and r.output.strip() == "warning: cpu_d16 max_workers: quota for 4 of 8", r.output
    cfg = yaml.safe_load(good.read_text())
    del cfg["file_mounts"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["cluster", "check", str(bad)])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith(f"error: {bad}: cluster file_mounts.~/raybatch-setup: must be '{{render_dir}}/node'")
    assert lines[-1] == "warning: cpu_d16 max_workers: quota for 4 of 8" and len(seen) == 2
    r = CliRunner().invoke(app, ["cluster", "check", str(bad), "-o", "json"])
    got = json.loads(r.output)
    assert r.exit_code == 1 and got[0]["level"] == "error" and got[0]["field"] == "lint"
