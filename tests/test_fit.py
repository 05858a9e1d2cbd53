"""Unit tests of the gang-fit policy (raybatch.scheduler.fit): pure functions over a
snapshot of nodes, no Ray."""

from __future__ import annotations

import copy


from raybatch.scheduler.fit import NodeView, could_ever_fit, fits, gang_fit, reserve, why_not

GiB = float(2**30)


def node(node_id: str, free: dict | float, total: dict | float | None = None, alive: bool = True) -> NodeView:
    if not isinstance(free, dict):
        free = {"CPU": float(free)}
    if total is None:
        total = dict(free)
    elif not isinstance(total, dict):
        total = {"CPU": float(total)}
    return NodeView(node_id, ip=f"10.0.0.{len(node_id)}", available=dict(free), total=dict(total),
                    alive=alive)


# ---- node by node, never by sum -----------------------------------------------------

def test_free_cpus_are_not_summed_across_nodes():
    nodes = [node("a", 1), node("b", 1)]
    assert gang_fit(nodes, {"CPU": 2}, 1) is None
    assert gang_fit(nodes, {"CPU": 2}, 1, "pack") is None
    msg = why_not(nodes, {"CPU": 2}, 1, "spread")
    assert msg.startswith("needs 1 node with 2 CPU free; 0 such nodes are free now")


def test_one_node_with_enough_fits():
    nodes = [node("a", 1), node("b", 2)]
    assert gang_fit(nodes, {"CPU": 2}, 1) == ["b"]


def test_exact_fit_and_fractional_cpus():
    assert gang_fit([node("a", 0.3)], {"CPU": 0.1 + 0.2}, 1) == ["a"]  # 0.30000000000000004
    assert gang_fit([node("a", 0.5)], {"CPU": 0.25}, 2, "pack") == ["a", "a"]
    assert gang_fit([node("a", 0.5)], {"CPU": 0.25}, 3, "pack") is None


# ---- spread and pack ---------------------------------------------------------------------

def test_spread_needs_distinct_nodes():
    nodes = [node("a", 4), node("b", 4)]
    assert gang_fit(nodes, {"CPU": 1}, 3, "spread") is None
    placed = gang_fit(nodes, {"CPU": 1}, 2, "spread")
    assert sorted(placed) == ["a", "b"]


def test_spread_over_many_nodes_uses_each_once():
    nodes = [node(f"n{i}", 2) for i in range(5)]
    placed = gang_fit(nodes, {"CPU": 2}, 5)
    assert sorted(placed) == [f"n{i}" for i in range(5)]


def test_pack_puts_several_bundles_on_one_node():
    assert gang_fit([node("a", 4)], {"CPU": 1}, 3, "pack") == ["a", "a", "a"]
    assert gang_fit([node("a", 4)], {"CPU": 1}, 5, "pack") is None


def test_pack_spills_onto_the_next_node():
    placed = gang_fit([node("a", 2), node("b", 2)], {"CPU": 1}, 3, "pack")
    assert placed is not None and len(placed) == 3
    assert sorted(placed) == ["a", "a", "b"] or sorted(placed) == ["a", "b", "b"]


# ---- other resources --------------------------------------------------------------------------

def test_gpus_are_respected():
    nodes = [node("cpu-only", {"CPU": 8}), node("gpu", {"CPU": 8, "GPU": 1})]
    assert gang_fit(nodes, {"CPU": 1, "GPU": 1}, 1) == ["gpu"]
    assert gang_fit(nodes, {"CPU": 1, "GPU": 1}, 2) is None
    assert gang_fit(nodes, {"CPU": 1, "GPU": 2}, 1) is None
    assert gang_fit(nodes, {"CPU": 1, "GPU": 0.5}, 2, "pack") == ["gpu", "gpu"]


def test_custom_resources_are_respected():
    nodes = [node("plain", {"CPU": 4}), node("lowpri", {"CPU": 4, "lowpri": 1})]
    assert gang_fit(nodes, {"CPU": 1, "lowpri": 1}, 1) == ["lowpri"]
    assert gang_fit(nodes, {"CPU": 1, "lowpri": 1}, 2, "pack") is None
    assert gang_fit(nodes, {"CPU": 1, "accelerator_type:A100": 1}, 1) is None


def test_memory_is_respected():
    nodes = [node("small", {"CPU": 4, "memory": 2 * GiB}), node("big", {"CPU": 4, "memory": 16 * GiB})]
    assert gang_fit(nodes, {"CPU": 1, "memory": 8 * GiB}, 1) == ["big"]
    assert gang_fit(nodes, {"CPU": 1, "memory": 8 * GiB}, 2) is None
    assert gang_fit(nodes, {"CPU": 1, "memory": 8 * GiB}, 2, "pack") == ["big", "big"]


def test_zero_amounts_in_the_bundle_are_ignored():
    assert fits({"CPU": 1}, {"CPU": 1, "GPU": 0})
    assert gang_fit([node("a", 1)], {"CPU": 1, "GPU": 0.0}, 1) == ["a"]


def test_dead_nodes_are_ignored():
    nodes = [node("dead", 8, alive=False), node("live", 1)]
    assert gang_fit(nodes, {"CPU": 2}, 1) is None
    assert gang_fit(nodes, {"CPU": 1}, 1) == ["live"]
    assert gang_fit(nodes, {"CPU": 1}, 2) is None
    assert not could_ever_fit(nodes, {"CPU": 2}, 1, "spread")
    assert why_not(nodes, {"CPU": 2}, 1, "spread") == (
        "needs 1 node with 2 CPU free; 0 such nodes are free now "
        "and only 0 of the 1 live nodes could ever hold one")


def test_no_nodes():
    assert gang_fit([], {"CPU": 1}, 1) is None
    assert not could_ever_fit([], {"CPU": 1}, 1, "pack")


# ---- best fit --------------------------------------------------------------------------------

def test_best_fit_keeps_the_empty_node_for_a_wide_job():
    nodes = [node("big", 4), node("small", 1, total=4)]
    assert gang_fit(nodes, {"CPU": 1}, 1) == ["small"]
    # in either input order
    assert gang_fit(list(reversed(nodes)), {"CPU": 1}, 1) == ["small"]
    reserve(nodes, ["small"], {"CPU": 1})
    # so a job that needs a whole node still fits afterwards
    assert gang_fit(nodes, {"CPU": 4}, 1) == ["big"]


def test_best_fit_pack_fills_the_fullest_node_first():
    nodes = [node("a", 4), node("b", 2)]
    assert gang_fit(nodes, {"CPU": 1}, 2, "pack") == ["b", "b"]


def test_best_fit_is_not_decided_by_free_memory_bytes():
    nodes = [
        node("busy", {"CPU": 1, "memory": 16 * GiB}, total={"CPU": 4, "memory": 16 * GiB}),
        node("idle", {"CPU": 4, "memory": 8 * GiB}),
    ]
    assert gang_fit(nodes, {"CPU": 1}, 1) == ["busy"]


# ---- reserve and snapshots ------------------------------------------------------------------

def test_reserve_subtracts_each_bundle():
    nodes = [node("a", {"CPU": 4, "GPU": 2}), node("b", {"CPU": 4})]
    reserve(nodes, ["a", "a", "b"], {"CPU": 1.5, "GPU": 0.5})
    assert nodes[0].available == {"CPU": 1.0, "GPU": 1.0}
    assert nodes[1].available == {"CPU": 2.5, "GPU": -0.5}
    assert nodes[0].total == {"CPU": 4.0, "GPU": 2.0}  # total untouched


def test_reserve_then_fit_sees_the_reservation():
    nodes = [node("a", 2), node("b", 2)]
    bundle = {"CPU": 2}
    first = gang_fit(nodes, bundle, 1)
    reserve(nodes, first, bundle)
    second = gang_fit(nodes, bundle, 1)
    assert second is not None and second != first
    reserve(nodes, second, bundle)
    assert gang_fit(nodes, bundle, 1) is None
    assert could_ever_fit(nodes, bundle, 2, "spread")  # they would, once idle


def test_gang_fit_does_not_mutate_the_snapshot():
    nodes = [node("a", {"CPU": 4, "GPU": 1}), node("b", 2, alive=False), node("c", 1)]
    before = copy.deepcopy(nodes)
    assert gang_fit(nodes, {"CPU": 1}, 4, "pack") is not None
    assert gang_fit(nodes, {"CPU": 1}, 2, "spread") is not None
    assert gang_fit(nodes, {"CPU": 9}, 1) is None
    why_not(nodes, {"CPU": 9}, 2, "spread")
    could_ever_fit(nodes, {"CPU": 1}, 2, "spread")
    assert nodes == before


def test_nodeview_copy_is_deep_enough():
    n = NodeView("a", "1.2.3.4", {"CPU": 1.0}, {"CPU": 2.0}, True, {"zone": "x"})
    c = n.copy()
    assert c == n and c is not n
    c.available["CPU"] = 0.0
    c.labels["zone"] = "y"
    assert n.available == {"CPU": 1.0} and n.labels == {"zone": "x"}


# ---- could_ever_fit ---------------------------------------------------------------------------

def test_could_ever_fit_uses_totals():
    nodes = [node("a", 0, total=4), node("b", 0, total=4)]
    assert gang_fit(nodes, {"CPU": 4}, 2) is None
    assert could_ever_fit(nodes, {"CPU": 4}, 2, "spread")
    assert not could_ever_fit(nodes, {"CPU": 4}, 3, "spread")
    assert could_ever_fit(nodes, {"CPU": 2}, 4, "pack")
    assert not could_ever_fit(nodes, {"CPU": 5}, 1, "pack")


# ---- why_not ------------------------------------------------------------------------------------

def test_why_not_counts_free_nodes():
    nodes = [node("a", 2, total=2), node("b", 0, total=2), node("c", 0, total=2)]
    assert why_not(nodes, {"CPU": 2}, 3, "spread") == (
        "needs 3 nodes with 2 CPU free; 1 such node is free now")
    nodes[1].available["CPU"] = 2.0
    assert why_not(nodes, {"CPU": 2}, 3, "spread") == (
        "needs 3 nodes with 2 CPU free; 2 such nodes are free now")


def test_why_not_says_when_the_cluster_is_too_small():
    nodes = [node("a", 0, total=4), node("b", 0, total=2), node("c", 2, total=2),
             node("d", 8, alive=False)]
    msg = why_not(nodes, {"CPU": 4}, 2, "spread")
    assert msg == ("needs 2 nodes with 4 CPU free; 0 such nodes are free now "
                   "and only 1 of the 3 live nodes could ever hold one")


def test_why_not_names_gpus_and_memory():
    msg = why_not([node("a", {"CPU": 8})], {"CPU": 1, "GPU": 2, "memory": 4 * GiB}, 1, "spread")
    assert msg.startswith("needs 1 node with 1 CPU, 2 GPU, 4 GiB memory free; 0 such nodes are free now")
    assert "only 0 of the 1 live nodes" in msg


def test_why_not_pack():
    nodes = [node("a", 1, total=4), node("b", 1, total=4)]
    assert why_not(nodes, {"CPU": 2}, 3, "pack") == (
        "needs 3 nodes with 2 CPU free (packing allowed); 0 nodes can take one now")
    nodes[0].available["CPU"] = 2.0
    assert why_not(nodes, {"CPU": 2}, 3, "pack").endswith("; 1 node can take one now")
