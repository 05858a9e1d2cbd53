"""Benchmark: the web view with 10,000 queued jobs.

A real server on the embedded local default (1 Ray node): one job that ran (its page has
ranks, logs, files and a metric), then 10,000 jobs that ask for a custom resource no node
has, so all stay queued and each needs a reason. Logged in with the token through the login
form (the cookie), it times, interleaved with the API call the CLI's ``raybatch queue``
makes (GET /api/v1/queue, 200 entries, with start estimates) in the same run:

- the queue page (/web/: the first 100 of the queue, with reasons and estimates) and a job
  page (/web/jobs/<id>: history, ranks, files, metrics): time to first byte and to the last
  byte of the HTML;
- in a real browser (Debian's chromium through Playwright, when it is installed): each page's
  first byte and full load (the load event: HTML, CSS and the log script), against the same
  browser loading GET /api/v1/queue's JSON (the token as a header);

printed as medians and as ratios to GET /api/v1/queue (goal: <= 2x).

    python benchmarks/bench_web.py [--jobs 10000] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

import httpx
from common import local_default

from raybatch.config import API_PREFIX

SPEC = {"name": "queued", "experiment": "bench", "command": "true",
        "resources": {"cpus": 1, "custom": {"bench_slot": 1}}}
RAN = {"name": "ran", "experiment": "bench", "command":
       "for i in 1 2 3 4 5; do echo step $i; echo RAYBATCH_METRIC loss=$((10 - i)) step=$i; done"}


def timed(http: httpx.Client, url: str, **kw) -> tuple[float, float, int]:
    """(seconds to the response's first byte, seconds to its last byte, bytes)."""
    t0 = time.perf_counter()
    with http.stream("GET", url, **kw) as r:
        ttfb = time.perf_counter() - t0
        body = r.read()
        total = time.perf_counter() - t0
        assert r.status_code == 200, (url, r.status_code, body[:300])
    return ttfb, total, len(body)


def browser_loads(base: str, token: str, paths: list[str], runs: int) -> dict[str, list[tuple[float, float]]]:
    """(first byte, load event) in chromium, seconds from navigation start, per path, after
    one warm-up: the pages logged in with the cookie, and GET /api/v1/queue itself (the
    bearer token as a header) as the baseline the same browser loads."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    api_path = API_PREFIX + "/queue"
    out: dict[str, list[tuple[float, float]]] = {p: [] for p in [api_path, *paths]}
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        web = b.new_context().new_page()
        web.goto(base + "/web/login")
        web.fill("input[name=token]", token)
        web.click("button[type=submit]")
        web.wait_for_url("**/web/")
        api = b.new_context(extra_http_headers={"Authorization": f"Bearer {token}"}).new_page()
        for k in range(runs + 1):
            for path in out:
                page = api if path == api_path else web
                page.goto(base + path, wait_until="load")
                nav = json.loads(page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])"))
                if k:
                    out[path].append((nav["responseStart"] / 1000, nav["loadEventEnd"] / 1000))
        b.close()
    return out


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with local_default(nodes=1) as (info, client):
        url, token = info["url"], info["token"]
        ran = client.submit(RAN)
        done = client.wait(ran.id, timeout=120)
        assert done.state == "SUCCEEDED", done.reason
        client.submit_many([{**SPEC, "name": f"q{k}"} for k in range(args.jobs)])
        deadline = time.monotonic() + 120
        while client.scheduler().queued < args.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        queued = client.scheduler().queued
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        web = httpx.Client(base_url=url, timeout=60)
        r = web.post("/web/login", data={"token": token, "next": "/web/"}, follow_redirects=True)
        assert r.status_code == 200 and "Queue" in r.text, r.status_code
        targets = {"GET /api/v1/queue": (api, API_PREFIX + "/queue"), "queue page /web/": (web, "/web/"),
                   "job page /web/jobs/ID": (web, f"/web/jobs/{ran.id}"),
                   "job list /web/jobs": (web, "/web/jobs")}
        samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in targets}
        for k in range(args.runs + 1):  # the first round warms up
            for name, (http, path) in targets.items():
                s = timed(http, path)
                if k:
                    samples[name].append(s)
        base_total = med([s[1] for s in samples["GET /api/v1/queue"]])
        print(f"web view: {queued} jobs queued, 1-node local default; medians of {args.runs} interleaved runs")
        print(f"  {'':26s} {'first byte':>11s} {'last byte':>10s} {'bytes':>8s}  ratio to the API (last byte)")
        for name, ss in samples.items():
            ttfb, total = med([s[0] for s in ss]) * 1000, med([s[1] for s in ss]) * 1000
            print(f"  {name:26s} {ttfb:8.1f} ms {total:7.1f} ms {ss[0][2]:8d}  {total / 1000 / base_total:5.2f}x"
                  + ("   goal <= 2x" if "api" not in name else ""))
        if shutil.which("chromium") or shutil.which("chromium-browser"):
            loads = browser_loads(url, token, ["/web/", f"/web/jobs/{ran.id}", "/web/jobs"], max(5, args.runs // 2))
            base_load = med([v[1] for v in loads[API_PREFIX + "/queue"]])
            print(f"  in chromium, from navigation start   {'first byte':>11s} {'loaded':>10s}  ratio to the API (loaded)")
            for path, values in loads.items():
                first, loaded = med([v[0] for v in values]) * 1000, med([v[1] for v in values]) * 1000
                print(f"  {path:37s} {first:8.1f} ms {loaded:7.1f} ms  {loaded / 1000 / base_load:5.2f}x"
                      + ("   goal <= 2x" if "api" not in path else ""))
        else:
            print("  (no chromium: the browser's full-load figures are left out)")
        api.close()
        web.close()


if __name__ == "__main__":
    main()
