"""Job arrays without Ray: the `array:` block, the listing and the item records, the
driver's dispatcher, and the scheduler's slots (granted, counted in quotas, preempted
one by one, leases that never delay the head). The end-to-end runs are in
tests/test_arrays_e2e.py."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import pytest

from raybatch.errors import SpecError
from raybatch.runtime.array import Dispatcher
from raybatch.runtime.items import Item, ItemStore, Record, list_items, tasks_of
from raybatch.scheduler import fit
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.policy import Job, plan, renews, shadow, slot_id
from raybatch.spec.array import glob_match, split_glob
from raybatch.spec.job import JobSpec
from raybatch.spec.loader import parse_job
from raybatch.storage.backends import open_backend
from raybatch.storage.datastores import Access
from tests.test_scheduler_loop import make, submit


def job(array: dict, **fields) -> JobSpec:
    return parse_job({"name": "a", "command": "python score.py ${{item}}", "array": array, **fields})


# ---- the job file -------------------------------------------------------------------------
def test_array_block_defaults_and_an_output_for_the_items():
    spec = job({"over": "az://scoring/in/*.parquet"})
    a = spec.array
    assert (a.items_per_task, a.max_concurrent, a.error_threshold, a.item_timeout, a.retries) == (1, 4, 0, 3600, 2)
    assert a.base == "az://scoring/in" and a.pattern == "*.parquet" and a.item_mode == "download"
    assert list(spec.outputs) == ["results"]
    assert job({"over": "/data/in/*.csv"}).array.item_mode == "direct"
    assert job({"count": 10, "items_per_task": 3}).array.known_tasks() == 4
    assert list(job({"count": 2}, outputs={"preds": {}}).outputs) == ["preds"]


@pytest.mark.parametrize("array,fields,problem", [
    ({}, {}, "array: give exactly one of over (files), count (indices) or values (a list); got none"),
    ({"count": 3, "values": [1]}, {}, "got count and values"),
    ({"count": 3, "mode": "direct"}, {}, "mode applies to `over` (files) only"),
    ({"count": 0}, {}, "array.count: Input should be greater than or equal to 1"),
    ({"count": 3, "item_timeout": "soon"}, {}, "array.item_timeout: 'soon' is not a duration"),
    ({"count": 3, "error_threshold": -2}, {}, "array.error_threshold: Input should be greater than or equal to -1"),
    ({"over": "relative/*.csv"}, {}, "'relative' is a relative path"),
    ({"count": 3, "max_concurent": 2}, {}, "array.max_concurent: unknown field; allowed: count, error_threshold"),
    ({"count": 3}, {"prepare": "pip install x"}, "prepare is not available in array jobs"),
    ({"count": 3}, {"framework": "mpi"}, "array jobs run framework custom, pytorch or tensorflow tasks, not 'mpi'"),
])
def test_array_block_errors_name_the_field(array, fields, problem):
    with pytest.raises(SpecError) as e:
        job(array, **fields)
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_the_item_placeholder_needs_an_array():
    with pytest.raises(SpecError, match=r"command: \$\{\{item\}\} is the item of an array job"):
        parse_job({"name": "a", "command": "cat ${{item}}"})


def test_globs():
    assert split_glob("datastore://s/in/**/*.json") == ("datastore://s/in", "**/*.json")
    assert split_glob("/data/in/") == ("/data/in", "")
    assert glob_match("a.csv", "*.csv") and not glob_match("sub/a.csv", "*.csv")
    assert glob_match("sub/deeper/a.csv", "**/*.csv") and glob_match("a.csv", "**/*.csv")
    assert glob_match("anything/at/all", "")


# ---- listing and records ------------------------------------------------------------------
def local(path) -> object:
    return open_backend(Access("local", str(path), uri=str(path)))


def test_listing_is_sorted_matches_the_glob_and_skips_dotfiles(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("b.csv", "a.csv", "c.txt", ".hidden.csv", "sub/d.csv"):
        (tmp_path / "in" / name).write_text(name)
    spec = job({"over": f"{tmp_path}/in/*.csv"})
    assert [i.key for i in list_items(spec.array, local(tmp_path / "in"))] == ["a.csv", "b.csv"]
    every = job({"over": f"{tmp_path}/in"})
    assert [i.key for i in list_items(every.array, local(tmp_path / "in"))] == ["a.csv", "b.csv", "c.txt", "sub/d.csv"]
    assert [i.value for i in list_items(job({"values": ["x", 2, True]}).array, None)] == ["x", "2", "true"]
    assert [t.key for t in tasks_of(list_items(job({"count": 5}).array, None), 2)] == ["0", "2", "4"]


def test_manifest_and_records_round_trip(tmp_path):
    store = ItemStore(local(tmp_path / "items"))
    assert store.read_manifest() is None and store.records() == {}
    items = [Item(i, f"f{i}.csv", f"f{i}.csv", 10 * i, f"etag{i}") for i in range(3)]
    store.write_manifest(items)
    store.write_record(Record(1, "done", ["f1.csv"], 0, runs=2, job_id="rb-1", attempt=1, slot=0))
    store.write_record(Record(2, "failed", ["f2.csv"], 3, runs=3, message="USER_ERROR: exit 3"))
    (tmp_path / "items" / "7.json").write_text("{torn")  # a torn write is ignored: the task runs again
    assert store.read_manifest() == items
    recs = store.records()
    assert sorted(recs) == [1, 2] and recs[1].runs == 2 and recs[2].state == "failed"


def test_run_numbers_go_on_across_attempts_from_the_logs(tmp_path):
    """A later attempt numbers a task's runs on from the log directories its earlier runs
    left (stdouterr/items/<task>/attempt-<run>/), so no run's logs are written over."""
    from raybatch.storage.plan import past_runs

    logs = tmp_path / "stdouterr"
    for rel in ("items/3/attempt-1/rank-0/stdout.txt", "items/3/attempt-2/rank-1/stderr.txt",
                "items/10/attempt-1/rank-0/stdout.txt", "attempt-1/rank-0/stdout.txt",
                "items/manifest-not-a-task/attempt-1/x.txt", "items/4/attempt-x/rank-0/stdout.txt"):
        (logs / rel).parent.mkdir(parents=True, exist_ok=True)
        (logs / rel).write_text("x")
    runs = past_runs(open_backend(Access("local", str(logs), uri=str(logs))), "items")
    assert runs == {3: 2, 10: 1}
    d = Dispatcher(tasks_of([Item(i, str(i), str(i)) for i in range(5)], 1), set(), set(), 1, runs)
    while (t := d.take(0)) is not None:
        if t.index == 3:
            assert d.runs(3) + 1 == 3  # this attempt's run of task 3 is its third
        elif t.index == 0:
            assert d.runs(0) + 1 == 1


def test_a_slot_does_not_restore_every_units_checkpoints_at_set_up():
    """Blob checkpoints: a slot's gang restores each unit's own checkpoints before the unit
    runs (checkpoints/items/<task>/), not the whole tree of every task when it is set up."""
    from raybatch.runtime import setup
    from raybatch.runtime.launch import AttemptDirs
    from raybatch.storage.plan import AttemptStorage

    blob = Access("blob", "j/checkpoints", container="c", endpoint="http://acct.blob", uri="az://c/j/checkpoints")
    st = AttemptStorage(logs=Access("local", "/tmp/j/stdouterr", uri="/tmp/j/stdouterr"), checkpoints=blob)

    class NoGang:  # the whole-tree restore would ask the gang's nodes for it
        def first_actors(self):
            raise AssertionError("restored the whole checkpoint tree")

    args = (NoGang(), st, AttemptDirs("rb-1", 1, slot=0), "/tmp/cache", lambda: False, lambda *a, **k: None, print)
    assert setup.stage_inputs(*args, checkpoints=False) == {}
    with pytest.raises(AssertionError, match="whole checkpoint tree"):
        setup.stage_inputs(*args)


def test_dispatcher_hands_each_task_to_one_slot_and_counts():
    tasks = tasks_of([Item(i, str(i), str(i)) for i in range(6)], 1)
    d = Dispatcher(tasks, done={0}, skipped={1}, retries=1)
    assert d.counts().pending == 4 and d.wanted(8) == 4 and d.wanted(2) == 2
    a, b = d.take(0), d.take(1)
    assert (a.index, b.index) == (2, 3) and d.counts().running == 2
    d.requeue(a.index, front=True)          # a preempted slot: the task goes first, unpaid
    assert d.take(0).index == 2 and d.runs(2) == 1
    d.finish(2, Record(2, "done"))
    d.finish(3, Record(3, "failed"))
    c = d.counts()
    assert (c.done, c.failed, c.skipped, c.running) == (2, 1, 1, 0) and d.failed_items() == 1
    assert d.take(0).index == 4 and d.take(0).index == 5 and d.take(0) is None
    assert not d.complete
    d.finish(4, Record(4, "done"))
    d.finish(5, Record(5, "done"))
    assert d.complete and d.wanted(4) == 0 and d.counts().rate > 0


# ---- the scheduler's slots ----------------------------------------------------------------
def array_job(store, **fields):
    return submit(store, command="true", array={"count": 20, "max_concurrent": 2, "item_timeout": "60s"}, **fields)


def test_first_slot_starts_the_attempt_the_next_is_granted_to_it(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=2)
    a = array_job(store)
    sched.cycle()
    row = store.get_job(a["id"])
    assert row["state"] == "STARTING" and row["attempt"] == 1
    assert len(launcher.submitted) == 1 and set(launcher.submit_kw[0]["slots"]) == {0}
    assert launcher.grants == [(a["id"], 1, 1, ("node1",))]
    assert [s["slot"] for s in store.slots(a["id"], 1, live=True)] == [0, 1]
    sched.cycle()
    assert len(launcher.submitted) == 1 and len(launcher.grants) == 1  # nothing more wanted


def test_a_queued_array_job_says_why_it_waits_while_submissions_back_off(tmp_path):
    """A queued array job is its first slot to the policy; its waiting reason is keyed by
    the job's id (what `raybatch queue` and `show` look up), also after a failed submission."""
    store, launcher, sched = make(tmp_path, nodes=2)
    launcher.fail_next = 1
    a = array_job(store)
    sched.cycle()
    sched.cycle()
    assert "Ray Job submission failed 1 time(s)" in sched.waiting[a["id"]], sched.waiting
    assert not any("/s" in k for k in sched.waiting)


def test_slots_count_in_the_quota(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=2)
    sched.policy_file = tmp_path / "policy.yaml"
    sched.policy_file.write_text("quotas: {default: {max_nodes: 1}}\n")
    a = array_job(store)
    for _ in range(3):
        sched.cycle()
    assert len(store.slots(a["id"], 1, live=True)) == 1 and launcher.grants == []
    assert "at its quota: 1 of 1 node(s)" in sched.waiting[a["id"]]


def _two_running_slots(tmp_path, **fields):
    store, launcher, sched = make(tmp_path, nodes=2)
    a = array_job(store, priority="low", **fields)
    sched.cycle()
    launcher.reports[(a["id"], 1)] = {
        "phase": "running", "at": time.time(), "slots_wanted": 2,
        "slots": [{"slot": k, "nodes": [f"node{k}"], "state": "busy", "task": k, "since": time.time() - 10,
                   "placed_at": time.time() - 10} for k in (0, 1)]}
    for n in sched.cluster.nodes:
        n.available["CPU"] = 0.0
    sched.cycle()
    assert store.get_job(a["id"])["state"] == "RUNNING"
    return store, launcher, sched, a


def test_a_placed_slot_is_counted_once_whatever_its_driver_does_with_it(tmp_path):
    """A slot placed a while ago is in Ray's view: the scheduler must not subtract it from
    the free nodes again when its state changes (a task just started: ``since`` is now);
    one still reserving holds nothing in Ray's view and is subtracted."""
    store, launcher, sched, a = _two_running_slots(tmp_path)
    report = launcher.reports[(a["id"], 1)]
    report["slots"][0].update(state="ready", since=time.time())
    report["slots"][1].update(state="reserving", since=time.time() - 10, placed_at=None)
    for n in sched.cluster.nodes:
        n.available["CPU"] = 0.0
    sched.cluster.nodes[1].available["CPU"] = 1.0  # slot 1's gang is not placed yet
    sched.cycle()
    nodes = sched.cluster.snapshot()
    sched._running(nodes)
    assert [n.available["CPU"] for n in nodes] == [0.0, 0.0]


def test_a_higher_priority_job_preempts_exactly_one_slot(tmp_path):
    store, launcher, sched, a = _two_running_slots(tmp_path)
    high = submit(store, priority="high")
    sched.cycle()
    preempted = [r for r in launcher.revokes if r[3]]
    assert len(preempted) == 1 and preempted[0][0] == a["id"] and high["id"] in preempted[0][4]
    assert store.get_job(a["id"])["state"] == "RUNNING"  # the array keeps running on its other slot
    assert store.get_job(a["id"])["preemptions"] == 1
    k = preempted[0][2]
    # the driver gives the slot back: its node frees, the high job starts there
    report = launcher.reports[(a["id"], 1)]
    report["slots"][k]["state"] = "released"
    sched.cluster.nodes[k].available["CPU"] = 1.0
    sched.cycle()
    sched.cycle()
    assert store.get_job(high["id"])["state"] == "STARTING"
    assert launcher.submitted[-1] == (high["id"], 1, (f"node{k}",))
    assert [s["slot"] for s in store.slots(a["id"], 1, live=True)] == [1 - k]


def test_a_restarted_server_brings_the_control_file_in_line_with_the_store(tmp_path):
    """The server was killed between the store's write and the control file's: the next
    server hands the driver the revocation (and any grant) it never saw, once per attempt."""
    import types

    from raybatch.runtime.launcher import RayJobLauncher
    from raybatch.runtime.protocol import Control, ControlDir, SlotGrant
    from raybatch.scheduler.loop import Scheduler
    from tests.test_scheduler_loop import FakeLauncher

    store, launcher, sched, a = _two_running_slots(tmp_path)
    assert launcher.synced == [(a["id"], 1, [(0, "granted", None), (1, "granted", None)])]
    store.revoke_slot(a["id"], 1, 0, "preempted by rb-x", preempted_by="rb-x")  # ... and then SIGKILL
    again = FakeLauncher()
    again.reports = launcher.reports
    fresh = Scheduler(store, again, sched.cluster)
    fresh.cycle()
    fresh.cycle()
    assert again.synced == [(a["id"], 1, [(0, "revoked", "rb-x"), (1, "granted", None)])]
    # what the real launcher then writes: the revocation added, nothing granted taken back
    ctl = ControlDir.of(tmp_path / "state", a["id"], 1)
    ctl.write_control(Control(slots={1: SlotGrant(nodes=["node1"])}))
    RayJobLauncher.sync_slots(types.SimpleNamespace(state_dir=tmp_path / "state"), a["id"], 1,
                              store.slots(a["id"], 1, live=True))
    slots = ctl.read_control().slots
    assert (slots[0].state, slots[0].preempt, slots[0].reason) == ("revoked", True, "preempted by rb-x")
    assert (slots[1].state, slots[1].nodes) == ("granted", ["node1"])


def test_a_slot_on_the_heads_reserved_nodes_is_not_renewed(tmp_path):
    store, launcher, sched, a = _two_running_slots(tmp_path, preemptible=False)
    big = submit(store, nodes=2, priority="high")  # cannot preempt: it reserves the nodes instead
    sched.cycle()
    drained = [r for r in launcher.revokes if not r[3]]
    assert sorted(r[2] for r in drained) == [0, 1] and "reserved for " + big["id"] in drained[0][4]
    assert all(s["state"] == "revoked" for s in store.slots(a["id"], 1))
    # while they drain, the array asks for no new slot and the big job waits for them
    sched.cycle()
    assert launcher.grants == [(a["id"], 1, 1, ("node1",))] and store.get_job(big["id"])["state"] == "QUEUED"


def test_the_tail_wants_fewer_slots_and_the_queue_shows_held_and_wanted(tmp_path):
    store, launcher, sched = make(tmp_path, nodes=1)
    a = submit(store, command="true", array={"count": 50, "max_concurrent": 4})
    sched.cycle()
    sched.cycle()
    assert sched.slot_counts[a["id"]] == (1, 4) and "needs" in sched.waiting[a["id"]]
    launcher.reports[(a["id"], 1)] = {"phase": "running", "at": time.time(), "slots_wanted": 1,
                                      "slots": [{"slot": 0, "nodes": ["node0"], "state": "busy"}]}
    sched.cycle()
    assert sched.slot_counts[a["id"]] == (1, 1) and a["id"] not in sched.waiting


# ---- the policy: slots never delay the head ---------------------------------------------
def nodes(n, cpus=2):
    return [NodeView(f"n{i}", available={"CPU": float(cpus)}, total={"CPU": float(cpus)}) for i in range(n)]


def test_slot_leases_never_delay_the_head_randomized():
    """Backfilled jobs and array slots never push the head's reservation back, neither
    when admitted nor when their leases are renewed a cycle later (policy.renews): a slot
    of work that comes after the head is not renewed on the head's reserved nodes."""
    rng = random.Random(11)
    checked = 0
    for trial in range(400):
        cluster = nodes(rng.randint(2, 5), cpus=rng.choice([1, 2]))
        cpus = cluster[0].total["CPU"]
        running: list[Job] = []
        arr = rng.choice([100, 500, 900])  # the array job's priority: all its slots share it
        for k, n in enumerate(cluster):
            if rng.random() < 0.7:
                limit = rng.randint(10, 200)
                if rng.random() < 0.5:  # a slot of a running array job, leased at some point in the past
                    pj = Job(slot_id("arr", k), arr, 0, {"CPU": cpus}, limit=limit, parent="arr", slot=k)
                else:
                    pj = Job(f"r{k}", rng.choice([100, 500, 900]), 1 + k, {"CPU": cpus}, limit=limit)
                fit.reserve(cluster, [n.node_id], pj.bundle)
                running.append(replace(pj, started_at=-rng.randint(0, 5), nodes=(n.node_id,)))
        queued = [Job(f"q{k}", rng.choice([100, 500, 900]), 100 + k, {"CPU": rng.choice([1, cpus])},
                      count=rng.randint(1, len(cluster)), limit=rng.randint(5, 300)) for k in range(rng.randint(1, 5))]
        queued += [Job(slot_id("arr", 50 + k), arr, 0, {"CPU": cpus}, limit=30, parent="arr", slot=50 + k)
                   for k in range(rng.randint(0, 3))]
        p = plan(0, [n.copy() for n in cluster], running, queued)
        if p.reservation is None or p.reservation.at == math.inf:
            continue
        head = next(j for j in queued if j.id == p.reservation.job_id)
        # a cycle later (t=1): started jobs run; every running slot is renewed if policy.renews says so
        after = [n.copy() for n in cluster]
        later: list[Job] = []
        for r in running:
            if r.parent is None:
                later.append(r)
                continue
            renewed = renews(r, p.reservation, head)
            below = r.order_key > head.order_key  # a slot of work that comes after the head
            if below and set(r.nodes) & set(p.reservation.nodes):
                assert not renewed, f"trial {trial}: a slot on the head's reserved nodes was renewed"
            # a slot of work that comes first (higher priority, earlier) keeps its nodes: that is
            # the queue's order, not backfill, so only the others are renewed here
            later.append(replace(r, started_at=1) if renewed and below else r)
        for j, on in p.start:
            fit.reserve(after, on, j.bundle)
            later.append(replace(j, started_at=0, nodes=tuple(on)))
        found = shadow(1, after, later, head)
        assert found is not None and found[0] <= p.reservation.at, f"trial {trial}: the head was delayed"
        checked += 1
    assert checked > 50


def test_the_queue_api_shows_an_array_jobs_slots(tmp_path):
    from tests.test_protocol import _server

    http, store, launcher, sched = _server(tmp_path)
    sched.cluster.nodes = sched.cluster.nodes[:1]  # one node: the array gets one of its 3 slots
    r = http.post("/api/v1/jobs", json={"spec": {"name": "a", "command": "true",
                                                   "array": {"count": 9, "max_concurrent": 3}}})
    assert r.status_code == 201, r.text
    sched.cycle()
    sched.cycle()
    entries = http.get("/api/v1/queue").json()
    assert [(e["id"], e["slots"]) for e in entries] == [(r.json()["id"], "1/3 slots")]
    assert "needs 1 node" in entries[0]["reason"]
    detail = http.get(f"/api/v1/jobs/{r.json()['id']}").json()
    assert [s["slot"] for s in detail["slots"]] == [0] and detail["waiting_reason"]
    assert http.get(f"/api/v1/jobs/{r.json()['id']}/items").json() == []  # not listed yet
    wrong = http.get(f"/api/v1/jobs/{r.json()['id']}/items", params={"state": ["done", "finished"]})
    assert wrong.status_code == 400 and "state: unknown finished; allowed: pending, running" in wrong.text
    bad = http.post("/api/v1/jobs", json={"spec": {"name": "b", "command": "true",
                                                     "array": {"count": 2, "resume_from": "rb-nope"}}})
    assert bad.status_code == 400 and "array.resume_from: no job with id 'rb-nope'" in bad.text
