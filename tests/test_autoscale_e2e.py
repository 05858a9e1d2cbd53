"""Autoscaling driven by the queue, end to end, with Ray's own autoscaler and its
fake_multinode provider (worker "nodes" are raylets started on this machine by
the autoscaler's monitor): a queued 2-node job makes the server ask for exactly
two nodes; they are added, the job runs on them; the request is withdrawn and
the idle nodes are removed. A job larger than the cluster can ever be is
rejected at submit."""

from __future__ import annotations

import pytest

from raybatch.client import RaybatchError
from raybatch.config import ray_client_env
from tests.conftest import ServerProcess, wait_for
from tests.fake_autoscaling import FakeAutoscalingCluster

pytestmark = pytest.mark.timeout(300)

WORKERS = {"cpu2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2}}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    ray_client_env()
    # v1: what `ray start` runs by default in Ray 2.60 (the server writes v2's channel too)
    c = FakeAutoscalingCluster({"CPU": 1}, WORKERS, idle_timeout_minutes=0.1, max_workers=2,
                               dashboard=True).start()
    yield c
    c.stop()  # exactly this cluster's processes, the monitor's fake nodes included


@pytest.fixture(scope="module")
def autoscaling_server(autoscaling_cluster, tmp_path_factory):
    s = ServerProcess(autoscaling_cluster, tmp_path_factory.mktemp("as-server"),
                      extra_args=("--cluster-config", autoscaling_cluster.config_path)).start()
    yield s
    s.stop()


def _workers(cluster) -> list:
    return [n for n in cluster.alive_nodes() if n.ray_node_type_name == "cpu2"]


def test_queue_drives_scale_up_and_idle_nodes_go(autoscaling_cluster, autoscaling_server):
    client = autoscaling_server.client()
    assert _workers(autoscaling_cluster) == []
    with pytest.raises(RaybatchError, match=r"can never run: needs 3 nodes with 2 CPU"):
        client.submit({"name": "too-big", "nodes": 3, "resources": {"cpus": 2}, "command": "true"})
    job = client.submit({"name": "grows", "nodes": 2, "resources": {"cpus": 2},
                         "command": 'echo "rank $RANK on $RAYBATCH_NODE_RANK"; sleep 1'})
    assert client.get(job.id).state.value == "QUEUED"
    info = wait_for(lambda: client.scheduler().autoscaler["to_add"] == {"cpu2": 2} and client.scheduler(),
                    30, "the demand for 2 cpu2 nodes")
    assert info.autoscaler["for_jobs"] == [job.id]
    done = client.wait(job.id, timeout=180)
    assert done.state == "SUCCEEDED", done.reason
    worker_ids = {n.node_id.hex() for n in _workers(autoscaling_cluster)} or None
    ranks = done.attempts[-1].ranks
    assert len({r.node_id for r in ranks}) == 2
    if worker_ids:  # (they may already be gone again)
        assert {r.node_id for r in ranks} <= worker_ids
    # nothing waits any more: the request is withdrawn and the idle nodes are removed
    wait_for(lambda: client.scheduler().autoscaler["to_add"] == {}, 30, "the request to be withdrawn")
    wait_for(lambda: not _workers(autoscaling_cluster), 120, "idle workers to be removed")
    client.close()
