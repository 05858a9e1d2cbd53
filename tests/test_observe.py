"""The pure parts of issue #20's small items: the submit warning for a job no live node can
hold (the queue's words), and `raybatch tensorboard`'s event-file mirror (what it fetches,
where it puts it, and that a grown file is appended in place)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raybatch.cli import tensorboard as tb
from raybatch.models import FileEntry, JobSummary
from raybatch.scheduler import policy
from raybatch.scheduler.fit import LOW_PRIORITY_LABEL, NodeView
from raybatch.server.submit_warnings import SubmitWarnings, never_on_live_nodes
from raybatch.spec.job import JobSpec


def spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "command": "true", "resources": {"cpus": 1}, **fields})


def nodes(n: int, cpus: float = 1, free: float | None = None, **kw) -> list[NodeView]:
    return [NodeView(f"n{i}", total={"CPU": cpus}, available={"CPU": cpus if free is None else free}, **kw)
            for i in range(n)]


def queue_reason(s: JobSpec, live: list[NodeView]) -> str:
    """What `raybatch queue` says for this job when it is alone in the queue."""
    job = policy.job_from_spec("j1", 1, s)
    return policy.plan(time.time(), live, [], [job]).waiting["j1"]


@pytest.mark.parametrize("fields, words", [
    ({"resources": {"cpus": 64}}, "needs 1 node with 64 CPU free; 0 such nodes are free now "
                                  "and only 0 of the 2 live nodes could ever hold one"),
    ({"nodes": 5}, "needs 5 nodes with 1 CPU free; 2 such nodes are free now "
                   "and only 2 of the 2 live nodes could ever hold one"),
    ({"low_priority_nodes": "require"}, "(low-priority nodes: require)"),
])
def test_a_job_no_live_node_can_hold_is_named_in_the_queues_words(fields, words):
    s, live = spec(**fields), nodes(2)
    reason = never_on_live_nodes(s, live)
    assert reason is not None and words in reason
    assert reason == queue_reason(s, live)  # submit and `raybatch queue` say the same


def test_a_job_that_fits_idle_nodes_is_not_warned_about_even_when_they_are_busy():
    assert never_on_live_nodes(spec(nodes=2), nodes(2)) is None
    assert never_on_live_nodes(spec(nodes=2), nodes(2, free=0)) is None  # busy now: it waits, not never
    spot = nodes(1, labels={LOW_PRIORITY_LABEL: "true"})
    assert never_on_live_nodes(spec(low_priority_nodes="require"), spot) is None
    dead = [NodeView("d", total={"CPU": 64}, available={"CPU": 64}, alive=False)]
    assert never_on_live_nodes(spec(resources={"cpus": 64}), dead) is not None  # a dead node holds nothing


class FakeCluster:
    def __init__(self, live):
        self.live, self.reads = live, 0

    def snapshot(self):
        self.reads += 1
        return self.live


class FakeScheduler:
    def __init__(self, live, age: float | None, autoscaler=None):
        self.cluster = FakeCluster(live)
        self.last_inputs = None if age is None else (time.time() - age, live, [])
        self.autoscaler = autoscaler


def test_submit_warnings_use_the_cycles_view_and_read_the_cluster_only_when_it_is_stale():
    w = SubmitWarnings()
    fresh = FakeScheduler(nodes(2), age=0.1)
    out = w.for_specs(fresh, [spec(resources={"cpus": 64}), spec(), spec(nodes=5)])
    assert [len(x) for x in out] == [1, 0, 1]
    assert "only 0 of the 2 live nodes could ever hold one" in out[0][0]
    assert fresh.cluster.reads == 0  # the scheduler's cached view: no GCS call per submission
    stale = FakeScheduler(nodes(2), age=60)
    assert w.for_specs(stale, [spec(nodes=5)])[0] and stale.cluster.reads == 1
    never_seen = FakeScheduler(nodes(2), age=None)
    assert w.for_specs(never_seen, [spec()]) == [[]] and never_seen.cluster.reads == 1


def test_no_warning_when_the_autoscalers_node_types_can_hold_it():
    from raybatch.scheduler import policy as pol
    from raybatch.scheduler.autoscale import Demand, NodeTypes

    types = NodeTypes.from_config({"max_workers": 4, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 1}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 3}}})
    demand = Demand(types, send=lambda _: None)
    head = [NodeView("head0", total={"CPU": 1}, available={"CPU": 1}, node_type="head")]
    wide = spec(nodes=3, resources={"cpus": 2})
    assert never_on_live_nodes(wide, head) is not None          # the head alone cannot hold it,
    assert demand.never_fits(pol.job_from_spec("x", 0, wide), head) is None  # the node types can:
    s = FakeScheduler(head, age=0.1, autoscaler=demand)
    assert SubmitWarnings().for_specs(s, [wide]) == [[]]          # so it is no 'never'
    # one even the largest cluster cannot hold is refused at submit (Scheduler.never_runs)
    assert demand.never_fits(pol.job_from_spec("x", 0, spec(resources={"cpus": 8})), head)


def test_the_memo_is_per_view():
    w = SubmitWarnings()
    s = FakeScheduler(nodes(2), age=0.1)
    assert w.for_specs(s, [spec(nodes=3)])[0]
    s.last_inputs = (time.time(), nodes(3), [])  # the next cycle sees a third node
    assert w.for_specs(s, [spec(nodes=3)]) == [[]]


# ---- raybatch tensorboard ---------------------------------------------------------------

def summary(**kw) -> JobSummary:
    base = dict(id="rb-1a2b3c4d", name="train", experiment="e", priority=0, state="SUCCEEDED", attempt=1,
                submitted_at=0.0, nodes=1, job_dir="/x")
    return JobSummary(**{**base, **kw})


def entry(path: str, size: int, location: str = "az://c/p") -> FileEntry:
    return FileEntry(path=path, size=size, modified=0.0, location=location)


def test_event_files_and_run_names():
    assert tb.is_event_file("outputs/tb/train/events.out.tfevents.1700000000.host.1.0")
    assert not tb.is_event_file("outputs/tb/events.txt")
    assert not tb.is_event_file("outputs/events.out.tfevents/model.pt")
    assert tb.run_name(summary(name="resnet 50/a:b")) == "resnet_50_a_b-rb-1a2b3c4d"


def test_cache_paths_never_leave_the_cache(tmp_path):
    assert tb.cache_file(tmp_path, "r", "outputs/tb/e") == tmp_path / "r" / "outputs" / "tb" / "e"
    for bad in ("../x", "outputs/../../x", "/etc/x", ""):
        assert tb.cache_file(tmp_path, "r", bad) is None


def test_pending_fetches_new_and_grown_event_files_only(tmp_path):
    have = tmp_path / "r" / "outputs" / "tb"
    have.mkdir(parents=True)
    (have / "events.out.tfevents.1").write_bytes(b"x" * 10)
    (have / "events.out.tfevents.2").write_bytes(b"x" * 10)
    (have / "events.out.tfevents.3").write_bytes(b"x" * 10)
    todo = tb.pending("j", "r", [
        entry("outputs/tb/events.out.tfevents.1", 10),    # complete
        entry("outputs/tb/events.out.tfevents.2", 25),    # grew
        entry("outputs/tb/events.out.tfevents.3", 4),     # rewritten shorter
        entry("outputs/tb/events.out.tfevents.4", 7),     # new
        entry("outputs/tb/model.pt", 99),                 # not an event file
        entry("../escape/events.out.tfevents.5", 1),      # outside the cache
    ], tmp_path)
    got = {p.entry.path.rsplit(".", 1)[-1]: (p.offset, p.missing, p.rewrite) for p in todo}
    assert got == {"2": (10, 15, False), "3": (0, 4, True), "4": (0, 7, False)}


class FakeClient:
    """The two calls the mirror makes per job, over files in a directory that stands for
    remote storage (locations are az:// URIs: read through ``download`` only)."""

    def __init__(self, root: Path, job: JobSummary):
        self.root, self.job, self.downloads = root, job, 0

    def get(self, job_id):
        return self.job

    def files(self, job_id, path=""):
        return [entry(str(p.relative_to(self.root)), p.stat().st_size, f"az://c/{p.relative_to(self.root)}")
                for p in sorted(self.root.rglob("*")) if p.is_file()]

    def download(self, job_id, dest, path):
        self.downloads += 1
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(path).name
        out.write_bytes((self.root / path).read_bytes())
        return [out]


def test_a_grown_event_file_is_appended_to_the_same_file(tmp_path):
    remote = tmp_path / "remote"
    (remote / "outputs" / "tb").mkdir(parents=True)
    src = remote / "outputs" / "tb" / "events.out.tfevents.1"
    src.write_bytes(b"first record|")
    (remote / "stdouterr").mkdir()
    (remote / "stdouterr" / "stdout.txt").write_text("not an event file")
    job = summary(state="RUNNING")
    client = FakeClient(remote, job)
    mirror = tb.EventMirror(client, tmp_path / "cache", job=job)
    tb._first_sync(mirror)  # what the command does first: with a progress bar
    copy = tmp_path / "cache" / tb.run_name(job) / "outputs" / "tb" / "events.out.tfevents.1"
    assert copy.read_bytes() == b"first record|" and mirror.files == 1
    inode = os.stat(copy).st_ino
    with open(src, "ab") as f:
        f.write(b"second record|")
    assert mirror.sync() == len(b"second record|")
    assert copy.read_bytes() == src.read_bytes()
    assert os.stat(copy).st_ino == inode  # TensorBoard's open handle reads on
    assert mirror.sync() == 0 and client.downloads == 2
    client.job = summary(state="SUCCEEDED")
    mirror.sync()  # final now: one more pass, then the job is never listed again
    assert job.id in mirror.done
    src.write_bytes(src.read_bytes() + b"late")
    assert mirror.sync() == 0


def test_a_file_the_server_stores_at_a_local_path_is_read_here(tmp_path):
    f = tmp_path / "events.out.tfevents.1"
    f.write_bytes(b"0123456789")
    assert tb.read_local(str(f), 4, 10) == b"456789"
    assert tb.read_local(str(f), 0, 11) is None      # not the file the server listed
    assert tb.read_local("az://c/events", 0, 1) is None
    assert tb.read_local("relative/path", 0, 1) is None


def test_without_tensorboard_the_command_says_how_to_install_it(monkeypatch):
    from raybatch.cli.main import app

    monkeypatch.setattr(tb, "tensorboard_installed", lambda: False)
    result = CliRunner().invoke(app, ["tensorboard", "rb-00000000"])
    assert result.exit_code == 1
    assert "pip install tensorboard" in result.output
