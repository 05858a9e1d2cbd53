"""``raybatch node-setup --mounts FILE`` (raybatch.cluster.mounts): Batch AI's mountVolumes
parsed with errors that name the field, the commands and 0600 files built for each kind,
secrets kept out of the log and the dry run, idempotence against a fake /proc/mounts, and
the CLI run for real (an unmanagedFileSystems command, which needs no Azure: Azure Files and
Blob storage cannot be reached from here, so their mounts are checked as built, not run)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raybatch.cluster import mounts as m
from raybatch.errors import SpecError

KEY = "c2VjcmV0LWFjY291bnQta2V5LXRoYXQtbXVzdC1uZXZlci1sZWFrPT0="
SHARE = {"accountName": "myacct", "azureFileUrl": "https://myacct.file.core.windows.net/myshare",
         "relativeMountPath": "afs", "credentials": {"accountKey": KEY}}
BLOB = {"accountName": "myacct", "containerName": "data", "relativeMountPath": "data",
        "mountOptions": "-o attr_timeout=240"}
NFS = {"mountCommand": "mount -t nfs 10.0.0.4:/export", "relativeMountPath": "nfs"}
RAYBATCH = [sys.executable, "-m", "raybatch.cli.main"]


def problems(doc) -> list[str]:
    with pytest.raises(SpecError) as e:
        m.parse(doc, "mounts.yaml")
    assert KEY not in str(e.value)
    return e.value.problems


def test_parse_batchai_fields_defaults_and_wrappers():
    v = m.parse({"azureFileShares": [SHARE], "azureBlobFileSystems": [BLOB], "unmanagedFileSystems": [NFS]})
    assert v.root == m.DEFAULT_MOUNT_ROOT == "/mnt/raybatch"
    assert (v.azureFileShares[0].directoryMode, v.azureFileShares[0].fileMode) == ("0777", "0777")
    assert v.azureFileShares[0].unc == "//myacct.file.core.windows.net/myshare"
    assert KEY not in repr(v)
    assert v.secrets() == [KEY]
    # mountVolumes: wrapped, a Batch AI cluster document, an empty file
    assert m.parse({"mountVolumes": {"unmanagedFileSystems": [NFS]}, "root": "/data"}).root == "/data"
    cluster = {"properties": {"vmSize": "STANDARD_NC6", "nodeSetup": {"mountVolumes": {"azureFileShares": [SHARE]}}}}
    assert len(m.parse(cluster).azureFileShares) == 1
    assert m.parse(None).unmanagedFileSystems == [] and m.parse({}).azureFileShares == []


@pytest.mark.parametrize("doc,expected", [
    ({"azureFileShares": [{**SHARE, "accountName": "My_Acct"}]},
     "azureFileShares.0.accountName: a storage account name: 3-24 lowercase letters and digits (got 'My_Acct')"),
    ({"azureFileShares": [{k: v for k, v in SHARE.items() if k != "credentials"}]},
     "azureFileShares.0.credentials: required field is missing"),
    ({"azureFileShares": [{**SHARE, "credentials": {}}]},
     "azureFileShares.0: credentials.accountKey is required for an Azure file share"),
    ({"azureFileShares": [{**SHARE, "credentials": {"accountKeySecretReference": {
        "sourceVault": {"id": "/subscriptions/x/vaults/v"}, "secretUrl": "https://v.vault.azure.net/secrets/k"}}}]},
     "azureFileShares.0.credentials: accountKeySecretReference (Key Vault) is not supported on nodes yet"),
    ({"azureFileShares": [{**SHARE, "azureFileUrl": "myacct.file.core.windows.net/myshare"}]},
     "azureFileShares.0.azureFileUrl: https://<account>.file.core.windows.net/<share>"),
    ({"azureFileShares": [{**SHARE, "fileMode": "0999"}]},
     "azureFileShares.0.fileMode: an octal mode"),
    ({"azureBlobFileSystems": [{**BLOB, "containerName": "Bad--Name"}]},
     "azureBlobFileSystems.0.containerName: a container name"),
    ({"azureBlobFileSystems": [{**BLOB, "mountOptions": "-o 'unterminated"}]},
     "azureBlobFileSystems.0.mountOptions: not a valid command-line fragment"),
    ({"unmanagedFileSystems": [{**NFS, "relativeMountPath": "../etc"}]},
     "unmanagedFileSystems.0.relativeMountPath: a relative path under the mount root"),
    ({"unmanagedFileSystems": [{**NFS, "mountCmd": "x"}]},
     "unmanagedFileSystems.0.mountCmd: unknown field; allowed: appendMountPath, mountCommand, relativeMountPath"),
    ({"root": "mnt/x"}, "root: an absolute directory"),
    ({"fileServers": [{"fileServer": {"id": "x"}, "relativeMountPath": "fs"}]},
     "fileServers: raybatch has no managed file servers; mount the NFS export with unmanagedFileSystems"),
    ({"azureFileShares": [SHARE], "unmanagedFileSystems": [{**NFS, "relativeMountPath": "afs"}]},
     "unmanagedFileSystems.0.relativeMountPath: 'afs' is also the path of azureFileShares.0"),
    (["not", "a", "mapping"], "(top level): a mounts file is a mapping"),
])
def test_parse_errors_name_the_field(doc, expected):
    assert any(p.startswith(expected) or expected in p for p in problems(doc)), problems(doc)


def test_a_malformed_key_never_appears_in_the_error():
    bad_key = 123456789012345
    out = problems({"azureFileShares": [{**SHARE, "credentials": {"accountKey": bad_key}}]})
    assert out and all(str(bad_key) not in p for p in out)
    assert any(p.startswith("azureFileShares.0.credentials.accountKey:") for p in out)


def _plans(doc, tmp_path, mounted=frozenset(), euid=0):
    return m.plan(m.parse(doc), mounted=set(mounted), euid=euid, uid=1000, gid=1001, secrets=tmp_path / "secrets")


class Recorder:
    """Stands in for subprocess.run: records argv, answers rc (and output) per call."""

    def __init__(self, rc=0, stdout="", stderr=""):
        self.calls, self.rc, self.stdout, self.stderr = [], rc, stdout, stderr

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, self.rc, self.stdout, self.stderr)


def test_azure_files_cifs_with_a_0600_credentials_file(tmp_path):
    (p,) = _plans({"azureFileShares": [{**SHARE, "directoryMode": "0755", "fileMode": 644}]}, tmp_path)
    cred = tmp_path / "secrets" / "cifs-afs.cred"
    assert p.steps[-1].argv == [
        "mount", "-t", "cifs", "//myacct.file.core.windows.net/myshare", "/mnt/raybatch/afs", "-o",
        f"vers=3.0,credentials={cred},dir_mode=0755,file_mode=0644,serverino,nosharesock,actimeo=30,"
        "uid=1000,gid=1001"]
    assert all(KEY not in " ".join(s.argv or []) and KEY not in s.describe for s in p.steps)
    log_path = tmp_path / "setup.log"
    runner = Recorder()
    failures = m.run([p], m.SetupLog(log_path, [KEY]), euid=0, runner=runner)
    assert failures == []
    assert cred.read_text() == f"username=myacct\npassword={KEY}\n"
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert stat.S_IMODE(cred.parent.stat().st_mode) == 0o700
    assert runner.calls == [["mkdir", "-p", "/mnt/raybatch/afs"], p.steps[-1].argv]  # root: no sudo
    log = log_path.read_text()
    assert KEY not in log and "password=***" in log and "mount -t cifs" in log
    # an existing credentials file with a wider mode is narrowed on rewrite
    cred.chmod(0o644)
    m.run([p], m.SetupLog(None, [KEY]), euid=0, runner=Recorder())
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600


def test_blobfuse2_config_with_managed_identity_or_key(tmp_path):
    (p,) = _plans({"azureBlobFileSystems": [BLOB]}, tmp_path)
    cfg_step = p.steps[0]
    config = yaml.safe_load(cfg_step.content)
    assert config["azstorage"] == {"type": "block", "account-name": "myacct", "container": "data",
                                   "endpoint": "https://myacct.blob.core.windows.net", "mode": "msi"}
    assert config["allow-other"] is True and "file_cache" in config["components"]
    assert p.steps[-1].argv == ["blobfuse2", "mount", "/mnt/raybatch/data",
                                f"--config-file={tmp_path / 'secrets' / 'blobfuse2-data.yaml'}", "-o",
                                "attr_timeout=240"]
    m.run([p], m.SetupLog(None, []), euid=0, runner=Recorder())
    assert stat.S_IMODE(Path(cfg_step.write).stat().st_mode) == 0o600

    (p,) = _plans({"azureBlobFileSystems": [{**BLOB, "credentials": {"accountKey": KEY}}]}, tmp_path)
    config = yaml.safe_load(p.steps[0].content)
    assert (config["azstorage"]["mode"], config["azstorage"]["account-key"]) == ("key", KEY)
    assert KEY not in p.steps[0].describe and "'account-key': '***'" in p.steps[0].describe


def test_unmanaged_command_substitution_and_appended_path(tmp_path):
    doc = {"root": "/data/mnt", "unmanagedFileSystems": [
        NFS,
        {"mountCommand": "mount -t nfs $AZ_BATCHAI_MOUNT_ROOT_X:/e ${AZ_BATCHAI_MOUNT_ROOT}/../src",
         "relativeMountPath": "a/b"},
        {"mountCommand": "cp -r $AZ_BATCHAI_JOB_MOUNT_ROOT/x $RAYBATCH_MOUNT_PATH/",
         "relativeMountPath": "c d", "appendMountPath": False},
    ]}
    with pytest.raises(SpecError):  # a space is not allowed in relativeMountPath
        m.parse(doc)
    doc["unmanagedFileSystems"][2]["relativeMountPath"] = "c"
    p1, p2, p3 = _plans(doc, tmp_path)
    assert p1.steps[-1].argv == ["bash", "-c", "mount -t nfs 10.0.0.4:/export /data/mnt/nfs"]
    # only whole variable names are replaced
    assert p2.steps[-1].argv[-1] == "mount -t nfs $AZ_BATCHAI_MOUNT_ROOT_X:/e /data/mnt/../src /data/mnt/a/b"
    assert p3.steps[-1].argv[-1] == "cp -r /data/mnt/x /data/mnt/c/"
    assert p1.steps[0].argv == ["mkdir", "-p", "/data/mnt/nfs"]


def test_idempotent_against_proc_mounts(tmp_path):
    proc = tmp_path / "mounts"
    proc.write_text("sysfs /sys sysfs rw,nosuid 0 0\n"
                    "//myacct.file.core.windows.net/myshare /mnt/raybatch/afs cifs rw,vers=3.0 0 0\n"
                    "10.0.0.4:/export /mnt/raybatch/my\\040nfs nfs4 rw 0 0\n")
    mounted = m.mounted_dirs(proc)
    assert {"/mnt/raybatch/afs", "/mnt/raybatch/my nfs", "/sys"} <= mounted
    assert m.mounted_dirs(tmp_path / "absent") == set()
    plans = _plans({"azureFileShares": [SHARE], "azureBlobFileSystems": [BLOB]}, tmp_path, mounted)
    assert plans[0].skip and plans[0].steps == [] and not plans[1].skip
    runner, log_path = Recorder(), tmp_path / "setup.log"
    assert m.run(plans, m.SetupLog(log_path, [KEY]), euid=0, runner=runner) == []
    assert not any("cifs" in " ".join(c) for c in runner.calls)
    assert "azureFileShares[0] -> /mnt/raybatch/afs: skipped, already mounted" in log_path.read_text()


def test_non_root_uses_sudo_and_failures_are_reported_redacted(tmp_path):
    plans = _plans({"azureFileShares": [SHARE], "unmanagedFileSystems": [NFS]}, tmp_path, euid=1000)
    runner = Recorder(rc=32, stderr=f"mount error(13): Permission denied for key {KEY}\n")
    log_path = tmp_path / "setup.log"
    failures = m.run(plans, m.SetupLog(log_path, [KEY]), euid=1000, runner=runner)
    # each mount stops at its first failing step (mkdir), the next mount still runs
    assert runner.calls == [["sudo", "-n", "mkdir", "-p", "/mnt/raybatch/afs"],
                            ["sudo", "-n", "mkdir", "-p", "/mnt/raybatch/nfs"]]
    assert len(failures) == 2 and "exited 32: mount error(13): Permission denied for key ***" in failures[0]
    assert KEY not in "".join(failures) and KEY not in log_path.read_text()


def test_missing_tools_name_the_package():
    plans = m.plan(m.parse({"azureFileShares": [SHARE], "azureBlobFileSystems": [BLOB]}), mounted=set(),
                   euid=1000, secrets=Path("/nonexistent"))
    out = m.missing_tools(plans, euid=1000, which=lambda t: None if t in ("mount.cifs", "blobfuse2", "sudo") else t)
    assert len(out) == 3
    assert "mount.cifs not found: install cifs-utils (sudo apt-get install -y cifs-utils)" in out
    assert "sudo not found: install sudo (or run node-setup as root)" in out
    assert any(o.startswith("blobfuse2 not found: install blobfuse2 from packages.microsoft.com") for o in out)
    assert m.missing_tools(plans, euid=0, which=lambda t: t) == []


def _env(tmp_path) -> dict:
    return {**os.environ, "RAYBATCH_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "COLUMNS": "200"}


def test_cli_dry_run_prints_commands_without_secrets(tmp_path):
    f = tmp_path / "mounts.yaml"
    f.write_text(yaml.safe_dump({"azureFileShares": [SHARE], "azureBlobFileSystems": [
        {**BLOB, "credentials": {"accountKey": KEY}}], "unmanagedFileSystems": [NFS]}))
    r = subprocess.run([*RAYBATCH, "node-setup", "--mounts", str(f), "--dry-run"], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout + r.stderr
    out = r.stdout
    assert "# azureFileShares[0] -> /mnt/raybatch/afs" in out and "mount -t cifs //myacct.file.core.windows.net/myshare" in out
    assert "password=***" in out and "blobfuse2 mount /mnt/raybatch/data" in out
    assert "bash -c 'mount -t nfs 10.0.0.4:/export /mnt/raybatch/nfs'" in out
    assert not (tmp_path / "home").exists()  # a dry run writes nothing, not even the log

    f.write_text(yaml.safe_dump({"azureFileShares": [{**SHARE, "credentials": {"accountKeySecretReference": {}}}]}))
    r = subprocess.run([*RAYBATCH, "node-setup", "--mounts", str(f), "--dry-run"], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=60)
    assert r.returncode == 2 and "azureFileShares.0.credentials: accountKeySecretReference (Key Vault) is not " \
        "supported on nodes yet" in " ".join(r.stderr.split())


can_run_as_root = os.geteuid() == 0 or (shutil.which("sudo") and subprocess.run(
    ["sudo", "-n", "true"], capture_output=True).returncode == 0)


@pytest.mark.skipif(not can_run_as_root, reason="node-setup runs mount commands as root: needs root or sudo -n")
def test_cli_runs_an_unmanaged_mount_end_to_end(tmp_path):
    root = tmp_path / "mnt"
    f = tmp_path / "mounts.yaml"
    f.write_text(yaml.safe_dump({"root": str(root), "unmanagedFileSystems": [
        # Batch AI appends the mount path: here it is $0 of the sh -c script
        {"mountCommand": "sh -c 'echo mounted > \"$0/marker\"'", "relativeMountPath": "share"},
        {"mountCommand": "echo root=$AZ_BATCHAI_MOUNT_ROOT > $RAYBATCH_MOUNT_PATH/root.txt",
         "relativeMountPath": "other/deep", "appendMountPath": False},
    ]}))
    env = _env(tmp_path)
    r = subprocess.run([*RAYBATCH, "node-setup", "--mounts", str(f)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "share" / "marker").read_text() == "mounted\n"
    assert (root / "other" / "deep" / "root.txt").read_text() == f"root={root}\n"
    log = (tmp_path / "home" / "setup.log").read_text()
    assert f"unmanagedFileSystems[0] -> {root}/share: mounted" in log and "done: 2 of 2 mount(s) in place" in log

    # a failing command: exit 1, said on stderr and in the log
    f.write_text(yaml.safe_dump({"root": str(root), "unmanagedFileSystems": [
        {"mountCommand": "echo no such export >&2; exit 32;", "relativeMountPath": "bad"}]}))
    r = subprocess.run([*RAYBATCH, "node-setup", "--mounts", str(f)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1
    assert "exited 32: no such export" in " ".join(r.stderr.split())
    assert "FAILED: exit 32" in (tmp_path / "home" / "setup.log").read_text()


@pytest.mark.skipif(bool(shutil.which("mount.cifs", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")),
                    reason="cifs-utils is installed here: the CLI would really try to mount")
def test_cli_without_mount_cifs_says_which_package(tmp_path):
    f = tmp_path / "mounts.yaml"
    f.write_text(yaml.safe_dump({"root": str(tmp_path / "mnt"), "azureFileShares": [SHARE]}))
    r = subprocess.run([*RAYBATCH, "node-setup", "--mounts", str(f)], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=60)
    assert r.returncode == 1
    assert "mount.cifs not found: install cifs-utils" in r.stderr
    assert not (tmp_path / "mnt").exists()  # nothing was done
