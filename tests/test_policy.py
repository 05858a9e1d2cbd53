"""The scheduling policy over simulated cluster snapshots: ordering, gang fit on
fragmented and heterogeneous nodes, EASY backfill, preemption, quotas, fair share.
No Ray: ``policy.plan`` is a pure function of the snapshot."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from raybatch.scheduler import fit
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.policy import (
    Job, never_admissible, plan, shadow, victims_for,
)
from raybatch.scheduler.simulate import SimJob, simulate
from raybatch.spec.policy import QuotaSpec, SchedulerPolicy


def nodes(n: int, cpus: float = 4, gpus: float = 0, prefix: str = "n", labels=None) -> list[NodeView]:
    res = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
    return [NodeView(f"{prefix}{i}", available=dict(res), total=dict(res), labels=dict(labels or {}))
            for i in range(n)]


def job(jid: str, seq: int, count: int = 1, cpus: float = 4, priority: int = 500, **kw) -> Job:
    kw.setdefault("grace", 0.0)  # so that a job holds its nodes for exactly its limit
    bundle = {"CPU": float(cpus)}
    if kw.get("gpus"):
        bundle["GPU"] = float(kw.pop("gpus"))
    kw.pop("gpus", None)
    return Job(jid, priority, seq, bundle, count=count, **kw)


def run(cluster: list[NodeView], j: Job, start: float, on: list[str]) -> Job:
    """A running job: subtract it from the snapshot and say where it is."""
    fit.reserve(cluster, on, j.bundle)
    j.started_at, j.nodes = start, tuple(on)
    return j


def started(p) -> list[str]:
    return [j.id for j, _ in p.start]


# ---- ordering -------------------------------------------------------------------------

def test_priority_then_submission_order():
    q = [job("low", 1, priority=250), job("n2", 3), job("high", 4, priority=750), job("n1", 2)]
    p = plan(0, nodes(3), [], q)
    assert started(p) == ["high", "n1", "n2"]
    assert "low" in p.waiting


def test_requeued_job_keeps_its_place():
    # a job requeued after preemption still has its original (small) seq
    q = [job("new", 10), job("requeued", 1)]
    p = plan(0, nodes(1), [], q)
    assert started(p) == ["requeued"]
    assert p.waiting["new"].startswith("needs 1 node")


def test_integer_priorities_between_the_names():
    q = [job("a", 1, priority=500), job("b", 2, priority=501)]
    assert started(plan(0, nodes(1), [], q)) == ["b"]


# ---- gang fit on real node shapes -----------------------------------------------------

def test_fragmented_free_cpus_do_not_make_a_gang():
    cluster = nodes(3)
    run(cluster, job("r0", 0, cpus=3), 0, ["n0"])
    run(cluster, job("r1", 0, cpus=3), 0, ["n1"])
    # 1+1+4 = 6 CPUs free in all, but only one node has 2 free
    p = plan(0, cluster, [], [job("gang", 1, count=2, cpus=2)])
    assert started(p) == []
    assert "needs 2 nodes with 2 CPU free; 1 such node is free now" in p.waiting["gang"]


def test_gpu_job_lands_on_the_gpu_node_and_cpu_job_keeps_off_it():
    cluster = nodes(1, cpus=8, gpus=2, prefix="gpu") + nodes(1, cpus=8, prefix="cpu")
    p = plan(0, cluster, [], [job("cpujob", 1, cpus=2), job("gpujob", 2, cpus=2, gpus=2)])
    where = {j.id: on for j, on in p.start}
    assert where == {"cpujob": ["cpu0"], "gpujob": ["gpu0"]}


def test_low_priority_nodes_required_or_avoided():
    cluster = nodes(2, prefix="spot", labels={fit.LOW_PRIORITY_LABEL: "true"}) + nodes(1, prefix="ded")
    p = plan(0, cluster, [], [job("needs-spot", 1, count=2, low_priority_nodes="require"),
                              job("no-spot", 2, low_priority_nodes="avoid")])
    where = {j.id: on for j, on in p.start}
    assert sorted(where["needs-spot"]) == ["spot0", "spot1"]
    assert where["no-spot"] == ["ded0"]
    p = plan(0, cluster, [], [job("no-spot-2", 1, count=2, low_priority_nodes="avoid")])
    assert started(p) == [] and "low-priority nodes: avoid" in p.waiting["no-spot-2"]


def test_low_priority_marked_by_a_resource():
    cluster = nodes(1, prefix="ded")
    spot = NodeView("spot0", available={"CPU": 4.0, fit.LOW_PRIORITY_RESOURCE: 1.0},
                    total={"CPU": 4.0, fit.LOW_PRIORITY_RESOURCE: 1.0})
    p = plan(0, cluster + [spot], [], [job("s", 1, low_priority_nodes="require")])
    assert p.start[0][1] == ["spot0"]


def test_lost_nodes_are_avoided_only_when_the_gang_fits_elsewhere():
    cluster = nodes(3)
    p = plan(0, cluster, [], [job("j", 1, count=2, avoid=frozenset({"n0"}))])
    assert "n0" not in p.start[0][1]
    p = plan(0, cluster, [], [job("j", 1, count=3, avoid=frozenset({"n0"}))])
    assert sorted(p.start[0][1]) == ["n0", "n1", "n2"]
    # n1 busy for now: the gang could still fit off n0 later, so it waits rather than use n0
    run(cluster, job("busy", 0), 0, ["n1"])
    p = plan(0, cluster, [], [job("j", 1, count=2, avoid=frozenset({"n0"}))])
    assert started(p) == [] and "keeping off 1 node(s) where it lost a rank" in p.waiting["j"]


# ---- EASY backfill ---------------------------------------------------------------------

def test_head_of_line_does_not_block_a_job_that_ends_before_the_reservation():
    cluster = nodes(4)
    r = run(cluster, job("r", 0, count=2, limit=100), 0, ["n0", "n1"])
    q = [job("big", 1, count=4, limit=50), job("short", 2, count=1, limit=60), job("long", 3, limit=1000)]
    p = plan(10, cluster, [r], q)
    assert p.reservation.job_id == "big" and p.reservation.at == 100
    assert started(p) == ["short"]  # ends at 70, before 100
    assert "would delay big" in p.waiting["long"]
    assert "reserved to start in" in p.waiting["big"]


def test_backfill_on_nodes_the_head_does_not_need():
    cluster = nodes(4)
    r = run(cluster, job("r", 0, count=1, limit=100), 0, ["n0"])
    # big needs 3 nodes; at t=100 it gets 4 free: one of them may hold a long job
    q = [job("big", 1, count=4, limit=50), job("long", 2, limit=10_000), job("long2", 3, limit=10_000)]
    p = plan(0, cluster, [r], q)
    assert p.reservation.at == 100
    assert started(p) == []  # big needs all 4 nodes at t=100: no long job may take one
    q = [job("big", 1, count=3, limit=50), job("long", 2, limit=10_000), job("long2", 3, limit=10_000)]
    cluster = nodes(4)
    r = run(cluster, job("r", 0, count=2, limit=100), 0, ["n0", "n1"])
    p = plan(0, cluster, [r], q)
    assert started(p) == ["long"]  # 4 nodes at t=100, big needs 3: one spare
    assert "would delay big" in p.waiting["long2"]


def test_strict_fifo_when_backfill_is_off():
    cluster = nodes(4)
    r = run(cluster, job("r", 0, count=2, limit=100), 0, ["n0", "n1"])
    q = [job("big", 1, count=4), job("short", 2, limit=1)]
    p = plan(0, cluster, [r], q, SchedulerPolicy(backfill=False))
    assert started(p) == [] and "backfill is off" in p.waiting["short"]


def test_jobs_without_a_limit_do_not_get_ahead_of_a_reservation():
    cluster = nodes(2)
    r = run(cluster, job("r", 0, limit=100), 0, ["n0"])
    p = plan(0, cluster, [r], [job("big", 1, count=2), job("unbounded", 2)])  # limit: inf
    assert started(p) == []
    assert "would delay big" in p.waiting["unbounded"]


def test_backfill_never_delays_the_head_randomized():
    rng = random.Random(7)
    for trial in range(300):
        cluster = nodes(rng.randint(2, 6), cpus=rng.choice([2, 4]))
        cpus = cluster[0].total["CPU"]
        running = []
        for k, n in enumerate(cluster):
            if rng.random() < 0.6:
                used = rng.choice([1, cpus])
                running.append(run(cluster, job(f"r{k}", 0, cpus=used, limit=rng.randint(10, 200)),
                                   0, [n.node_id]))
        q = [job(f"q{k}", k + 1, count=rng.randint(1, len(cluster)), cpus=rng.choice([1, cpus]),
                 limit=rng.randint(5, 300)) for k in range(rng.randint(1, 8))]
        p = plan(0, cluster, running, q)
        if p.reservation is None or p.reservation.at == math.inf:
            continue
        head = next(j for j in q if j.id == p.reservation.job_id)
        after = [n.copy() for n in cluster]
        now_running = list(running)
        for j, on in p.start:
            fit.reserve(after, on, j.bundle)
            now_running.append(replace(j, started_at=0, nodes=tuple(on)))
        found = shadow(0, after, now_running, head)
        assert found is not None and found[0] <= p.reservation.at, f"trial {trial}: head delayed"


def test_big_job_does_not_starve_under_a_stream_of_small_ones():
    cluster = nodes(4)
    jobs = [SimJob(job("big", 0, count=4, limit=100), 50, submit_at=5)]
    # one-node jobs keep arriving; each would keep some node busy forever under greedy admission
    jobs += [SimJob(job(f"s{k}", k + 1, limit=40), 30, submit_at=k * 8) for k in range(60)]
    res = simulate(cluster, jobs)
    assert not res.never
    assert res.starts["big"] <= 5 + 40  # bounded by the small jobs' limits, not by the stream
    fifo = simulate(cluster, jobs, SchedulerPolicy(backfill=False))
    assert res.makespan() <= fifo.makespan()


# ---- preemption ---------------------------------------------------------------------------

def test_preempts_lower_priority_for_the_head():
    cluster = nodes(2)
    low = run(cluster, job("low", 0, count=2, priority=250, grace=20), 0, ["n0", "n1"])
    p = plan(100, cluster, [low], [job("high", 1, count=2, priority=750)])
    assert [(v.id, h.id) for v, h in p.preempt] == [("low", "high")]
    assert "preempting low" in p.waiting["high"]
    assert p.reservation.at == 120  # the victim's grace period


def test_never_preempts_equal_or_higher_priority_or_protected_jobs():
    cluster = nodes(3)
    running = [run(cluster, job("same", 0, priority=500), 0, ["n0"]),
               run(cluster, job("higher", 0, priority=900), 0, ["n1"]),
               run(cluster, job("protected", 0, priority=100, preemptible=False), 0, ["n2"])]
    p = plan(0, cluster, running, [job("j", 1, priority=500)])
    assert p.preempt == [] and started(p) == []


def test_minimal_victim_set_prefers_fewest_jobs():
    cluster = nodes(2)
    running = [run(cluster, job("a", 0, cpus=2, priority=100), 0, ["n0"]),
               run(cluster, job("b", 0, cpus=2, priority=100), 0, ["n0"]),
               run(cluster, job("c", 0, cpus=4, priority=300), 0, ["n1"])]
    p = plan(0, cluster, running, [job("high", 1, cpus=4, priority=750)])
    # stopping c alone frees a node; a and b would be two jobs
    assert [v.id for v, _ in p.preempt] == ["c"]


def test_minimal_victim_set_prefers_lowest_priority_then_least_work_lost():
    cluster = nodes(3)
    running = [run(cluster, job("old", 0, priority=200), 0, ["n0"]),
               run(cluster, job("recent", 0, priority=200), 50, ["n1"]),
               run(cluster, job("mid", 0, priority=400), 0, ["n2"])]
    p = plan(60, cluster, running, [job("high", 1, priority=750)])
    assert [v.id for v, _ in p.preempt] == ["recent"]


def test_no_preemption_when_it_would_not_help():
    cluster = nodes(2)
    low = run(cluster, job("low", 0, priority=100), 0, ["n0"])
    p = plan(0, cluster, [low], [job("huge", 1, count=3, priority=900)])
    assert p.preempt == []


def test_waits_for_jobs_already_stopping_instead_of_preempting_more():
    cluster = nodes(2)
    a = run(cluster, job("a", 0, priority=100), 0, ["n0"])
    b = run(cluster, job("b", 0, priority=100), 0, ["n1"])
    a.stopping_until = 30
    p = plan(10, cluster, [a, b], [job("high", 1, priority=900)])
    assert p.preempt == [] and "waiting for a to stop" in p.waiting["high"]


def test_victim_search_budget_falls_back_to_a_minimal_greedy_set():
    cluster = nodes(12, cpus=1)
    running = [run(cluster, job(f"r{k}", 0, cpus=1, priority=100), 0, [f"n{k}"]) for k in range(12)]
    head = job("wide", 1, count=6, cpus=1, priority=900)
    v = victims_for(head, cluster, running, budget=10)
    assert v is not None and len(v) == 6


# ---- quotas and fair share -----------------------------------------------------------------

def test_quota_caps_concurrent_nodes_without_blocking_others():
    cfg = SchedulerPolicy(quotas={"vision": QuotaSpec(max_nodes=2)})
    q = [job("v1", 1, count=2, group="vision"), job("v2", 2, group="vision"), job("nlp", 3, group="nlp")]
    p = plan(0, nodes(4), [], q, cfg)
    assert started(p) == ["v1", "nlp"]
    assert "at its quota: 2 of 2 node(s)" in p.waiting["v2"]


def test_gpu_quota():
    cfg = SchedulerPolicy(quotas={"vision": QuotaSpec(max_gpus=2)})
    q = [job("a", 1, cpus=1, gpus=2, group="vision"), job("b", 2, cpus=1, gpus=1, group="vision")]
    p = plan(0, nodes(2, gpus=4), [], q, cfg)
    assert started(p) == ["a"] and "GPU(s)" in p.waiting["b"]


def test_never_admissible_names_the_field():
    cfg = SchedulerPolicy(quotas={"vision": QuotaSpec(max_nodes=2, max_gpus=4)})
    assert "nodes: 3" in never_admissible(job("a", 1, count=3, group="vision"), cfg)
    assert "resources.gpus" in never_admissible(job("a", 1, count=2, gpus=4, group="vision"), cfg)
    assert never_admissible(job("a", 1, count=2, group="other"), cfg) is None


def test_fair_share_gives_the_next_node_to_the_group_using_least():
    cluster = nodes(4)
    running = [run(cluster, job("a-run", 0, group="a"), 0, ["n0"]),
               run(cluster, job("a-run2", 0, group="a"), 0, ["n1"])]
    # group a submitted first, but already uses half the cluster
    q = [job("a1", 1, group="a"), job("a2", 2, group="a"), job("b1", 3, group="b"), job("b2", 4, group="b")]
    p = plan(0, cluster, running, q)
    assert started(p) == ["b1", "b2"]
    p = plan(0, cluster, running, q, SchedulerPolicy(fair_share=False))
    assert started(p) == ["a1", "a2"]


def test_share_weights():
    cfg = SchedulerPolicy(quotas={"a": QuotaSpec(share=3)})
    cluster = nodes(8)
    running = [run(cluster, job(f"a{k}", 0, group="a"), 0, [f"n{k}"]) for k in range(2)]
    running += [run(cluster, job("b0", 0, group="b"), 0, ["n2"])]
    # a uses 2/8 with weight 3 (0.083); b uses 1/8 with weight 1 (0.125): a goes first
    q = [job("b1", 1, group="b"), job("a9", 2, group="a")]
    assert started(plan(0, cluster, running, q, cfg))[0] == "a9"


def test_fair_share_never_overrides_priority():
    q = [job("a", 1, group="busy", priority=750), job("b", 2, group="idle", priority=500)]
    cluster = nodes(2)
    r = run(cluster, job("busy-run", 0, group="busy"), 0, ["n0"])
    assert started(plan(0, cluster, [r], q)) == ["a"]


# ---- simulation -----------------------------------------------------------------------------

def test_simulation_easy_beats_fifo_and_reports_never_startable_jobs():
    rng = random.Random(1)
    cluster = nodes(8)
    jobs = []
    for k in range(80):
        count = rng.choice([1, 1, 2, 4])
        d = rng.randint(10, 100)
        jobs.append(SimJob(job(f"j{k}", k, count=count, limit=d * 1.2), d))
    easy, fifo = simulate(cluster, jobs), simulate(cluster, jobs, SchedulerPolicy(backfill=False))
    assert len(easy.ends) == len(fifo.ends) == 80
    assert easy.makespan() < fifo.makespan()
    res = simulate(nodes(2), [SimJob(job("too-big", 1, count=3), 1)])
    assert res.never == ["too-big"]


@pytest.mark.parametrize("cfg,expect", [(SchedulerPolicy(), ["q0", "q1", "q2", "q4"]),
                                        (SchedulerPolicy(backfill=False), ["q0", "q1", "q2"])])
def test_a_deep_queue(cfg, expect):
    # correctness at depth; the timing figure itself lives in benchmarks/
    cluster = nodes(8)
    q = [job(f"q{k}", k, count=(k % 4) + 1, limit=100 + k) for k in range(5000)]
    p = plan(0, cluster, [], q, cfg)
    # q3 (4 nodes) is the head, reserved for t=101 when q0 and q1 are over; q4 (1 node,
    # ends at 104) still leaves it 4 nodes then, so it backfills; nothing else fits
    assert started(p) == expect
    assert len(p.waiting) == 5000 - len(p.start)
    assert p.reservation.job_id == "q3" and p.reservation.at == 101


def test_resources_held_by_something_untracked_still_reserve_the_head():
    # a job that just ended still holds its node in Ray's view for a moment
    cluster = nodes(2)
    fit.reserve(cluster, ["n0"], {"CPU": 4.0})
    p = plan(0, cluster, [], [job("wide", 1, count=2), job("long", 2, limit=3600)])
    assert p.reservation.at == math.inf
    assert started(p) == [] and "would delay wide" in p.waiting["long"]
    # a job that leaves the head's nodes alone may still backfill
    cluster = nodes(3)
    fit.reserve(cluster, ["n0"], {"CPU": 4.0})
    p = plan(0, cluster, [], [job("wide", 1, count=3), job("small", 2, cpus=1, limit=3600)])
    assert started(p) == []  # wide needs every CPU of every node
    p = plan(0, cluster, [], [job("wide", 1, count=3, cpus=2), job("small", 2, cpus=1, limit=3600)])
    assert started(p) == ["small"]


def test_queue_extend_appends_new_submissions_and_refuses_out_of_order_ones():
    from raybatch.scheduler.policy import Queue

    q = Queue([job("a", 1), job("b", 3, group="x")])
    assert q.extend([job("c", 5), job("d", 4, group="x")])
    assert [j.id for j in q.levels[500]["default"]] == ["a", "c"]
    assert [j.id for j in q.levels[500]["x"]] == ["b", "d"] and len(q) == 4
    assert not q.extend([job("requeued", 2)])  # older than c: its place is not at the end
    assert len(q) == 4
    assert q.extend([job("hi", 9, priority=900)]) and list(q.levels) == [500, 900]
    assert started(plan(0, nodes(1), [], q)) == ["hi"]


def test_backfill_keeps_off_the_heads_nodes_when_best_fit_would_take_one():
    c = nodes(4)                                              # n0..n3, 4 CPU each
    r0 = run(c, job("r0", 0, cpus=2, limit=100), 0, ["n0"])  # n0: 2 free, all back at t=100
    r1 = run(c, job("r1", 0, cpus=3), 0, ["n1"])             # n1: 1 free, for days
    r3 = run(c, job("r3", 0, cpus=1), 0, ["n3"])             # n3: 3 free, for days
    head = job("head", 1, count=2, cpus=4)                    # n2 now, n0 at t=100
    small = job("small", 2, cpus=2)                           # best fit: n0, which the head needs
    p = plan(0, c, [r0, r1, r3], [head, small])
    assert p.reservation.at == 100 and sorted(p.reservation.nodes) == ["n0", "n2"]
    assert p.start == [(small, ["n3"])]


def test_a_job_holds_its_nodes_for_its_limit_plus_its_grace_period():
    cluster = nodes(2)
    r = run(cluster, job("r", 0, limit=100, grace=30), 0, ["n0"])
    p = plan(0, cluster, [r], [job("wide", 1, count=2), job("fits-limit-only", 2, limit=110, grace=30)])
    assert p.reservation.at == 130
    assert "would delay wide" in p.waiting["fits-limit-only"]  # 110 + 30 > 130
    p = plan(0, cluster, [r], [job("wide", 1, count=2), job("short", 2, limit=100, grace=30)])
    assert started(p) == ["short"]


def test_a_head_waiting_for_its_victims_asks_the_autoscaler_for_nothing():
    cluster = nodes(1)
    low = run(cluster, job("low", 0, priority=100), 0, ["n0"])
    p = plan(0, cluster, [low], [job("high", 1, priority=900), job("other", 2, priority=900)])
    assert [v.id for v, _ in p.preempt] == ["low"]
    assert [j.id for j in p.unfit] == ["other"]


def test_a_settling_head_preempts_no_one_else():
    cluster = nodes(1)
    low = run(cluster, job("low2", 0, priority=100), 0, ["n0"])
    p = plan(0, cluster, [low], [job("high", 1, priority=900)], settling=frozenset({"high"}))
    assert p.preempt == [] and "preempted to show free" in p.waiting["high"]
