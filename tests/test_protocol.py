"""The launcher -> driver -> server protocol (raybatch.runtime.protocol): its models
survive a round trip through their files, and every phase the driver can report is
handled by the scheduler loop, shown by the API and drawn by the CLI. No Ray."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from raybatch.runtime.protocol import (
    AttemptFile, CodeRef, Control, ControlDir, Phase, RankReport, Report, Staging,
)
from raybatch.spec.job import JobSpec
from raybatch.state.states import AttemptOutcome
from tests.test_scheduler_loop import FakeCluster, FakeLauncher

RUNTIME = Path(__file__).resolve().parents[1] / "raybatch" / "runtime"


def test_attempt_file_round_trip(tmp_path):
    spec = JobSpec.model_validate({"name": "j", "command": "python train.py", "nodes": 2,
                                   "environment": {"LR": "0.1"}, "outputs": {"model": {}}})
    ctl = ControlDir.of(tmp_path, "rb-1", 3)
    original = AttemptFile(job_id="rb-1", attempt=3, spec=spec, job_dir="/jobs/e/rb-1", control_dir=str(ctl.path),
                           nodes=["n0", "n1"], storage={"logs": {"kind": "local"}}, cache_dir="/c",
                           ray_address="127.0.0.1:6379", code=CodeRef(sha="ab" * 32, dir="/code/x", zip="/code/x.zip"),
                           storage_check_s=6, final_sync_timeout_s=25, placement_timeout_s=60)
    ctl.attempt.parent.mkdir(parents=True)
    ctl.attempt.write_text(original.model_dump_json())
    assert ctl.read_attempt() == original
    assert ctl.read_attempt().spec.environment == {"LR": "0.1"}


def test_report_and_control_round_trip(tmp_path):
    ctl = ControlDir.of(tmp_path, "rb-1", 1)
    assert ctl.read_report() is None and ctl.read_control() is None
    ranks = [RankReport(rank=r, node_rank=r, local_rank=0, role="rank", node_id=f"n{r}", node_ip="10.0.0.1",
                        hostname="h", pid=100 + r, exit_code=None) for r in (0, 1)]
    for report in (
        Report(phase=Phase.STAGING, at=time.time(), pid=7, ranks=[],
               staging=Staging(bytes_done=5, bytes_total=10, nodes_left=1, seconds=1.5)),
        Report(phase=Phase.STOPPING, at=1.0, ranks=ranks, reason="rank 1 exited with code 2"),
        Report(phase=Phase.SYNCING, at=2.0, ranks=ranks, nodes_left=2),
        Report(phase=Phase.DONE, at=3.0, ranks=ranks, outcome=AttemptOutcome.UPLOAD_FAILED, exit_code=None,
               message="1 file(s) not uploaded", lost_nodes=["n1"], unsynced=["az://c/x (3 bytes)"]),
    ):
        ctl.write_report(report)
        assert ctl.read_report() == report
    ctl.write_control(Control(action="preempt", reason="preempted by rb-2"))
    back = ctl.read_control()
    assert back.action == "preempt" and back.reason == "preempted by rb-2" and back.at > 0
    # nothing half-written is ever read: the temp files of the atomic writes are gone
    assert sorted(p.name for p in ctl.path.iterdir()) == ["control.json", "status.json"]


def phases_the_driver_reports() -> set[str]:
    """Every ``Phase.X`` the runtime passes to a report: scanned from the source, so a
    phase added there without a member (or a handler) fails here."""
    found = set()
    for f in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "report":
                for arg in node.args[:1]:
                    if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "Phase":
                        found.add(arg.attr)
    return found


def test_the_driver_reports_only_protocol_phases_and_all_of_them():
    reported = phases_the_driver_reports()
    assert reported <= set(Phase.__members__), reported - set(Phase.__members__)
    assert reported == set(Phase.__members__), f"phases never reported: {set(Phase.__members__) - reported}"


def _server(tmp_path):
    from fastapi.testclient import TestClient

    from raybatch.scheduler.loop import Scheduler
    from raybatch.server.app import ServerContext, create_app
    from raybatch.state.store import Store
    from raybatch.storage.datastores import Datastores

    store = Store(tmp_path / "db.sqlite")
    launcher = FakeLauncher()
    sched = Scheduler(store, launcher, FakeCluster(2))
    (tmp_path / "code").mkdir()
    ctx = ServerContext(store=store, scheduler=sched, jobs_root=str(tmp_path / "jobs"),
                        code_root=tmp_path / "code", datastores=Datastores)
    http = TestClient(create_app(ctx, "tok"))
    http.headers["Authorization"] = "Bearer tok"
    return http, store, launcher, sched


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_is_handled_by_the_loop_and_shown_by_the_api_and_cli(tmp_path, phase):
    from raybatch.cli import main as cli_main
    from raybatch.cli import render
    from raybatch.models import JobDetail

    http, store, launcher, sched = _server(tmp_path)
    job = http.post("/api/v1/jobs", json={"spec": {"name": "j", "command": "true", "nodes": 2}}).json()
    sched.cycle()
    assert store.get_job(job["id"])["state"] == "STARTING"
    ranks = [RankReport(rank=r, node_rank=r, local_rank=0, node_id=f"node{r}", pid=10 + r) for r in (0, 1)]
    report = Report(phase=phase, at=time.time() - 10, ranks=ranks,
                    staging=Staging(bytes_done=1, bytes_total=4) if phase is Phase.STAGING else None,
                    outcome=AttemptOutcome.SUCCEEDED if phase is Phase.DONE else None,
                    exit_code=0 if phase is Phase.DONE else None)
    launcher.reports[(job["id"], 1)] = report.model_dump(mode="json", exclude_none=True)

    shown = JobDetail.model_validate(http.get(f"/api/v1/jobs/{job['id']}").json())
    assert shown.phase is phase
    assert (shown.staging is not None) == (phase is Phase.STAGING)
    render.show_job(shown)                                     # `raybatch show`
    line = cli_main._progress_line(shown, time.monotonic()).plain  # `submit --wait`
    assert (phase.value in line) == (phase is not Phase.DONE), line

    sched.cycle()
    state = store.get_job(job["id"])["state"]
    if phase is Phase.DONE:
        assert state == "SUCCEEDED"
    elif phase.ranks_started:
        assert state == "RUNNING"
    else:
        assert state == "STARTING"
    # a gang that holds its placement group is not subtracted from Ray's view again
    assert (job["id"] in {j["id"] for j in sched._unplaced}) == (not phase.gang_placed and phase is not Phase.DONE)
