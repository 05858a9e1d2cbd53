"""``raybatch dashboard [ID]`` and ``raybatch env``: the Ray cluster under raybatch, for a
browser and for a user's own Ray driver.

``dashboard`` prints (``--open``: opens) a link that logs the browser into Ray's dashboard
(token auth, Ray 2.60) and lands on the cluster's overview or on job ID's latest attempt: a
one-time code from the server (``POST /api/v1/login-codes``, kind ``ray-dashboard``), redeemed
by ``GET /ray-login/<code>`` (raybatch/server/routes/dashboard.py). The Ray token is never
printed; the link works once, for a minute.

``env`` prints the ``export`` lines a Ray driver needs for this cluster (``eval "$(raybatch
env)"``): its GCS address, token mode and the token's *file*, and the raybatch server with
where its token is - never a token itself."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Optional

import typer

from raybatch import config
from raybatch.cli import render
from raybatch.cli.render import Output, OutputOpt
from raybatch.cli.session import OPTS
from raybatch.cli.session import call as _call
from raybatch.cli.session import client as _client
from raybatch.cli.session import fail as _fail
from raybatch.cli.session import open_link, show_link
from raybatch.client import ENV_CA_CERT, local_token_for
from raybatch.server.routes.dashboard import job_page_path
from raybatch.sweep import split_trial_id


def dashboard(
    job_id: Optional[str] = typer.Argument(None, metavar="ID", help="A job: its latest attempt's page (default: the overview)."),
    open_: bool = typer.Option(False, "--open", help="Open the link in the browser (Python's webbrowser)."),
    output: Output = OutputOpt,
) -> None:
    """The Ray dashboard, with the browser logged in: a link (it works once, for a minute)
    to the cluster's overview or to job ID's latest Ray job. The Ray token is never shown."""
    _refuse_through_a_tunnel("dashboard", "its Ray dashboard listens on the head only; "
                             "`ray dashboard <the cluster's YAML>` forwards it, then log in with the token dialog")
    client = _client()
    info = _call(client.ray_info)
    if not info.get("dashboard_url"):
        _fail("this raybatch server was started without a Ray dashboard URL (--dashboard-url)")
    dashboard_url = info["dashboard_url"].rstrip("/")
    sid = None
    if job_id:
        parent, _trial = split_trial_id(job_id)  # a sweep's trials run in the sweep's Ray job
        job = _call(client.get, parent)
        if not job.attempts:
            state = getattr(job.state, "value", job.state)
            _fail(f"job {job.id} has no Ray job yet (it is {state}): its first attempt has not started")
        sid = max(job.attempts, key=lambda a: a.n).ray_job_id
    next_path = job_page_path(sid) if sid else "/#/overview"
    page = dashboard_url + next_path
    login = info["auth_mode"] != "disabled"
    url, expires_in = _call(client.login_link, next_path, "ray-dashboard") if login else (page, None)
    if output == Output.json:
        render.print_json({"url": url, "page": page, "dashboard_url": dashboard_url, "ray_job": sid,
                           "login": login, "expires_in": expires_in})
    elif login:
        show_link(url, f"a one-time link (valid {expires_in:g} s) that logs the browser into the Ray dashboard; "
                       f"then: {page}", False)
    else:
        print(url, flush=True)
    if open_:
        open_link(url)


def _refuse_through_a_tunnel(command: str, why: str) -> None:
    """``--cluster``: the CLI reaches the server through an SSH tunnel to the head, so the
    head's loopback addresses (Ray's GCS, its dashboard) mean nothing here, and a login cookie
    set on this machine's 127.0.0.1 would go to whatever listens on it."""
    if OPTS.cluster:
        _fail(f"`raybatch {command}` is not available through --cluster {OPTS.cluster}: {why}")


def _token_file_in_use(client) -> Optional[Path]:
    """The raybatch token file the SDK reads (``$RAYBATCH_HOME/token``) when this CLI's token
    comes from it, i.e. not from ``--token``, ``RAYBATCH_TOKEN`` or ``--cluster``, and the
    SDK sends it to this server (only the state dir's own server gets it)."""
    if OPTS.token or os.environ.get(config.ENV_TOKEN):
        return None
    path = config.home() / "token"
    return path if path.is_file() and local_token_for(client.address) else None


def env_exports(info: dict[str, Any], raybatch_address: str, ray_token_file: Optional[str],
                raybatch_token_file: Optional[Path],
                ca_cert: Optional[str] = None) -> tuple[dict[str, str], list[str]]:
    """(variables to export, notes) for a Ray driver next to raybatch. Pure: the caller says
    where the tokens are; no token value goes in. ``ca_cert``: the CA file this CLI verifies
    an https server with, exported as RAYBATCH_CA_CERT so the driver's SDK verifies it too."""
    exports: dict[str, str] = {}
    notes: list[str] = []
    if info.get("ray_address"):
        exports["RAY_ADDRESS"] = info["ray_address"]
    if info.get("auth_mode") != "disabled":  # token, or a dashboard that did not answer: token mode is safe
        exports["RAY_AUTH_MODE"] = "token"
        if ray_token_file:
            exports["RAY_AUTH_TOKEN_PATH"] = ray_token_file
        else:
            notes.append("no Ray token file found here (the server's: "
                         f"{info.get('token_path') or 'none'}): set RAY_AUTH_TOKEN_PATH to the cluster's token file")
    exports[config.ENV_ADDRESS] = raybatch_address
    if ca_cert:
        exports[ENV_CA_CERT] = str(Path(ca_cert).expanduser().resolve())
    if raybatch_token_file is not None:
        exports[config.ENV_HOME] = str(raybatch_token_file.parent)
        notes.append(f"the raybatch SDK reads its token from ${config.ENV_HOME}/token ({raybatch_token_file})")
    else:
        notes.append(f"the raybatch token: as this shell has it ({config.ENV_TOKEN}, --token or --cluster); "
                     "not printed")
    return exports, notes


def _ray_token_file(info: dict[str, Any]) -> Optional[str]:
    """The Ray token file for a driver on this machine: ``RAY_AUTH_TOKEN_PATH`` if set, else
    the server's file if this machine has it (the local default, a fake cluster), else Ray's
    default ``~/.ray/auth_token`` if it exists."""
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), info.get("token_path"),
                      str(Path.home() / ".ray" / "auth_token")):
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser().resolve())
    return None


def env(output: Output = OutputOpt) -> None:
    """The exports a Ray driver of your own needs for this cluster: eval "$(raybatch env)".
    RAY_ADDRESS, RAY_AUTH_MODE=token and the Ray token's file, RAYBATCH_ADDRESS and where
    the raybatch token is; never a token itself."""
    _refuse_through_a_tunnel("env", "its Ray address is the head's own; run `raybatch env` on the head "
                             "(`raybatch cluster ...` gets you there), where Ray drivers of the cluster run")
    client = _client()
    info = _call(client.ray_info)
    exports, notes = env_exports(info, client.address, _ray_token_file(info), _token_file_in_use(client),
                                 client.ca_cert)
    if output == Output.json:
        render.print_json({"exports": exports, "notes": notes})
        return
    for note in notes:
        print(f"# {note}")
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
