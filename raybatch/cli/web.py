"""``raybatch web [ID] [--open]``: the web view (the queue, or job ID's page) with the browser
logged in.

It asks the server for a one-time code (``POST /api/v1/login-codes``, kind ``web``) bound to
the page, and prints (``--open``: opens) ``<server>/login/<code>``: the server's
``GET /login/<code>`` (raybatch/server/web/routes.py) sets the web view's session cookie and
redirects to the page. The link works once, for a minute; the token itself is never printed
nor put in a URL."""

from __future__ import annotations

from typing import Optional
from urllib.parse import quote

import typer

from raybatch.cli import render
from raybatch.cli.render import Output, OutputOpt
from raybatch.cli.session import call as _call
from raybatch.cli.session import client as _client
from raybatch.cli.session import open_link, show_link
from raybatch.sweep import split_trial_id


def web(
    job_id: Optional[str] = typer.Argument(None, metavar="ID", help="A job (or a sweep's trial: its sweep): "
                                           "its page (default: the queue)."),
    open_: bool = typer.Option(False, "--open", help="Open the link in the browser (Python's webbrowser)."),
    output: Output = OutputOpt,
) -> None:
    """The web view with the browser logged in: a link (it works once, for a minute) to the
    queue or to job ID's page (history, ranks, live logs, files, metrics). Later visits log
    in with the token on the login form, or with a new link."""
    client = _client()
    page = "/web/"
    if job_id:
        parent, trial = split_trial_id(job_id)
        job = _call(client.get, parent)  # a clear error for an unknown id, before any code is made
        page = f"/web/jobs/{quote(job.id)}" + ("/trials" if trial is not None else "")
    url, expires_in = _call(client.login_link, page)
    if output == Output.json:
        render.print_json({"url": url, "page": client.address + page, "expires_in": expires_in})
        if open_:
            open_link(url)
    else:
        show_link(url, f"a one-time link (valid {expires_in:g} s) that logs the browser into the web view; "
                       f"then: {client.address + page}", open_)
