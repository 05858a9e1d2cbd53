"""Autoscaling demand computed from the queue. The request goes to a recording
function here; the end-to-end test with Ray's fake_multinode autoscaler is in
test_autoscale_e2e.py."""

from __future__ import annotations

import pytest

from raybatch.scheduler import fit
from raybatch.scheduler.autoscale import Demand, NodeTypes
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.policy import Job

CONFIG = {
    "max_workers": 4,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 1}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 3},
        "spot": {"resources": {"CPU": 2}, "labels": {fit.LOW_PRIORITY_LABEL: "true"}, "max_workers": 2},
    },
}


def head_only() -> list[NodeView]:
    total = {"CPU": 1.0, "memory": 2e9, "object_store_memory": 1e9, "node:__internal_head__": 1.0}
    return [NodeView("head0", available=dict(total), total=dict(total), node_type="head")]


def job(jid: str, count: int, cpus: float = 1, **kw) -> Job:
    return Job(jid, 500, 1, {"CPU": float(cpus)}, count=count, **kw)


def make():
    sent: list[list[dict]] = []
    return Demand(NodeTypes.from_config(CONFIG), send=sent.append), sent


def test_a_spread_gang_asks_for_whole_nodes():
    demand, sent = make()
    demand.update(head_only(), [job("j", 2, cpus=2)])
    assert demand.to_add == {"cpu": 2} and demand.for_jobs == ["j"]
    # the live head's capacity, then one whole node per node to add (so 2 distinct nodes)
    assert sent == [[{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 2.0}]]


def test_the_request_is_sent_once_and_withdrawn_when_no_longer_needed():
    demand, sent = make()
    demand.update(head_only(), [job("j", 2, cpus=2)])
    demand.update(head_only(), [job("j", 2, cpus=2)])
    assert len(sent) == 1
    demand.update(head_only(), [])
    assert sent[-1] == [] and demand.to_add == {}
    assert "no request" in demand.info()["summary"]


def test_free_live_nodes_are_used_before_new_ones():
    demand, sent = make()
    demand.update(head_only(), [job("half-on-head", 2)])
    assert demand.to_add == {"cpu": 1}  # one bundle on the head's free CPU, one on a new node


def test_global_max_workers_caps_the_largest_cluster():
    types = NodeTypes.from_config(CONFIG)
    live, new, room = types.largest(head_only())
    assert len(new) == 5 and room == 4  # 3 cpu + 2 spot offered; 4 workers at most
    demand, _ = make()
    assert demand.never_fits(job("j", 4, cpus=2), head_only()) is None
    why = demand.never_fits(job("j", 5, cpus=2), head_only())
    assert "needs 5 nodes with 2 CPU" in why and "largest cluster" in why


def test_low_priority_jobs_get_spot_nodes_and_others_do_not():
    demand, _ = make()
    demand.update(head_only(), [job("spot-job", 2, cpus=2, low_priority_nodes="require")])
    assert demand.to_add == {"spot": 2}
    demand.update(head_only(), [job("no-spot", 3, cpus=2, low_priority_nodes="avoid")])
    assert demand.to_add == {"cpu": 3}


def test_queued_jobs_share_the_new_nodes_in_queue_order():
    demand, _ = make()
    demand.update(head_only(), [job("a", 2, cpus=2), job("b", 1, cpus=2), job("c", 3, cpus=2)])
    # a and b take 3 new nodes; c (3 more) would exceed max_workers 4
    assert sum(demand.to_add.values()) == 3
    assert demand.for_jobs == ["a", "b"]


def test_existing_workers_count_against_max_workers():
    nodes = head_only() + [NodeView(f"w{i}", available={"CPU": 0.0}, total={"CPU": 2.0}, node_type="cpu")
                           for i in range(3)]
    live, new, room = NodeTypes.from_config(CONFIG).largest(nodes)
    assert [n.node_type for n in new] == ["spot", "spot"] and room == 1  # cpu is at its 3


def test_node_types_must_say_their_resources():
    with pytest.raises(ValueError, match=r"available_node_types.cpu.resources: required"):
        NodeTypes.from_config({"available_node_types": {"cpu": {"max_workers": 2}}})
    with pytest.raises(ValueError, match="available_node_types: required"):
        NodeTypes.from_config({})


def test_a_failed_request_is_retried_next_cycle():
    calls = []

    def flaky(bundles):
        calls.append(bundles)
        if len(calls) == 1:
            raise ConnectionError("GCS unavailable")

    demand = Demand(NodeTypes.from_config(CONFIG), send=flaky)
    demand.update(head_only(), [job("j", 1, cpus=2)])
    assert "GCS unavailable" in demand.info()["summary"]
    demand.update(head_only(), [job("j", 1, cpus=2)])
    assert len(calls) == 2 and demand.error is None


def test_live_nodes_are_kept_while_an_admitted_gang_is_being_placed():
    demand, sent = make()
    workers = [NodeView(f"w{i}", available={"CPU": 2.0}, total={"CPU": 2.0}, node_type="cpu")
               for i in range(2)]
    demand.update(head_only() + workers, [], starting=True)
    assert sent == [[{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 2.0}]]
    assert "keeping the live nodes" in demand.info()["summary"]
    demand.update(head_only() + workers, [], starting=False)
    assert sent[-1] == []
