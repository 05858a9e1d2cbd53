"""The cost report (raybatch.scheduler.cost) on a recorded cluster history: the node rows are
written by the real NodeRecorder (its idle/running seconds included) into a real store, the
attempts through the store's own calls, with times set to a made-up clock. Then the route and
``raybatch cost`` once, over HTTP, on that store's SQLite file."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest

from raybatch.scheduler import cost
from raybatch.scheduler.cost import NO_JOB, Prices, VmPrice
from raybatch.scheduler.nodes import NodeRecorder, Observed
from raybatch.state.store import Store

H = 3600.0
T0 = 1_700_000_000.0
NOW = T0 + 10 * H

CONFIG = {"head_node_type": "head", "available_node_types": {
    "head": {"resources": {"CPU": 0}, "node_config": {"azure_arm_parameters": {"vmSize": "Standard_D4s_v3"}}},
    "cpu2": {"resources": {"CPU": 2}, "node_config": {"azure_arm_parameters": {"vmSize": "Standard_D2s_v3"}}},
    "spot": {"resources": {"CPU": 2}, "node_config": {"azure_arm_parameters": {
        "vmSize": "Standard_D2s_v3", "priority": "Spot"}}},
}}
PRICES = Prices(region="westeurope", currency="USD", fetched_at="2025-01-31T00:00:00Z",
                prices={"Standard_D2s_v3": VmPrice(dedicated=0.10, spot=0.02)})


def live(nid, state, ntype="cpu2", head=False):
    return Observed(nid, state, node_type=ntype, ip=f"10.0.0.{len(nid)}", head=head)


def gone(nid, state, at, ntype="cpu2"):
    return Observed(nid, state, node_type=ntype, ended_at=at, end_reason="recorded")


def record_history(store: Store) -> None:
    """Hours since T0:  h (head) idle 0-10; n1 idle 0-1, running 1-3, idle 3-4, terminated at 4;
    s1 (spot) running 2-5, preempted at 5; n2 running 5-10; n3 idle 0-6, running 6-10."""
    rec = NodeRecorder(store, read=lambda: None, config=lambda: CONFIG, read_every=0, touch_every=1e9)
    h = live("h", "idle", ntype=None, head=True)
    steps = [
        (0, [h, live("n1", "idle"), live("n3", "idle")]),
        (1, [h, live("n1", "running"), live("n3", "idle")]),
        (2, [h, live("n1", "running"), live("n3", "idle"), live("s1", "running", "spot")]),
        (3, [h, live("n1", "idle"), live("n3", "idle"), live("s1", "running", "spot")]),
        (4, [h, gone("n1", "terminated", T0 + 4 * H), live("n3", "idle"), live("s1", "running", "spot")]),
        (5, [h, live("n3", "idle"), gone("s1", "preempted", T0 + 5 * H, "spot"), live("n2", "running")]),
        (6, [h, live("n3", "running"), live("n2", "running")]),
    ]
    for hours, observed in steps:
        rec.apply(observed, T0 + hours * H)


def add_attempt(store, job, n, nodes, started, running, ended=None, outcome=None, lost=None):
    store.add_attempt(job["id"], n, f"sid-{job['id']}-{n}", nodes=nodes)
    store.update_attempt(job["id"], n, running_at=T0 + running * H,
                         **({"ended_at": T0 + ended * H, "outcome": outcome} if ended is not None else {}),
                         **({"lost_nodes": lost} if lost else {}))
    with store._tx() as db:  # the made-up clock: add_attempt stamps the real time
        db.execute("UPDATE attempts SET started_at=? WHERE job_id=? AND n=?", (T0 + started * H, job["id"], n))


def record_jobs(store: Store) -> dict[str, str]:
    """Job A (experiment e1) ran on n1 1-3; job B (e2) on s1 2-5 (running from 2.5), evicted,
    then on n2 from 5, still running."""
    mk = lambda name, exp: store.create_job(name=name, experiment=exp, priority=0,  # noqa: E731
                                            spec={"name": name, "command": "true", "nodes": 1},
                                            job_dir_for=lambda i: f"/tmp/{i}")
    a, b = mk("train-a", "e1"), mk("train-b", "e2")
    add_attempt(store, a, 1, ["n1"], 1, 1.1, 3, "SUCCEEDED")
    add_attempt(store, b, 1, ["s1"], 2, 2.5, 5, "EVICTED")
    add_attempt(store, b, 2, ["n2"], 5, 5.2)
    return {"a": a["id"], "b": b["id"]}


@pytest.fixture
def recorded(tmp_path):
    store = Store(tmp_path / "rb.db")
    record_history(store)
    ids = record_jobs(store)
    yield store, ids
    store.close()


def make(store, by="type", since=None, now=NOW):
    return cost.report(store.nodes(ended=True), store.cost_attempts(since), store.cost_slots(since),
                       by=by, now=now, since=since)


def groups(rep):
    return {g.key: g for g in rep.groups}


def test_recorder_counts_seconds_per_state(recorded):
    store, _ = recorded
    rows = {r["node_id"]: r for r in store.nodes(ended=True)}
    assert rows["n1"]["idle_s"] == pytest.approx(2 * H) and rows["n1"]["running_s"] == pytest.approx(2 * H)
    assert rows["s1"]["running_s"] == pytest.approx(3 * H) and rows["s1"]["idle_s"] == 0
    assert rows["n3"]["idle_s"] == pytest.approx(6 * H) and rows["n3"]["state"] == "running"
    assert rows["n3"]["state_since"] == pytest.approx(T0 + 6 * H)
    assert rows["n2"]["idle_s"] == 0 and rows["n2"]["running_s"] == 0  # still in its first state


def test_by_type_node_hours_idle_and_eviction_loss(recorded):
    store, _ = recorded
    rep = make(store)
    g = groups(rep)
    assert set(g) == {"head", "cpu2", "spot"}
    assert g["head"].node_hours == pytest.approx(10) and g["head"].idle_hours == 0  # the head is never idle
    assert g["cpu2"].nodes == 3 and g["cpu2"].node_hours == pytest.approx(4 + 5 + 10)
    assert g["cpu2"].idle_hours == pytest.approx(2 + 6)
    assert g["spot"].node_hours == pytest.approx(3) and g["spot"].idle_hours == 0
    # evicted on the spot node: from its start of running (2.5) to its end (5)
    assert g["spot"].eviction_loss_hours == pytest.approx(2.5) and g["cpu2"].eviction_loss_hours == 0
    assert rep.total.node_hours == pytest.approx(32) and rep.total.idle_hours == pytest.approx(8)
    assert rep.total.eviction_loss_hours == pytest.approx(2.5) and rep.total.nodes == 5
    assert rep.prorated_nodes == 0 and cost.LOSS_NOTE in rep.notes
    assert rep.total.cost is None and all(gr.cost is None for gr in rep.groups)  # no prices, no money


def test_by_job_and_experiment_with_the_unattributed_rest(recorded):
    store, ids = recorded
    rep = make(store, by="job")
    g = groups(rep)
    assert g[ids["a"]].node_hours == pytest.approx(2) and g[ids["a"]].name == "train-a"
    assert g[ids["a"]].idle_hours is None and g[ids["a"]].eviction_loss_hours == 0
    assert g[ids["b"]].node_hours == pytest.approx(3 + 5) and g[ids["b"]].eviction_loss_hours == pytest.approx(2.5)
    # what no gang held: the head (10), n1 outside job A (2), n3 (10)
    assert g[NO_JOB].node_hours == pytest.approx(22) and g[NO_JOB].idle_hours == pytest.approx(8)
    assert rep.groups[-1].key == NO_JOB and rep.groups[0].key == ids["b"]
    assert rep.total.node_hours == pytest.approx(32)  # the same hours as by type, split otherwise
    b_rates = {(r.vm_size, r.spot): r.node_hours for r in g[ids["b"]].rates}
    assert b_rates == {("Standard_D2s_v3", True): pytest.approx(3), ("Standard_D2s_v3", False): pytest.approx(5)}
    e = groups(make(store, by="experiment"))
    assert e["e1"].node_hours == pytest.approx(2) and e["e2"].node_hours == pytest.approx(8)
    assert e["e2"].eviction_loss_hours == pytest.approx(2.5) and e[NO_JOB].node_hours == pytest.approx(22)


def test_since_window_clips_lives_attempts_and_losses(recorded):
    store, ids = recorded
    since = T0 + 4.5 * H
    rep = make(store, since=since)
    g = groups(rep)
    assert g["head"].node_hours == pytest.approx(5.5)
    assert g["cpu2"].nodes == 2 and g["cpu2"].node_hours == pytest.approx(5 + 5.5)  # n1 ended before the window
    # n3: running now (4 h in the window); its 6 idle hours before, pro-rated over [0, 6]: 1.5 h after 4.5
    assert g["cpu2"].idle_hours == pytest.approx(1.5)
    assert g["spot"].node_hours == pytest.approx(0.5) and g["spot"].eviction_loss_hours == pytest.approx(0.5)
    assert rep.prorated_nodes == 2 and any("pro-rated" in n for n in rep.notes)  # n3, and s1's running hours
    j = groups(make(store, by="job", since=since))
    assert ids["a"] not in j  # its attempt ended before the window
    assert j[ids["b"]].node_hours == pytest.approx(0.5 + 5) and j[ids["b"]].eviction_loss_hours == pytest.approx(0.5)
    assert j[NO_JOB].node_hours == pytest.approx(5.5 + 5.5)
    # a window after everything ended but the live nodes
    late = make(store, since=NOW - H)
    assert late.total.node_hours == pytest.approx(3) and late.total.eviction_loss_hours == 0


def test_money_with_prices_and_unpriced_sizes(recorded):
    store, _ = recorded
    rep = cost.price(make(store), PRICES, "/p/prices.yaml")
    g = groups(rep)
    assert g["cpu2"].cost == pytest.approx(19 * 0.10) and g["cpu2"].unpriced_hours == 0
    assert g["spot"].cost == pytest.approx(3 * 0.02) and g["spot"].eviction_loss_cost == pytest.approx(2.5 * 0.02)
    assert g["head"].cost == 0 and g["head"].unpriced_hours == pytest.approx(10)  # Standard_D4s_v3 has no price
    assert rep.total.cost == pytest.approx(1.9 + 0.06) and rep.total.unpriced_hours == pytest.approx(10)
    assert rep.prices.file == "/p/prices.yaml" and rep.prices.fetched_at == "2025-01-31T00:00:00Z"
    assert any("Standard_D4s_v3" in n for n in rep.notes)
    j = groups(cost.price(make(store, by="job"), PRICES, "p"))
    assert sum(g.cost for g in j.values()) == pytest.approx(rep.total.cost)
    assert PRICES.price("standard_d2s_v3", True) == 0.02 and PRICES.price(None, False) is None


def test_node_lost_counts_only_on_spot_nodes_and_open_attempts_end_with_their_job():
    nodes = [dict(node_id=n, node_type=t, vm_size="V", spot=int(t == "spot"), head=0, state="running",
                  state_since=T0, first_seen=T0, ended_at=None, idle_s=0, running_s=0)
             for n, t in (("d1", "ded"), ("s1", "spot"))]
    base = dict(started_at=T0, running_at=T0 + H, ended_at=T0 + 3 * H, lost_nodes=[], job_experiment="e",
                job_name="j", job_nodes=1, job_state="QUEUED", job_attempt=9)
    attempts = [dict(base, job_id="on-dedicated", n=1, nodes=["d1"], outcome="NODE_LOST", lost_nodes=["d1"]),
                dict(base, job_id="on-spot", n=1, nodes=["s1"], outcome="NODE_LOST"),
                dict(base, job_id="failed", n=1, nodes=["s1"], outcome="USER_ERROR"),
                # a deadline job's attempt: its newest checkpoint (at 2.5 h) was seen
                dict(base, job_id="checkpointed", n=1, nodes=["s1"], outcome="EVICTED", checkpoint_at=T0 + 2.5 * H),
                # never closed, its job since FAILED: it ends when the job did
                dict(base, job_id="stale", n=1, nodes=["d1"], ended_at=None, job_state="FAILED",
                     job_ended_at=T0 + 2 * H)]
    rep = cost.report(nodes, attempts, by="job", now=NOW)
    g = groups(rep)
    assert g["on-dedicated"].eviction_loss_hours == 0 and g["failed"].eviction_loss_hours == 0
    assert g["on-spot"].eviction_loss_hours == pytest.approx(2)
    assert g["checkpointed"].eviction_loss_hours == pytest.approx(0.5) and cost.LOSS_NOTE in rep.notes
    only_checkpointed = cost.report(nodes, [attempts[3]], by="job", now=NOW)
    assert only_checkpointed.total.eviction_loss_hours == pytest.approx(0.5) and not only_checkpointed.notes
    assert g["stale"].node_hours == pytest.approx(2)
    with pytest.raises(ValueError, match="by: 'rack'"):
        cost.report(nodes, attempts, by="rack", now=NOW)


def test_array_slots_are_the_gangs(tmp_path):
    store = Store(tmp_path / "rb.db")
    job = store.create_job(name="arr", experiment="e", priority=0, spec={"name": "arr", "command": "true"},
                           job_dir_for=lambda i: f"/tmp/{i}")
    add_attempt(store, job, 1, ["x"], 0, 0.1)
    store.add_slot(job["id"], 1, 0, ["x"])
    store.add_slot(job["id"], 1, 1, ["y", "z"])
    with store._tx() as db:
        db.execute("UPDATE slots SET granted_at=?, released_at=?, state='released' WHERE slot=0", (T0, T0 + H))
        db.execute("UPDATE slots SET granted_at=? WHERE slot=1", (T0 + 2 * H,))
    g = groups(make(store, by="job"))
    assert g[job["id"]].node_hours == pytest.approx(1 + 2 * 8) and g[job["id"]].nodes == 3
    store.close()


def test_older_store_files_get_the_counters(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, node_type TEXT, vm_size TEXT, spot INTEGER NOT NULL "
               "DEFAULT 0, head INTEGER NOT NULL DEFAULT 0, ip TEXT, state TEXT NOT NULL, state_since REAL NOT NULL, "
               "reason TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL, ended_at REAL, end_reason TEXT)")
    db.execute("INSERT INTO nodes (node_id, state, state_since, first_seen, last_seen) VALUES ('o', 'idle', 1, 1, 1)")
    db.commit()
    db.close()
    store = Store(path)
    row = store.nodes()[0]
    assert row["idle_s"] == 0 and row["running_s"] == 0
    store.put_node("o", state="running", state_since=5, idle_s=4.0)
    assert store.nodes()[0]["idle_s"] == 4.0
    store.close()


# ---- the route and the CLI, once, over HTTP on the store's file ------------------------
@pytest.fixture
def served(recorded, tmp_path):
    import uvicorn

    from tests.conftest import free_port
    from raybatch.server.app import ServerContext, create_app

    store, ids = recorded
    ctx = ServerContext(store=store, scheduler=SimpleNamespace(cycle_hooks=[], autoscaler=None),
                        jobs_root=str(tmp_path / "jobs"), code_root=tmp_path / "code")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx, "tok"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", ids
    server.should_exit = True
    thread.join(5)


def test_route_and_cli_on_a_real_store(served, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from raybatch.cli.main import app
    from raybatch.client import Client
    from raybatch.cluster.prices import write_prices

    url, ids = served
    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    with Client(url, "tok", auto_start=False) as c:
        rep = c.cost("job")  # hours to now (real time): every recorded node is long over or open
        assert {g.key for g in rep.groups} >= {ids["a"], ids["b"], NO_JOB} and rep.total.cost is None
        assert c.cost("job", since=T0 + 4.5 * H).groups[0].key == ids["b"]
        with pytest.raises(Exception, match="since: .* is in the future"):
            c.cost("type", since=time.time() + 3600)
    runner = CliRunner()
    base = ["--address", url, "--token", "tok", "cost"]
    out = runner.invoke(app, base + ["--by", "type"])
    assert out.exit_code == 0, out.output
    assert "NODE TYPE" in out.output and "cpu2" in out.output and "raybatch cluster prices --region" in out.output
    assert "COST" not in out.output  # no prices file: no money columns
    write_prices(PRICES, tmp_path / "home" / "prices.yaml")  # the default file `cost` reads
    out = runner.invoke(app, base + ["--by", "experiment", "-o", "json", "--since", "2023-11-14T22:13:20+00:00"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["by"] == "experiment" and data["since"] == T0
    assert data["prices"]["file"].endswith("prices.yaml") and data["total"]["cost"] > 0
    assert {g["key"] for g in data["groups"]} == {"e1", "e2", NO_JOB}
    out = runner.invoke(app, base + ["--since", "yesterday"])
    assert out.exit_code == 2 and "--since: 'yesterday' is neither a time nor a duration" in out.output
    out = runner.invoke(app, base + ["--since", "2023-11-14T22:13"])  # no time zone: an error, not a guess
    assert out.exit_code == 2 and "--since: '2023-11-14T22:13' has no time zone" in out.output
    (tmp_path / "bad.yaml").write_text("region: x\ncurrency: USD\nfetched_at: t\nprices: {V: {spot: -1}}\n")
    out = runner.invoke(app, base + ["--prices", str(tmp_path / "bad.yaml")])
    assert out.exit_code == 2 and "prices.V.spot" in out.output


def test_parse_since():
    from raybatch.cli.cost import parse_since

    assert parse_since("2h", now=NOW) == NOW - 2 * H
    assert parse_since("2023-11-14T22:13:20+00:00", now=NOW) == T0
    assert parse_since("2023-11-14T23:13:20+01:00", now=NOW) == T0
    with pytest.raises(ValueError, match="in the future"):
        parse_since("2999-01-01T00:00Z", now=NOW)
    # a time without a zone is an error naming the option, as a job's deadline is (one parser:
    # raybatch.spec.units.parse_duration_or_time), never a guess of local time
    with pytest.raises(ValueError, match="^--since: '2023-11-14' has no time zone"):
        parse_since("2023-11-14", now=NOW)
    with pytest.raises(ValueError, match="^--since: 'last week' is neither a time nor a duration"):
        parse_since("last week", now=NOW)


def test_a_packed_gang_counts_each_node_once(recorded):
    """``pack`` puts several bundles of one gang on one node: the attempt names it once per
    bundle, and the node's hours count once for the job."""
    store, ids = recorded
    packed = store.create_job(name="packed", experiment="e3", priority=0,
                              spec={"name": "packed", "command": "true", "nodes": 2},
                              job_dir_for=lambda i: f"/tmp/{i}")
    add_attempt(store, packed, 1, ["n3", "n3"], 6, 6.1)  # both bundles on n3, 6 h to now (10 h)
    j = groups(make(store, by="job"))
    assert j[packed["id"]].node_hours == pytest.approx(4) and j[packed["id"]].nodes == 1
    # n3's other 6 hours are nobody's: (no job) had the head (10), n1 outside job A (2) and n3 (10)
    assert j[NO_JOB].node_hours == pytest.approx(10 + 2 + 6)
    rep = make(store, by="job")
    assert rep.total.node_hours == pytest.approx(32)  # the cluster's hours, as by type
    e = groups(make(store, by="experiment"))
    assert e["e3"].node_hours == pytest.approx(4)


def test_one_group_by_and_totals_that_are_the_sum_of_their_groups(recorded):
    from raybatch.cli import cost as cli_cost
    from raybatch.server.routes import cost as route

    assert not hasattr(route, "GroupBy") or route.GroupBy is cost.GroupBy
    assert not hasattr(cli_cost, "By") and cli_cost.GroupBy is cost.GroupBy
    assert not hasattr(cost, "GROUP_BY") and not hasattr(cost, "_merge_rates")
    store, _ = recorded
    for by in cost.GroupBy:
        rep = make(store, by=by.value)
        assert rep.by == by.value
        for field in ("node_hours", "eviction_loss_hours"):
            assert getattr(rep.total, field) == pytest.approx(sum(getattr(g, field) for g in rep.groups))
            by_rate: dict = {}
            for g in rep.groups:
                for r in g.rates:
                    by_rate[(r.vm_size, r.spot)] = by_rate.get((r.vm_size, r.spot), 0.0) + getattr(r, field)
            assert {(r.vm_size, r.spot): getattr(r, field) for r in rep.total.rates} == pytest.approx(by_rate)
    with pytest.raises(ValueError, match="by: 'node' is not one of type, experiment, job"):
        make(store, by="node")
