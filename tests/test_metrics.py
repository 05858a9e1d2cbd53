"""GET /metrics without a cluster: the real app (create_app) over a real SQLite store,
driven by the real scheduler loop with a fake launcher (tests/test_scheduler_loop.py).
The counters are checked against the store read another way, also after a "restart"
(a new collector on the same file); the Grafana dashboard's queries against a real
scrape and Ray's own dashboards."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import time
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from raybatch.server.app import ServerContext, create_app
from raybatch.server.metrics import CollectorRegistry, Histograms, StoreCollector
from raybatch.state.states import JobState
from raybatch.storage.datastores import Datastores
from raybatch.spec.job import JobSpec
from tests.test_scheduler_loop import _running, make

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana-raybatch.json"


def submit(store, **fields):
    """A job in the store as POST /jobs makes it, its directory under the store's."""
    spec = JobSpec.model_validate({"name": "j", "command": "true", **fields})
    jobs = store.path.parent / "jobs"
    return store.create_job(name=spec.name, experiment=spec.experiment, priority=spec.priority_value,
                            spec=spec.model_dump(mode="json"), job_dir_for=lambda i: jobs / i)


def _app(tmp_path, nodes=2):
    store, launcher, sched = make(tmp_path, nodes=nodes)
    (tmp_path / "code").mkdir(exist_ok=True)
    ctx = ServerContext(store=store, scheduler=sched, jobs_root=str(tmp_path / "jobs"),
                        code_root=tmp_path / "code", datastores=Datastores)
    app = create_app(ctx, "tok")
    app.state.metrics.store.refresh()  # what main.build's start() does first: history read once
    http = TestClient(app)
    http.headers["Authorization"] = "Bearer tok"
    return http, store, launcher, sched, app.state.metrics


def scrape(http) -> dict[str, list]:
    """Family name -> its samples, from a real scrape."""
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families, metric, **labels) -> float:
    name = metric
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    hits = [s.value for s in families.get(family, []) if s.name == name
            and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, families.get(family))
    return hits[0]


def _done(launcher, job, attempt, outcome, code=None):
    launcher.reports[(job["id"], attempt)] = {"phase": "done", "at": time.time(), "outcome": outcome,
                                              "exit_code": code, "message": outcome.lower()}


def _script(http, store, launcher, sched):
    """A success, a failure, a preemption (the victim then cancelled while queued) and a
    job left queued: the same loop code as a real server, a fake Ray."""
    ok = submit(store, name="ok")
    bad = submit(store, name="bad")
    sched.cycle()
    _running(launcher, sched, store, ok, ["node0"])
    _done(launcher, ok, 1, "SUCCEEDED", 0)
    sched.cycle()
    # `bad` is admitted on node1 in the same cycles
    _done(launcher, bad, 1, "USER_ERROR", 3)
    for n in sched.cluster.nodes:
        n.available["CPU"] = 1.0
    sched.cycle()
    low = submit(store, name="low", nodes=2, priority="low")
    sched.cycle()
    _running(launcher, sched, store, low, ["node0", "node1"])
    high = submit(store, name="high", nodes=2, priority="high")
    sched.cycle()
    _done(launcher, low, 1, "PREEMPTED")
    for n in sched.cluster.nodes:
        n.available["CPU"] = 1.0
    sched.cycle()
    assert store.get_job(low["id"])["state"] == "QUEUED" and store.get_job(high["id"])["state"] == "STARTING"
    assert http.post(f"/api/v1/jobs/{low['id']}/cancel").status_code == 200
    # one more that waits (it asks for more nodes than there are): the queue is not empty
    submit(store, name="wide", nodes=3, experiment="wide-exp", priority=250)
    sched.cycle()
    return {"ok": ok, "bad": bad, "low": low, "high": high}


def _store_truth(store) -> dict:
    """What the store says, read through its own API (not the collector's queries)."""
    jobs = store.list_jobs(limit=100_000)
    outcomes: dict[str, int] = {}
    started = 0
    for j in jobs:
        for a in store.attempts(j["id"]):
            started += 1
            if a["outcome"]:
                outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
    states: dict[str, int] = {}
    for j in jobs:
        states[j["state"]] = states.get(j["state"], 0) + 1
    return {"jobs": len(jobs), "outcomes": outcomes, "states": states, "started": started,
            "preemptions": sum(j["preemptions"] for j in jobs)}


def test_counters_match_the_store_also_after_a_restart_and_histograms_follow_events(tmp_path):
    http, store, launcher, sched, metrics = _app(tmp_path)
    _script(http, store, launcher, sched)
    truth = _store_truth(store)
    assert truth["outcomes"] == {"SUCCEEDED": 1, "USER_ERROR": 1, "PREEMPTED": 1}, truth  # the script ran
    fam = scrape(http)
    assert value(fam, "raybatch_jobs_submitted_total") == truth["jobs"] == 5
    for state in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert value(fam, "raybatch_jobs_finished_total", state=state) == truth["states"].get(state, 0)
    for state in ("QUEUED", "STARTING", "RUNNING", "PREEMPTED", "RESTARTING"):
        assert value(fam, "raybatch_jobs", state=state) == truth["states"].get(state, 0)
    for outcome in ("SUCCEEDED", "USER_ERROR", "PREEMPTED", "CANCELLED", "NODE_LOST"):
        assert value(fam, "raybatch_attempts_ended_total", outcome=outcome) == truth["outcomes"].get(outcome, 0)
        # each ended attempt's run time was observed once, labelled by its outcome
        runs = [s for s in fam["raybatch_job_run_seconds"]
                if s.name == "raybatch_job_run_seconds_count" and s.labels["outcome"] == outcome]
        assert sum(s.value for s in runs) == truth["outcomes"].get(outcome, 0)
    assert value(fam, "raybatch_preemptions_total", kind="job") == truth["preemptions"] == 1
    # every admission's wait: ok, bad, low, high
    assert value(fam, "raybatch_job_wait_seconds_count") == truth["started"] == 4
    # the queue as the scheduler holds it, by priority and experiment
    assert value(fam, "raybatch_queue_length", priority="250", experiment="wide-exp") == 1
    assert sum(s.value for s in fam["raybatch_queue_length"]) == truth["states"]["QUEUED"] == 1
    assert value(fam, "raybatch_scheduler_cycles_total") == sched.stats["cycles"]
    assert value(fam, "raybatch_scheduler_cycle_seconds_count") >= sched.stats["cycles"] - 1 > 0

    # a restart: a new collector on the same file reads the same counters from the store
    fresh = StoreCollector(store.path, Histograms(CollectorRegistry()))
    fresh.refresh()
    again = {f.name: f.samples for f in fresh.collect()}
    for name in ("raybatch_attempts_ended", "raybatch_jobs_finished", "raybatch_jobs_submitted",
                 "raybatch_preemptions", "raybatch_jobs"):
        assert [(s.labels, s.value) for s in again[name]] == [(s.labels, s.value) for s in fam[name]
                                                              if not s.name.endswith("_created")], name

    # and counting goes on incrementally: one more cancel is one more, nothing twice
    wide = store.list_jobs(limit=1)[0]  # the newest: queued
    store.transition(wide["id"], JobState.CANCELLED, "cancelled by user while queued")
    fam2 = scrape(http)
    assert value(fam2, "raybatch_jobs_finished_total", state="CANCELLED") == truth["states"]["CANCELLED"] + 1
    assert value(fam2, "raybatch_attempts_ended_total", outcome="SUCCEEDED") == 1
    assert value(fam2, "raybatch_job_wait_seconds_count") == 4


def test_nodes_and_node_losses_match_the_store(tmp_path):
    http, store, _launcher, _sched, _metrics = _app(tmp_path)
    now = time.time()

    def node(node_id, state, **kw):
        store.put_node(node_id, state=state, state_since=now, first_seen=now, last_seen=now, **kw)

    node("n1", "running")
    node("n2", "idle")
    node("ip:10.0.0.5", "preparing")  # set up by the autoscaler, not in Ray yet: the newest row
    fam = scrape(http)
    assert [value(fam, "raybatch_nodes", state=s) for s in ("preparing", "idle", "running")] == [1, 1, 1]
    # it joins Ray (its ip: row goes, and the new row takes the freed rowid), one node is lost
    # without notice, one preempted
    store.delete_node("ip:10.0.0.5")
    node("n3", "idle")
    node("n1", "lost", ended_at=now, end_reason="the raylet died")
    fam = scrape(http)
    node("n2", "preempted", ended_at=now, end_reason="spot eviction")
    node("n3", "terminated", ended_at=now, end_reason="idle")
    fam = scrape(http)
    ended = {s: value(fam, "raybatch_nodes_ended_total", state=s) for s in ("lost", "preempted", "terminated")}
    assert ended == {"lost": 1, "preempted": 1, "terminated": 1}
    assert sum(s.value for s in fam["raybatch_nodes"]) == len(store.nodes()) == 0
    fresh = StoreCollector(store.path, Histograms(CollectorRegistry()))
    fresh.refresh()
    assert fresh.nodes_ended.counts == {"lost": 1, "preempted": 1, "terminated": 1}


def test_metrics_need_the_bearer_token_and_routes_are_templates(tmp_path):
    http, store, launcher, sched, _metrics = _app(tmp_path)
    job = submit(store)
    assert http.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    assert http.get("/api/v1/jobs/rb-nothere").status_code == 404
    bare = TestClient(http.app)
    r = bare.get("/metrics")
    assert r.status_code == 401 and "raybatch" not in r.text
    assert bare.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    fam = scrape(http)
    routes = {(s.labels["route"], s.labels["status"]) for s in fam["raybatch_api_request_seconds"]
              if s.name == "raybatch_api_request_seconds_count"}
    assert ("/api/v1/jobs/{job_id}", "2xx") in routes and ("/api/v1/jobs/{job_id}", "4xx") in routes
    assert ("/metrics", "4xx") in routes  # the refused scrapes
    assert not any(job["id"] in r or "rb-nothere" in r for r, _ in routes), routes


def test_staging_and_final_upload_are_read_from_the_drivers_reports(tmp_path):
    http, store, launcher, sched, _metrics = _app(tmp_path)
    job = submit(store)
    sched.cycle()
    key = (job["id"], 1)
    t = time.time()
    launcher.reports[key] = {"phase": "staging", "at": t,
                             "staging": {"bytes_done": 100, "bytes_total": 1000, "nodes_left": 1, "seconds": 2.5}}
    sched.cycle()
    launcher.reports[key] = {"phase": "running", "at": t, "ranks": [
        {"rank": 0, "node_rank": 0, "local_rank": 0, "node_id": "node0"}]}
    sched.cycle()
    fam = scrape(http)
    assert value(fam, "raybatch_staging_bytes_total") == 1000  # staging finished: its total
    assert value(fam, "raybatch_staging_seconds_count") == 1 and value(fam, "raybatch_staging_seconds_sum") == 2.5
    launcher.reports[key] = {"phase": "syncing", "at": time.time() - 4, "nodes_left": 1}
    sched.cycle()
    fam = scrape(http)
    assert value(fam, "raybatch_syncing_attempts") == 1
    assert value(fam, "raybatch_sync_lag_seconds") >= 4
    _done(launcher, job, 1, "SUCCEEDED", 0)
    sched.cycle()
    fam = scrape(http)
    assert value(fam, "raybatch_syncing_attempts") == 0 and value(fam, "raybatch_sync_lag_seconds") == 0
    assert value(fam, "raybatch_final_sync_seconds_count") == 1
    assert 3.5 <= value(fam, "raybatch_final_sync_seconds_sum") <= 30


def test_a_cycle_hook_error_in_metrics_never_reaches_the_scheduler(tmp_path):
    http, store, launcher, sched, metrics = _app(tmp_path)
    sched.stats = {"cycles": "not a number"}  # the hook reads it: int() fails inside the hook
    metrics.observer(sched)
    assert metrics.observer._failed and sched.hook_errors == {}


def _running_job(tmp_path, name: str):
    """A running job of experiment 'mnist' and its rank 0's (made) log directory."""
    http, store, launcher, sched, metrics = _app(tmp_path)
    job = submit(store, name=name, experiment="mnist")
    sched.cycle()
    _running(launcher, sched, store, job, ["node0"])
    rank0 = Path(store.get_job(job["id"])["job_dir"]) / "stdouterr" / "attempt-1" / "rank-0"
    rank0.mkdir(parents=True)
    return http, launcher, sched, metrics, job, rank0


def test_a_running_jobs_logged_metrics_show_while_it_runs_and_go_when_it_ends(tmp_path):
    http, launcher, sched, metrics, job, rank0 = _running_job(tmp_path, "train")
    lines = [{"name": "loss", "value": 0.9, "step": 0}, {"name": "loss", "value": 0.4, "step": 1},
             {"name": "acc", "value": 0.8, "step": 1}]
    (rank0 / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"name": "lo')
    metrics.tail.poll()
    fam = scrape(http)
    assert value(fam, "raybatch_job_metric", job_id=job["id"], name="loss", experiment="mnist") == 0.4
    assert value(fam, "raybatch_job_metric", job_id=job["id"], name="acc") == 0.8
    with open(rank0 / "metrics.jsonl", "a") as f:  # the half-written line completes
        f.write('ss", "value": 0.25, "step": 2}\n')
    metrics.tail.poll()
    assert value(scrape(http), "raybatch_job_metric", job_id=job["id"], name="loss") == 0.25
    _done(launcher, job, 1, "SUCCEEDED", 0)
    sched.cycle()
    metrics.tail.poll()
    assert not scrape(http)["raybatch_job_metric"]


def test_a_metrics_file_replaced_by_a_link_is_not_read(tmp_path):
    """A job that made its metrics file (or its rank's log directory) a link, to another
    job's metrics or any file of the head, must not get those values shown as its own."""
    http, launcher, sched, metrics, job, rank0 = _running_job(tmp_path, "linker")
    other = tmp_path / "other-metrics.jsonl"
    other.write_text(json.dumps({"name": "secret_metric", "value": 42.0}) + "\n")
    (rank0 / "metrics.jsonl").symlink_to(other)
    metrics.tail.poll()
    assert not scrape(http).get("raybatch_job_metric"), "read through a link"
    assert "symbolic link" in metrics.tail._errors[job["id"]], metrics.tail._errors
    # the whole log directory replaced by a link to another job's
    elsewhere = tmp_path / "elsewhere" / "attempt-1" / "rank-0"
    elsewhere.mkdir(parents=True)
    (elsewhere / "metrics.jsonl").write_text(other.read_text())
    stdouterr = rank0.parent.parent
    shutil.rmtree(stdouterr)
    stdouterr.symlink_to(tmp_path / "elsewhere")
    metrics.tail.poll()
    assert not scrape(http).get("raybatch_job_metric"), "read through a linked log directory"


# ---- the Grafana dashboard ------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names (in {...} or by/on/without (...)), ranges or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # strings
    e = re.sub(r"\{\{?[^}]*\}?\}", "", e)                        # label matchers (Ray's templates too)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)                             # ranges, subqueries
    e = re.sub(r"\$\{?\w+\}?", "", e)                            # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        word = m.group(0)
        if rest.startswith("(") or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+e\d*", word):
            continue
        names.add(word)
    return names


def ray_metric_names() -> set[str]:
    """Every metric Ray's own Grafana dashboards (shipped in the ray wheel) query."""
    from ray.dashboard.modules.metrics import dashboards
    from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig

    names: set[str] = set()
    for mod in pkgutil.iter_modules(dashboards.__path__):
        if not mod.name.endswith("_panels"):
            continue
        module = importlib.import_module(f"{dashboards.__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, DashboardConfig):
                panels = list(obj.panels or []) + [p for row in (obj.rows or []) for p in row.panels]
                for p in panels:
                    for t in p.targets:
                        names |= metric_names(t.expr)
    return names


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    panels = []
    for p in board["panels"]:
        panels.append(p)
        panels += p.get("panels", [])  # collapsed rows hold theirs
    exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
    for var in board.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            exprs.append(re.sub(r"^\w+\((.*)\)$", r"\1", re.sub(r"label_values\((.*?)(,\s*\w+)?\)$", r"\1", q)))
    return exprs


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(raybatch_job_wait_seconds_bucket'
                        '{experiment=~"$exp"}[$__rate_interval])))') == {"raybatch_job_wait_seconds_bucket"}
    assert metric_names("sum(ray_tasks{{State=~\"RUNNING\",{global_filters}}}) by (State) / on() "
                        "(sum(raybatch_jobs) or vector(0))") == {"ray_tasks", "raybatch_jobs"}


def test_every_grafana_query_reads_a_metric_a_real_scrape_or_ray_has(tmp_path):
    http, store, launcher, sched, _metrics = _app(tmp_path)
    _script(http, store, launcher, sched)
    text = http.get("/metrics").text
    scraped: set[str] = set()
    for f in text_string_to_metric_families(text):
        scraped |= {f.name} | {s.name for s in f.samples}
        if f.type == "counter":
            scraped.add(f.name + "_total")
        if f.type == "histogram":
            scraped |= {f.name + s for s in ("_bucket", "_sum", "_count")}
    ray = ray_metric_names()
    assert {"ray_tasks", "ray_node_cpu_utilization", "autoscaler_active_nodes"} <= ray, sorted(ray)[:20]
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = used - scraped - ray
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"
    # it shows raybatch's own and Ray's
    assert any(n.startswith("raybatch_") for n in used) and any(n in ray for n in used)
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board.get("uid") and board.get("schemaVersion")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
