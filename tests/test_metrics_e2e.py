"""GET /metrics on a real server over a real 2-node Ray cluster: a low-priority job that
logs a metric (shown while it runs), preempted by a high-priority one (which succeeds),
a failing job, the victim cancelled; then the counters are compared with what the API
says about the same jobs, before and after the server is killed and restarted."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(180)
OUTCOMES = ("SUCCEEDED", "USER_ERROR", "PREEMPTED", "CANCELLED", "NODE_LOST", "DRIVER_LOST", "START_FAILED")


def scrape(server) -> dict[str, list]:
    r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def samples(families, metric: str, **labels) -> list[float]:
    family = metric.removesuffix("_total").removesuffix("_count")
    return [s.value for s in families.get(family, []) if s.name == metric
            and all(s.labels.get(k) == v for k, v in labels.items())]


def job_metric(server, job_id: str, name: str):
    hits = samples(scrape(server), "raybatch_job_metric", job_id=job_id, name=name)
    return hits[0] if hits else None


def store_view(client) -> dict:
    """The same numbers from the API: every job, every attempt."""
    jobs = [client.get(j.id) for j in client.list(limit=1000)]
    outcomes: dict[str, int] = {}
    for j in jobs:
        for a in j.attempts:
            if a.outcome:
                outcomes[str(a.outcome)] = outcomes.get(str(a.outcome), 0) + 1
    states: dict[str, int] = {}
    for j in jobs:
        states[j.state.value] = states.get(j.state.value, 0) + 1
    return {"jobs": jobs, "outcomes": outcomes, "states": states,
            "attempts": sum(len(j.attempts) for j in jobs), "preemptions": sum(j.preemptions for j in jobs)}


def check_counters(fam, view) -> None:
    assert samples(fam, "raybatch_jobs_submitted_total") == [len(view["jobs"])]
    for state in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert samples(fam, "raybatch_jobs_finished_total", state=state) == [view["states"].get(state, 0)], state
    for state in ("QUEUED", "STARTING", "RUNNING"):
        assert samples(fam, "raybatch_jobs", state=state) == [view["states"].get(state, 0)], state
    for outcome in OUTCOMES:
        assert samples(fam, "raybatch_attempts_ended_total", outcome=outcome) == [view["outcomes"].get(outcome, 0)], \
            outcome
    assert samples(fam, "raybatch_preemptions_total", kind="job") == [view["preemptions"]]


@pytest.fixture(scope="module")
def run(server, client):
    """The scripted run; what each test checks is read from the server afterwards."""
    low = client.submit({"name": "low", "priority": "low", "nodes": 2, "grace_period": "5s",
                         "command": "echo RAYBATCH_METRIC loss=0.5 step=1; sleep 60"})
    # the per-job metric shows while the job runs (rank 0's last value)
    wait_for(lambda: job_metric(server, low.id, "loss") == 0.5, 120, "low's metric in /metrics")
    shown_while_running = client.get(low.id).state.value
    # one node is enough to preempt the 2-node gang; the failing job takes the other meanwhile
    high = client.submit({"name": "high", "priority": "high", "command": "sleep 0.2"})
    bad = client.submit({"name": "bad", "priority": "high", "command": "exit 3"})
    wait_for(lambda: client.get(low.id).preemptions == 1, 60, "low to be preempted")
    client.cancel(low.id)
    for job in (high, bad, low):
        client.wait(job.id, timeout=90, poll=0.2)
    # preempted, then cancelled: not running, so its metric is gone (within a tail poll)
    gone = wait_for(lambda: job_metric(server, low.id, "loss") is None, 10, "low's metric to go")
    return {"low": low, "high": high, "bad": bad, "shown_while_running": shown_while_running, "gone": gone}


def test_a_running_jobs_metric_shows_while_it_runs_and_goes_after(run):
    assert run["shown_while_running"] == "RUNNING"
    assert run["gone"] is True


def test_counters_match_the_store_and_histograms_saw_every_attempt(run, server, client):
    view = store_view(client)
    # the script did what it says: a success, a failure, a preemption, a cancel
    assert {j.id: j.state.value for j in view["jobs"]} == {
        run["high"].id: "SUCCEEDED", run["bad"].id: "FAILED", run["low"].id: "CANCELLED"}
    assert view["outcomes"].get("PREEMPTED") == 1 and view["outcomes"].get("USER_ERROR") == 1
    fam = scrape(server)
    check_counters(fam, view)
    # the server started before any job: every admission's wait, every end's run time
    assert samples(fam, "raybatch_job_wait_seconds_count") == [view["attempts"]]
    ended = sum(view["outcomes"].values())
    assert sum(samples(fam, "raybatch_job_run_seconds_count")) == ended
    assert samples(fam, "raybatch_queue_length") == [] and samples(fam, "raybatch_jobs", state="QUEUED") == [0]
    assert samples(fam, "raybatch_scheduler_cycles_total")[0] > 0
    assert samples(fam, "raybatch_scheduler_cycle_seconds_count")[0] > 0
    assert samples(fam, "raybatch_nodes", state="running") + samples(fam, "raybatch_nodes", state="idle")
    routes = {s.labels["route"] for s in fam["raybatch_api_request_seconds"]}
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/metrics"} <= routes
    assert not any(run["low"].id in r for r in routes)


def test_counters_still_match_the_store_after_a_restart(run, server, client):
    server.kill()
    server.start()
    fam = scrape(server)
    check_counters(fam, store_view(client))
    # histograms count from the server's start (Prometheus sees a reset)
    assert samples(fam, "raybatch_job_wait_seconds_count") == [0]
