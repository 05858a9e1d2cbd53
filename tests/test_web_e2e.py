"""The web view in a real browser (Debian's chromium through Playwright) against a real
2-node Ray cluster, a real server process and the real CLI: (a) the queue with three waiting
jobs and why they wait, (b) a running 2-node job's logs growing on its page without a reload,
(c) a failed job's page with the failing rank highlighted, (d) no way in without the token,
(e) `raybatch web ID`'s link logs a browser in once. A screenshot of each is kept
(tests/browser.py)."""

from __future__ import annotations

import json

import pytest

from tests.browser import browser, screenshot  # noqa: F401
from tests.conftest import RayTestCluster, ServerProcess, run_cli, stop_everything, wait_for

pytestmark = pytest.mark.timeout(180)

# prints a line every 0.3 s on each rank until the test creates the stop file (max_wall_clock bounds it)
TICKER = ('i=0; while [ ! -e "{stop}" ]; do echo "rank $RANK line $i"; '
          'echo "RAYBATCH_METRIC loss=$((1000 / (i + 1))) step=$i"; i=$((i+1)); sleep 0.3; done')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = RayTestCluster(nodes=2)
    state = tmp_path_factory.mktemp("web")
    server = ServerProcess(cluster, state).start()
    client = server.client()
    stop = state / "stop-ticker"
    ticker = client.submit({"name": "ticker", "experiment": "web", "nodes": 2, "max_wall_clock": "3m", "preemptible": False,
                            "command": TICKER.format(stop=stop)})
    box = {"cluster": cluster, "server": server, "client": client, "ticker": ticker.id, "stop": stop}
    try:
        yield box
    finally:
        stop.touch()
        try:
            stop_everything(server)
        finally:
            client.close()
            server.stop()
            cluster.shutdown()


def logged_in_page(browser, env):  # noqa: F811
    """A fresh browser context logged in through the login form with the token."""
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    assert page.goto(env["server"].url + "/web/").status == 401  # the login form, in place of the page
    page.fill("input[name=token]", env["server"].token)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url.endswith("/web/") and page.locator("input[name=token]").count() == 0
    return page


def test_a_queue_shows_waiting_jobs_in_order_with_reasons(env, browser):  # noqa: F811
    c = env["client"]
    wait_for(lambda: c.get(env["ticker"]).state == "RUNNING", 60, "the ticker to hold both nodes")
    waiting = [c.submit({"name": name, "experiment": "web", "nodes": nodes, "priority": prio, "command": "true"})
               for name, nodes, prio in (("low-one", 1, "low"), ("gang-of-two", 2, "normal"),
                                         ("urgent-one", 1, "high"))]
    ids = [w.id for w in waiting]
    seen = []

    def reasons_for_all() -> bool:
        seen[:] = [(e.id, e.reason) for e in c.queue()]
        return [i for i, reason in seen if reason != "not considered yet"] == [ids[2], ids[1], ids[0]]

    try:
        wait_for(reasons_for_all, 30, "the scheduler's reasons for the three waiting jobs")
    except AssertionError as e:
        raise AssertionError(f"{e}: the queue is {seen}, expected {ids[::-1]}") from None
    page = logged_in_page(browser, env)
    rows = page.locator("#queue tr")
    assert rows.count() == 4, page.locator("main").inner_text()  # the header and three jobs, highest priority first
    texts = [rows.nth(i).inner_text() for i in (1, 2, 3)]
    for text, job_id, name in zip(texts, (ids[2], ids[1], ids[0]), ("urgent-one", "gang-of-two", "low-one")):
        assert job_id in text and name in text
    # the reasons the scheduler gave when the page was asked for (or, had a cycle changed
    # their words in between, the ones it gives now)
    before, now = dict(seen), {e.id: e.reason for e in c.queue()}
    for text, job_id in zip(texts, (ids[2], ids[1], ids[0])):
        a, b = before.get(job_id), now.get(job_id)
        assert (a and a in text) or (b and b in text), (text, a, b)
    assert env["ticker"] in page.locator("#running").inner_text()
    screenshot(page, "web-a-queue")
    page.context.close()
    for job_id in ids:  # not needed further: the next tests' jobs need not wait for them
        c.cancel(job_id)


def test_b_running_job_page_follows_its_logs(env, browser):  # noqa: F811
    page = logged_in_page(browser, env)
    page.goto(env["server"].url + f"/web/jobs/{env['ticker']}")
    assert page.locator("#job-state").inner_text() == "RUNNING"
    ranks = page.locator("#ranks tr[data-rank]")
    assert ranks.count() == 2
    assert len({ranks.nth(i).locator("td.node").get_attribute("title") for i in (0, 1)}) == 2  # one per node
    page.evaluate("window.__notReloaded = true")
    log0, log1 = page.locator("#log-0-stdout"), page.locator("#log-1-stdout")
    wait_for(lambda: "rank 1 line" in log1.text_content(), 15, "rank 1's log on the page")
    before = len(log0.text_content())
    assert before > 0
    wait_for(lambda: len(log0.text_content()) > before + 40, 15, "rank 0's log to grow on the page")
    assert page.evaluate("window.__notReloaded === true")  # it grew in place
    assert "rank 0 line" in log0.text_content()
    screenshot(page, "web-b-running-logs")
    env["stop"].touch()  # let the ticker end, and the queue behind it run
    wait_for(lambda: env["client"].get(env["ticker"]).state == "SUCCEEDED", 60, "the ticker to end")
    wait_for(lambda: page.locator("#status-0-stdout").text_content() == "complete", 15, "the log to be complete")
    page.reload()
    assert page.locator("figure.chart figcaption").all_inner_texts() == ["loss"]  # its metric, plotted
    assert page.locator("figure.chart svg polyline").count() == 1
    page.context.close()


def test_c_failed_job_page_highlights_the_failing_rank(env, browser):  # noqa: F811
    c = env["client"]
    cmd = 'if [ "$RANK" = 1 ]; then echo "boom from rank 1 <b>not bold</b>" >&2; exit 7; fi; sleep 120'
    job = c.submit({"name": "fails", "experiment": "web", "nodes": 2, "command": cmd})
    done = c.wait(job.id, timeout=90)
    assert done.state == "FAILED" and done.exit_code == 7
    page = logged_in_page(browser, env)
    page.goto(env["server"].url + f"/web/jobs/{job.id}")
    failing = page.locator('#ranks tr[data-rank="1"]')
    assert "failing" in failing.get_attribute("class") and "failed the attempt" in failing.inner_text()
    assert "failing" not in page.locator('#ranks tr[data-rank="0"]').get_attribute("class")
    wait_for(lambda: "boom from rank 1" in page.locator("#log-1-stderr").text_content(), 15, "rank 1's stderr")
    assert page.locator("#log-1-stderr").text_content().strip() == "boom from rank 1 <b>not bold</b>"  # as text
    assert page.locator("#job-state").inner_text() == "FAILED"
    assert "rank 1 exited with code 7" in page.locator("dl.summary").inner_text()
    # its files, downloadable through the cookie
    link = page.locator("#files a", has_text="rank-1/stderr.txt")
    with page.expect_download() as dl:
        link.click()
    assert "boom from rank 1" in open(dl.value.path()).read()
    screenshot(page, "web-c-failed-rank")
    page.context.close()


def test_d_no_page_without_the_token(env, browser):  # noqa: F811
    ctx = browser.new_context()
    page = ctx.new_page()
    job_url = env["server"].url + f"/web/jobs/{env['ticker']}"
    resp = page.goto(job_url)
    assert resp.status == 401 and page.locator("input[name=token]").count() == 1
    assert "ticker" not in page.content()  # nothing of the page is shown
    screenshot(page, "web-d-no-token-401")
    page.fill("input[name=token]", "not-the-token")
    with page.expect_response(lambda r: r.request.method == "POST" and "/web/login" in r.url) as resp:
        page.click("button[type=submit]")
    assert resp.value.status == 401
    assert "Wrong token" in page.locator("#login-error").inner_text()
    screenshot(page, "web-d-wrong-token-401")
    assert not [k for k in ctx.cookies() if k["name"] == "raybatch_session"]
    resp = page.goto(job_url)
    assert resp.status == 401 and page.locator("input[name=token]").count() == 1  # still only the login form
    ctx.close()


def test_e_cli_link_logs_in_once(env, browser):  # noqa: F811
    server = env["server"]
    p = run_cli(server, "web", env["ticker"], check=True)
    url = p.stdout.strip()
    assert url.startswith(server.url + "/login/") and server.token not in p.stdout + p.stderr
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url)
    assert page.url == server.url + f"/web/jobs/{env['ticker']}"
    assert page.locator("h1").inner_text().startswith("ticker")
    cookie = next(k for k in ctx.cookies() if k["name"] == "raybatch_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and server.token not in cookie["value"]
    screenshot(page, "web-e-cli-link")
    ctx.close()
    again = browser.new_context()
    page = again.new_page()
    resp = page.goto(url)
    assert resp.status == 401 and "does not work" in page.content()
    screenshot(page, "web-e-cli-link-used-twice")
    resp = page.goto(server.url + f"/web/jobs/{env['ticker']}")
    assert resp.status == 401 and page.locator("input[name=token]").count() == 1  # not logged in
    again.close()
    assert run_cli(server, "web", "rb-00000000").returncode == 1  # an unknown job: an error, no link
    out = json.loads(run_cli(server, "web", "-o", "json", check=True).stdout)
    assert out["page"] == server.url + "/web/" and out["url"].startswith(server.url + "/login/")
