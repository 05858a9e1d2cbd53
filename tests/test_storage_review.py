"""Storage defects found in review of issue #5, each pinned by a test: secrets never
echoed, nothing served that a job merely names, restored checkpoints never re-uploaded,
a final upload that did not run never taken for success, long logs within Azure's
append-blob limit, staging blips retried, and the scheduler's bookkeeping around them.
No Ray cluster: the driver's storage steps run against a fake ``ray`` module (remote
calls run inline)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from raybatch.runtime import driver as driver_mod
from raybatch.runtime import gang as gang_mod
from raybatch.runtime import setup as setup_mod
from raybatch.runtime import watch as watch_mod
from raybatch.runtime.protocol import RankReport
from raybatch.runtime.launcher import RayJobState
from raybatch.spec.job import JobSpec
from raybatch.spec.loader import SpecError
from raybatch.storage.backends import Backend, LocalBackend, StorageError, open_backend
from raybatch.storage.datastores import Access, Datastores
from raybatch.storage.plan import job_dir_for, resolve_attempt
from raybatch.storage.staging import InputCache, download_tree
from raybatch.storage.sync import DirSync
from tests.test_scheduler_loop import FakeLauncher, make, submit

pytestmark = pytest.mark.timeout(60)

SECRET = "TOPSECRETKEY0123456789=="


def local(path: Path) -> Backend:
    return open_backend(Access("local", str(path), uri=str(path)))


# ---- 1. secrets ---------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    # an inline key the parser chokes on: PyYAML quotes the offending line in its message
    f"datastores:\n  t:\n    url: az://data\n    account: acct1\n    credential:\n"
    f"      account_key: \"{SECRET}\n",
    f"datastores:\n  t:\n    url: az://data\n    account: acct1\n    credential:\n"
    f"      account_key: {SECRET}: x\n",
    # a connection string pasted as the url: echoed twice (LocationError text and "(got ...)")
    f"datastores:\n  t:\n    url: DefaultEndpointsProtocol=https;AccountName=a;AccountKey={SECRET}\n",
])
def test_bad_datastores_file_never_echoes_a_secret(tmp_path, body):
    """The error is shown by `raybatch datastores`, GET /datastores and the server's
    SystemExit at start (server/main.py:57-58)."""
    f = tmp_path / "datastores.yaml"
    f.write_text(body)
    with pytest.raises(SpecError) as err:
        Datastores.load(f)
    assert SECRET not in str(err.value), str(err.value)


def _app(tmp_path: Path, datastores: Datastores | None = None):
    from fastapi.testclient import TestClient

    from raybatch.scheduler.loop import Scheduler
    from raybatch.server.app import ServerContext, create_app
    from raybatch.state.store import Store
    from tests.test_scheduler_loop import FakeCluster

    store = Store(tmp_path / "db.sqlite")
    sched = Scheduler(store, FakeLauncher(), FakeCluster(1))
    (tmp_path / "code").mkdir(exist_ok=True)
    ctx = ServerContext(store=store, scheduler=sched, jobs_root=str(tmp_path / "jobs"),
                        code_root=tmp_path / "code", datastores=lambda: datastores or Datastores())
    client = TestClient(create_app(ctx, "tok"))
    client.headers["Authorization"] = "Bearer tok"
    client.store = store
    return client


def test_files_api_does_not_serve_server_files_named_by_an_output_path(tmp_path):
    """A datastore credential read from {file: ...} lives on the server's machine. Any
    API user can name that directory as an output and read the key through the server:
    nothing restricts a local output path, and the job does not even have to run."""
    keys = tmp_path / "etc-raybatch"
    keys.mkdir()
    (keys / "training.key").write_text(SECRET)
    client = _app(tmp_path)
    r = client.post("/api/v1/jobs", json={"spec": {"name": "x", "command": "true",
                                                    "outputs": {"o": {"path": str(keys)}}}})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    listing = client.get(f"/api/v1/jobs/{job}/files", params={"path": "outputs/o"}).json()
    content = client.get(f"/api/v1/jobs/{job}/files/content", params={"path": "outputs/o/training.key"})
    assert SECRET not in content.text, (listing, content.text)


# ---- 2. data loss -------------------------------------------------------------------------
def test_restored_checkpoint_on_a_second_node_does_not_overwrite_a_newer_one(tmp_path):
    """2-node job, blob checkpoints, second attempt: prepare() restores the checkpoint
    dir on EVERY node and start_ranks gives EVERY node's first rank a DirSync of it
    (driver.py:322-325) with nothing marked as already sent. Node 1 (rank 0 writes the
    checkpoints) re-uploads its stale restored copy over rank 0's newer one."""
    remote = local(tmp_path / "blob-checkpoints")
    seed = tmp_path / "seed"
    seed.write_text("epoch 6")
    remote.upload(seed, "state.txt")                     # what attempt 1 left
    nodes = [tmp_path / f"node-{k}" / "checkpoints" for k in (0, 1)]
    for d in nodes:                                     # RankActor.prepare on each node
        d.mkdir(parents=True)
        download_tree(remote, d)
    syncs = [DirSync(d, remote) for d in nodes]         # RankActor.start_sync on each node
    (nodes[0] / "state.txt").write_text("epoch 9")      # rank 0 (node 0) makes progress
    syncs[0].push()
    syncs[1].push()                                     # node 1's first interval / final pass
    assert (tmp_path / "blob-checkpoints" / "state.txt").read_text() == "epoch 9"


def test_restored_checkpoints_are_not_uploaded_again(tmp_path):
    """Every restart re-uploads the whole restored checkpoint dir from every node."""
    class Counting(LocalBackend):
        uploads: list[str] = []

        def upload(self, src, rel):
            self.uploads.append(rel)
            super().upload(src, rel)

    remote = Counting(Access("local", str(tmp_path / "r"), uri=str(tmp_path / "r")))
    src = tmp_path / "big"
    src.write_bytes(b"x" * 1000)
    remote.upload(src, "ckpt-100.pt")
    Counting.uploads.clear()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    download_tree(remote, mirror)
    DirSync(mirror, remote).push()
    assert Counting.uploads == []


class FakeRef:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn


class FakeRay:
    """Just enough of `ray` for Attempt's storage steps: remote calls run inline."""

    @staticmethod
    def get(ref, timeout=None):
        if isinstance(ref, list):
            return [FakeRay.get(r) for r in ref]
        return ref.fn()

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return list(refs), []

    @staticmethod
    def kill(_actor):
        pass


class FakeActor:
    def __init__(self, **methods: Callable[..., Any]):
        self.methods = methods
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        outer = self

        class Method:
            @staticmethod
            def remote(*args, **kw):
                outer.calls.append((name, args))
                fn = outer.methods.get(name, lambda *a, **k: None)
                return FakeRef(lambda: fn(*args, **kw))
        return Method


def make_attempt(tmp_path: Path, monkeypatch, spec: dict, job_dir: str,
                 datastores: Datastores | None = None) -> driver_mod.Attempt:
    for module in (driver_mod, gang_mod, setup_mod, watch_mod):
        monkeypatch.setattr(module, "ray", FakeRay)
    js = JobSpec.model_validate({"name": "j", "command": "true", **spec})
    storage = resolve_attempt(js, job_dir, datastores or Datastores())
    ctl = tmp_path / "ctl"
    ctl.mkdir(exist_ok=True)
    (ctl / "attempt.json").write_text(json.dumps({
        "job_id": "job1", "attempt": 1, "spec": js.model_dump(mode="json"), "job_dir": job_dir,
        "control_dir": str(ctl), "storage": storage.to_dict(secrets=False), "cache_dir": str(tmp_path / "cache")}))
    return driver_mod.Attempt(str(ctl / "attempt.json"))


def blob_store(tmp_path: Path, monkeypatch) -> Datastores:
    monkeypatch.setenv("RB_REVIEW_KEY", SECRET)
    f = tmp_path / "ds.yaml"
    f.write_text("datastores:\n  res:\n    url: az://results\n    account: acct1\n"
                 "    credential: {account_key: {env: RB_REVIEW_KEY}}\n")
    return Datastores.load(f)


def test_a_failed_final_sync_call_is_not_taken_for_everything_out(tmp_path, monkeypatch):
    """processes_per_node 2, blob outputs. The actor holding the node's DirSync (local
    rank 0) dies during finish_sync (OOM-killed, segfault in the SDK) while its node is
    fine. final_sync() `continue`s on any RayError (driver.py:424-425): it reports
    nothing missing, the attempt SUCCEEDS, and cleanup() has local rank 1 on the same
    node delete the mirror, the only copy of the outputs."""
    from ray.exceptions import RayActorError

    a = make_attempt(tmp_path, monkeypatch, {"processes_per_node": 2, "outputs": {"m": {}}},
                     "datastore://res/jobs/e/job1", blob_store(tmp_path, monkeypatch))
    assert a.storage.remote

    def died(_timeout):
        raise RayActorError()

    ok = {"unsynced": [], "error": None, "hostname": "h"}
    a.gang.actors = [FakeActor(finish_sync=died), FakeActor(finish_sync=lambda _t: ok)]
    a.ranks = [RankReport(rank=r, node_rank=0, local_rank=r, node_id="n0") for r in (0, 1)]
    a.launches = [SimpleNamespace(job_temp="/tmp/raybatch-jobs/job1/node-0")] * 2
    not_out = a.final_sync()
    a.cleanup()
    removed = [args[0] for act in a.gang.actors for name, args in act.calls if name == "remove_dir"]
    assert not_out is not None or str(a.dirs.mirror) not in removed, (not_out, removed)


def test_files_api_lists_and_downloads_dotfiles(tmp_path):
    """torch.distributed.checkpoint writes `.metadata` next to the shards; Hydra writes
    `.hydra/`. The files API drops every path with a dot segment (app.py:335), so
    `raybatch download JOB --path checkpoints` returns a checkpoint that cannot be loaded."""
    client = _app(tmp_path)
    r = client.post("/api/v1/jobs", json={"spec": {"name": "x", "command": "true"}})
    job = r.json()
    ckpt = Path(client.store.get_job(job["id"])["job_dir"]) / "checkpoints"
    (ckpt / "step-10").mkdir(parents=True)
    (ckpt / "step-10" / "__0_0.distcp").write_bytes(b"shard")
    (ckpt / "step-10" / ".metadata").write_bytes(b"meta")
    paths = [e["path"] for e in client.get(f"/api/v1/jobs/{job['id']}/files",
                                           params={"path": "checkpoints"}).json()]
    assert "checkpoints/step-10/.metadata" in paths, paths


def test_output_files_named_like_temp_files_are_uploaded(tmp_path):
    """DirSync skips every name ending in '.download' (sync.py:218): such an output is
    never uploaded, never reported as pending, and the mirror is then deleted."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "dataset.download").write_text("the user's file")
    d = DirSync(mirror, local(tmp_path / "remote"))
    assert d.push() == 0 and d.pending() == []
    assert (tmp_path / "remote" / "dataset.download").exists()


def test_one_rejected_file_does_not_block_the_others(tmp_path):
    """A non-transient error on one file (sync.py:240-241) aborts the whole directory
    pass, in every pass: files after it in walk order never go out."""
    class Rejects(LocalBackend):
        def upload(self, src, rel):
            if rel == "a-bad-name":
                raise StorageError(self.uri + "/" + rel, "400 InvalidBlobName", transient=False)
            super().upload(src, rel)

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("a-bad-name", "b.txt", "c.txt"):
        (mirror / name).write_text(name)
    remote = Rejects(Access("local", str(tmp_path / "r"), uri=str(tmp_path / "r")))
    d = DirSync(mirror, remote)
    with pytest.raises(StorageError):
        d.push()
    assert (tmp_path / "r" / "b.txt").exists() and (tmp_path / "r" / "c.txt").exists()


def test_staged_input_tree_is_protected_from_a_job_that_deletes_its_input(tmp_path):
    """The cached tree is shared by later jobs on the node and only its files are
    read-only: a job that cleans up its input dir (rmtree) empties the tree, and the next
    job on the node is handed the gutted tree ('.done' is still there)."""
    import shutil

    src = tmp_path / "dataset"
    src.mkdir()
    (src / "train.csv").write_text("1,2,3")
    cache = InputCache(tmp_path / "cache")
    first = cache.stage(local(src))
    shutil.rmtree(first.path, ignore_errors=True)   # job 1 frees its disk space
    second = cache.stage(local(src))
    assert (Path(second.path) / "train.csv").exists()


# ---- 3. outcomes and state ----------------------------------------------------------------
def test_transient_staging_error_is_retried(tmp_path):
    """One connection reset while staging a large input fails the stage at once
    (no retry in InputCache.stage / RankActor.prepare) ..."""
    class Flaky(LocalBackend):
        fails = 1

        def download(self, rel, dest, progress=None):
            if Flaky.fails:
                Flaky.fails -= 1
                raise StorageError(self.uri, "cannot reach ...: Connection reset", transient=True)
            super().download(rel, dest, progress)

    src = tmp_path / "ds"
    src.mkdir()
    (src / "f").write_text("x")
    InputCache(tmp_path / "cache").stage(Flaky(Access("local", str(src), uri=str(src))))


def test_start_failed_from_a_transient_staging_error_uses_the_infrastructure_budget(tmp_path):
    """... and when it outlasts the retries, the driver reports STORAGE_UNAVAILABLE (a
    blip after the locations were checked), which the infrastructure budget pays for."""
    store, launcher, sched = make(tmp_path)
    job = submit(store, retries={"infrastructure": 3})
    sched.cycle()
    launcher.reports[(job["id"], 1)] = {
        "phase": "done", "outcome": "STORAGE_UNAVAILABLE", "message":
        "staging on node 0: datastore://d/x: cannot reach https://a.blob.core.windows.net: "
        "Connection reset by peer", "ranks": []}
    sched.cycle()
    assert store.get_job(job["id"])["state"] != "FAILED"


@pytest.mark.parametrize("action", ["cancel", "preempt"])
def test_stop_keeps_the_drivers_list_of_files_not_uploaded(tmp_path, action):
    """The driver appends '; N file(s) not uploaded: ...; the local copies are kept at
    host:/tmp/raybatch-mirror/...' to a CANCELLED/PREEMPTED outcome (driver.py:503); the
    loop replaces the whole message (loop.py:208-213), so the user never learns it."""
    store, launcher, sched = make(tmp_path)
    job = submit(store)
    sched.cycle()
    field = "cancel_requested" if action == "cancel" else "preempt_requested"
    store.update_job(job["id"], **{field: time.time()})
    msg = ("cancelled by user; 1 file(s) not uploaded: datastore://r/out/x.bin; cause: 503; "
           "the local copies are kept at h1:/tmp/raybatch-mirror/j/attempt-1/node-0")
    launcher.reports[(job["id"], 1)] = {"phase": "done", "outcome": action.upper().replace(
        "CANCEL", "CANCELLED").replace("PREEMPT", "PREEMPTED"), "message": msg, "ranks": []}
    sched.cycle()
    assert "not uploaded" in (store.get_attempt(job["id"], 1)["reason"] or "")


class SecretsLauncher(FakeLauncher):
    def __init__(self):
        super().__init__()
        self.discarded: list[tuple[str, int]] = []
        self.missing = False

    def discard_secrets(self, job_id, attempt):
        self.discarded.append((job_id, attempt))

    def state(self, sid):
        return RayJobState("MISSING", True) if self.missing else RayJobState("RUNNING", False)


def test_secrets_file_is_discarded_when_the_submission_fails(tmp_path):
    """launcher.submit writes secrets.json before client.submit_job; when that fails,
    _start (loop.py:410-419) requeues without end_attempt: the key file stays on disk."""
    store, _, _ = make(tmp_path)
    from raybatch.scheduler.loop import Scheduler
    from tests.test_scheduler_loop import FakeCluster
    launcher = SecretsLauncher()
    sched = Scheduler(store, launcher, FakeCluster(2))
    job = submit(store)
    launcher.fail_next = 1
    sched.cycle()
    assert (job["id"], 1) in launcher.discarded


def test_secrets_file_is_discarded_when_the_ray_job_is_missing(tmp_path):
    """The 'never submitted' path (loop.py:191-202) requeues without end_attempt too."""
    store, _, _ = make(tmp_path)
    from raybatch.scheduler.loop import Scheduler
    from tests.test_scheduler_loop import FakeCluster
    launcher = SecretsLauncher()
    sched = Scheduler(store, launcher, FakeCluster(2))
    job = submit(store)
    sched.cycle()
    launcher.missing = True
    sched.cycle()  # attempt 1 ends START_FAILED 'never submitted'; attempt 2 starts
    assert store.get_attempt(job["id"], 1)["outcome"] == "START_FAILED"
    assert (job["id"], 1) in launcher.discarded


def test_job_dir_of_a_local_datastore_output_root_is_a_path(tmp_path, monkeypatch):
    """output_root: datastore://nfs/jobs where nfs is a mount (docs: 'define a datastore
    with url: /mnt/share and refer to it by name'). job_dir_for keeps the datastore URI
    (plan.py:185-191), so driver.py:284 decides the job dir is not local: the ranks get
    RAYBATCH_JOB_DIR=datastore://nfs/... and a node-local /tmp SHARED_JOB_TEMP."""
    share = tmp_path / "share"
    share.mkdir()
    f = tmp_path / "ds.yaml"
    f.write_text(f"datastores:\n  nfs:\n    url: {share}\n")
    stores = Datastores.load(f)
    job_dir = job_dir_for("datastore://nfs/jobs", "e", "job1")
    a = make_attempt(tmp_path, monkeypatch, {}, job_dir, stores)
    info = {"node_id": "n0", "node_ip": "127.0.0.1", "hostname": "h"}
    envs = []
    a.gang.actors = [FakeActor(node_info=lambda: info, free_port=lambda: 1234,
                               start=lambda argv, env, *rest: envs.append(env) or 1)]
    a.start_ranks()
    env = envs[0]
    assert not env["RAYBATCH_JOB_DIR"].startswith("datastore://"), env["RAYBATCH_JOB_DIR"]
    assert env["RAYBATCH_SHARED_JOB_TEMP"].startswith(str(share)), env["RAYBATCH_SHARED_JOB_TEMP"]


def test_a_gang_that_is_staging_is_not_subtracted_twice(tmp_path):
    """While a placed gang stages its inputs (phase 'staging', often minutes), _placed()
    (loop.py:50-56) says it is not placed: the scheduler subtracts its bundles from
    Ray's view a second time and keeps other jobs out of the free capacity."""
    from tests.test_scheduler_loop import TwoCpuNode

    store, launcher, sched = make(tmp_path, nodes=1)
    sched.cluster = TwoCpuNode()
    a = submit(store)  # 1 CPU
    sched.cycle()
    sched.cluster.nodes[0].available["CPU"] = 1.0   # its placement group holds 1 CPU
    launcher.reports[(a["id"], 1)] = {"phase": "staging", "at": time.time() - 5,
                                      "staging": {"bytes_done": 1, "bytes_total": 10}}
    b = submit(store)  # fits the 1 CPU left
    sched.cycle()
    assert store.get_job(b["id"])["state"] == "STARTING", sched.waiting.get(b["id"])


def test_every_blob_output_location_gets_its_own_write_check(tmp_path, monkeypatch):
    """check_storage dedups write checks by (endpoint, container, credential kind)
    only (driver.py:150): an output in another directory (ADLS ACLs, a directory SAS)
    or through another datastore with another secret on the same container is never
    write-checked, and fails only at the first upload, after the run."""
    monkeypatch.setenv("RB_REVIEW_KEY", SECRET)
    monkeypatch.setenv("RB_REVIEW_RO_SAS", "sv=1&sp=r&sig=x")
    f = tmp_path / "ds.yaml"
    f.write_text("datastores:\n"
                 "  res:\n    url: az://results\n    account: acct1\n"
                 "    credential: {account_key: {env: RB_REVIEW_KEY}}\n"
                 "  res-ro:\n    url: az://results/shared\n    account: acct1\n"
                 "    credential: {account_key: {env: RB_REVIEW_RO_SAS}}\n")
    stores = Datastores.load(f)
    a = make_attempt(tmp_path, monkeypatch, {"outputs": {"o": {"path": "datastore://res-ro/preds"}}},
                     "datastore://res/jobs/e/job1", stores)
    a.storage = resolve_attempt(a.spec, "datastore://res/jobs/e/job1", stores)  # with secrets
    checked = []

    class Probe:
        def __init__(self, access):
            self.access = access

        def check(self, write):
            checked.append((self.access.path, self.access.secret))

        def list(self, rel=""):
            return []

    monkeypatch.setattr(setup_mod, "open_backend", Probe)
    assert a.check_storage() is None
    assert ("shared/preds", "sv=1&sp=r&sig=x") in checked, checked


def test_a_day_of_live_logs_fits_in_one_append_blob(tmp_path):
    """An append blob holds at most 50,000 blocks (Azure; Azurite enforces it too:
    MAX_APPEND_BLOB_BLOCK_COUNT). BlobBackend.append writes one block per call and
    LogSync calls it every second that the rank printed something (tqdm, a step log).
    After ~13.9 h every append fails with 409 BlockCountExceedsLimit, which classify()
    marks non-transient: live logs stop, the final pass cannot finish the log, and a
    training run that exited 0 after 20 h ends UPLOAD_FAILED -> FAILED."""
    from raybatch.storage.sync import LogSync

    class Blocks(Backend):
        access = Access("blob", "x", uri="az://c/x")
        blocks = 0

        def append(self, rel, data, offset):
            Blocks.blocks += 1

    log = tmp_path / "stdout.txt"
    sync = LogSync(log, Blocks(), "attempt-1/rank-0/stdout.txt")
    with open(log, "ab", buffering=0) as f:
        for second in range(24 * 3600):          # one line a second for a day, one push a second
            f.write(b"step %d loss 0.1\n" % second)
            sync.push()
    assert Blocks.blocks <= 50_000, Blocks.blocks
