"""What every command that talks to a server shares: the server the global options chose
(``--address``/``--token``/``--cluster``/``--ca-cert``, set by the app's callback), a client for it, and
one way to fail (a red ``error:`` line and an exit code)."""

from __future__ import annotations

from typing import Optional

import typer

from raybatch.cli import render
from raybatch.client import Client, RaybatchError


class _Opts:
    address: Optional[str] = None
    token: Optional[str] = None
    cluster: Optional[str] = None  # --cluster NAME: the server is reached through an SSH tunnel to its head
    ca_cert: Optional[str] = None  # --ca-cert / RAYBATCH_CA_CERT: verify an https server with this CA


OPTS = _Opts()


def client(auto_start: bool = False) -> Client:
    """A client of the chosen server (``auto_start``: start the local default if needed)."""
    try:
        return Client(OPTS.address, OPTS.token, auto_start=auto_start, ca_cert=OPTS.ca_cert)
    except RaybatchError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - starting the local default can fail many ways
        fail(f"could not start the local raybatch: {e}")


def show_link(url: str, about: str, open_: bool) -> None:
    """A one-time login link: printed (what it is on stderr), opened with ``--open``."""
    print(url, flush=True)
    render.err_console.print(about, highlight=False)
    if open_:
        open_link(url)


def open_link(url: str) -> None:
    import webbrowser  # noqa: PLC0415

    if not webbrowser.open(url):
        fail("no browser could be opened here: open the link above yourself (it works once)")


def fail(message: str, code: int = 1) -> None:
    # the message quotes user text (a job file's values, a server's reason): printed as is
    render.err_console.print(f"[red]error:[/] {render.esc(message)}", highlight=False)
    raise typer.Exit(code)


def call(fn, *args, **kwargs):
    """``fn(...)``; a server's refusal becomes an ``error:`` line and exit 1."""
    try:
        return fn(*args, **kwargs)
    except RaybatchError as e:
        fail(str(e))
