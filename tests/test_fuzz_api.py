"""schemathesis over the server's own OpenAPI schema, against a real server process (issue
18, part 4): every operation, with a valid token and without one, must answer without a 5xx
and without the token anywhere in the response.

Bounded and deterministic for CI: a fixed number of examples per operation, derandomized
(the same cases on every run), no shrinking (a failure is reported with the request that
found it, not minimized: that costs minutes). The Ray cluster has no CPU, so no fuzzed job
can ever run (the server refuses it: "can never run") and nothing is left behind."""

from __future__ import annotations

import os
import time
from collections import Counter

import httpx
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")  # noqa: E402 - the test extra installs it
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core import NotSet  # noqa: E402

from raybatch.config import API_PREFIX  # noqa: E402
from tests.conftest import RayTestCluster, ServerProcess  # noqa: E402

pytestmark = pytest.mark.fuzz

# Per operation; the whole module stays well under 3 minutes. A longer, random exploration:
# RAYBATCH_FUZZ_EXAMPLES=500 RAYBATCH_FUZZ_SEED=<n> pytest tests/test_fuzz_api.py
EXAMPLES = int(os.environ.get("RAYBATCH_FUZZ_EXAMPLES", "60"))
EXAMPLES_NO_TOKEN = 8  # without a token most operations stop at the auth check
EXAMPLES_OTHER = 15    # as another workspace, and the owner on a job with a secret
SEED = os.environ.get("RAYBATCH_FUZZ_SEED")  # unset: derandomized, the same cases every run


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    cluster = RayTestCluster(nodes=1, cpus=0)  # nothing fuzzed can run
    server = ServerProcess(cluster, tmp_path_factory.mktemp("fuzz-server")).start()
    try:
        yield server
    finally:
        server.stop()
        cluster.shutdown()


def _schema(server: ServerProcess) -> dict:
    r = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {server.token}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def _check(case, resp, never: dict[str, str], problems: list[str], statuses: Counter) -> None:
    """A 5xx, or any of ``never`` (what -> text) in the response: a problem line, with the request."""
    statuses[resp.status_code] += 1
    body = "" if isinstance(case.body, NotSet) else f" body={str(case.body)[:300]!r}"
    where = f"{case.method} {case.formatted_path} query={case.query}{body}"
    if resp.status_code >= 500:
        problems.append(f"{resp.status_code} for {where}: {resp.text[:300]}")
    for what, text in never.items():
        if text in resp.text or text in str(resp.headers):
            problems.append(f"{what} in the response to {where}")


def _fuzz(server: ServerProcess, headers: dict[str, str], examples: int,
          job_id: str | None = None, modes: tuple[str, ...] = ("positive", "negative"),
          never: dict[str, str] | None = None) -> tuple[list[str], Counter]:
    """Run every operation ``examples`` times (with ``job_id``: only those of one job, with
    that real job's id); the problems found (one line each, with the request) and the
    statuses answered (status: count). ``never``: texts no response may hold (what -> text;
    the owner token always). ``modes``: schemathesis' valid requests (positive) and
    invalid ones (negative: wrong types, out-of-range numbers, missing fields)."""
    schema = schemathesis.openapi.from_dict(_schema(server))
    never = {"the owner token": server.token, **(never or {})}
    problems: list[str] = []
    statuses: Counter = Counter()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            if job_id is not None and "{job_id}" not in op.path:
                continue
            fixed = {"job_id": job_id} if job_id is not None else None
            strategy = st.one_of([op.as_strategy(GenerationMode(m), path_parameters=fixed) for m in modes])

            @seed(int(SEED or 0))
            @settings(max_examples=examples, deadline=None, derandomize=SEED is None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case) -> None:
                resp = case.call(base_url=server.url, headers=headers, session=session, timeout=30,
                                 allow_redirects=False)
                _check(case, resp, never, problems, statuses)

            run()
    return problems, statuses


def _coverage(server: ServerProcess, headers: dict[str, str], per_operation: int = 150) -> tuple[list[str], Counter]:
    """schemathesis' coverage phase: for each operation, deterministic requests at and past
    every declared boundary (minimum, maximum, lengths, patterns, enums, missing and
    unexpected values), not random ones: what finds a 2^70 offset or a 400-digit id."""
    schema = schemathesis.openapi.from_dict(_schema(server))
    never = {"the owner token": server.token}
    problems: list[str] = []
    statuses: Counter = Counter()
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            config = schema.config.generation_for(operation=op, phase="coverage")
            for n, case in enumerate(schema.iter_coverage_cases(op, generation_modes=modes, generation_config=config)):
                if n >= per_operation:
                    break
                resp = case.call(base_url=server.url, headers=headers, session=session, timeout=30,
                                 allow_redirects=False)
                _check(case, resp, never, problems, statuses)
    return problems, statuses


def test_coverage_with_token(fuzz_server):
    started = time.monotonic()
    problems, statuses = _coverage(fuzz_server, {"Authorization": f"Bearer {fuzz_server.token}"})
    print(f"{sum(statuses.values())} boundary requests with the token in {time.monotonic() - started:.1f} s: "
          f"{dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_fuzz_with_token(fuzz_server):
    started = time.monotonic()
    problems, statuses = _fuzz(fuzz_server, {"Authorization": f"Bearer {fuzz_server.token}"}, EXAMPLES)
    print(f"{sum(statuses.values())} requests with the token in {time.monotonic() - started:.1f} s: "
          f"{dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(sorted(set(problems)))
    # the fuzz reached the routes' own code: not everything was refused at validation
    assert sum(n for code, n in statuses.items() if code < 300) > 50, statuses


def test_fuzz_one_real_job(fuzz_server):
    """The routes of one job (logs, files, items, trials, cancel...) with a real job's id:
    past the 404, into their own handling of the query."""
    job = fuzz_server.client().submit({"name": "fuzzed", "command": "echo never runs: the cluster has no CPU"})
    started = time.monotonic()
    problems, statuses = _fuzz(fuzz_server, {"Authorization": f"Bearer {fuzz_server.token}"}, EXAMPLES, job.id)
    print(f"{sum(statuses.values())} requests about job {job.id} in {time.monotonic() - started:.1f} s: "
          f"{dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(sorted(set(problems)))
    assert sum(n for code, n in statuses.items() if code < 300) > 20, statuses


def test_fuzz_without_token(fuzz_server):
    started = time.monotonic()
    problems, statuses = _fuzz(fuzz_server, {}, EXAMPLES_NO_TOKEN)
    print(f"{sum(statuses.values())} requests without a token in {time.monotonic() - started:.1f} s: "
          f"{dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(sorted(set(problems)))
    assert statuses[401] > 20, statuses  # every /api/v1 route but /health wants the token
    r = httpx.get(fuzz_server.url + API_PREFIX + "/jobs", timeout=10)
    assert r.status_code == 401, r.text


def test_numbers_past_every_bound_in_the_query(fuzz_server):
    """Every integer or number in a query, at values schemathesis' generators seldom reach:
    2^70 (past SQLite's and a seek's 64 bits), -2^70, 1e400 (infinity as a float) and
    nan. Each is a 4xx naming the parameter, never a 5xx."""
    headers = {"Authorization": f"Bearer {fuzz_server.token}"}
    job = fuzz_server.client().submit({"name": "bounds", "command": "echo never runs"})
    problems, sent = [], 0
    for path, ops in _schema(fuzz_server)["paths"].items():
        url = fuzz_server.url + path.replace("{job_id}", job.id)
        if "{" in url:  # another kind of id: the fuzz above covers those routes
            continue
        for method, op in ops.items():
            for prm in op.get("parameters", []):
                s = prm.get("schema", {})
                types = {s.get("type"), *(a.get("type") for a in s.get("anyOf", []))}
                if prm["in"] != "query" or not types & {"integer", "number"}:
                    continue
                for value in (2**70, -(2**70), "1e400", "nan"):
                    r = httpx.request(method.upper(), url, params={prm["name"]: value}, headers=headers, timeout=30)
                    sent += 1
                    if r.status_code >= 500:
                        problems.append(f"{r.status_code} for {method.upper()} {path}?{prm['name']}={value}")
    assert sent > 40, sent
    assert not problems, "\n".join(problems)


SECRET = "fuzz-secret-value-9f3c1e"   # a job secret's value: no response may hold it
MARKER = "vision-private-7d2a"        # in another workspace's job: an nlp token must never see it


def test_fuzz_as_another_workspace_sees_no_secret_and_none_of_its_data(fuzz_server):
    """Issue 18: no response leaking a secret or another workspace's data. A job of
    workspace 'vision' holds a secret and a marked name; every operation is fuzzed with a
    contributor token of workspace 'nlp', and that job's routes with the owner's (who may
    see vision's job, never the secret's value)."""
    client = fuzz_server.client()
    theirs = client.submit({"name": MARKER, "workspace": "vision", "command": "echo never runs",
                            "secrets": {"API_KEY": SECRET}})
    owner = {"Authorization": f"Bearer {fuzz_server.token}"}
    made = httpx.post(fuzz_server.url + API_PREFIX + "/admin/tokens", headers=owner, timeout=30,
                      json={"user": "fuzzer", "workspace": "nlp", "role": "contributor"})
    assert made.status_code == 201, made.text
    nlp = {"Authorization": f"Bearer {made.json()['token']}"}
    never = {"the secret's value": SECRET, "vision's job name": MARKER, "vision's job id": theirs.id}
    problems, statuses = _fuzz(fuzz_server, nlp, EXAMPLES_OTHER, never=never)
    print(f"{sum(statuses.values())} requests as workspace nlp: {dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(sorted(set(problems)))
    assert statuses[403] > 5 and sum(n for code, n in statuses.items() if code < 300) > 20, statuses
    problems, statuses = _fuzz(fuzz_server, owner, EXAMPLES_OTHER, theirs.id, never={"the secret's value": SECRET})
    assert not problems, "\n".join(sorted(set(problems)))
    shown = httpx.get(fuzz_server.url + API_PREFIX + f"/jobs/{theirs.id}", headers=owner, timeout=30)
    assert MARKER in shown.text and SECRET not in shown.text  # the owner sees the job, not the value
