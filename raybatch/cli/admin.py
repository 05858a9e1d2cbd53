"""``raybatch admin token create|list|revoke``, ``raybatch admin whoami`` and ``raybatch audit``:
identities and the audit log (raybatch/server/routes/admin.py, raybatch/server/access.py).

    raybatch admin token create --user alice --workspace vision --role contributor --expires 30d
    raybatch admin token list [-o json]          # never a token
    raybatch admin token revoke tok-1a2b3c4d5e6f
    raybatch audit [--workspace W] [-o json]

The token ``create`` makes is printed once, alone on stdout (its details go to stderr), so
``TOKEN=$(raybatch admin token create ...)`` captures just it. The server keeps only its
SHA-256; a lost token is revoked and made again."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from raybatch.cli import render
from raybatch.cli.render import Output, OutputOpt
from raybatch.cli.session import call as _call
from raybatch.cli.session import client as _client
from raybatch.cli.session import fail as _fail
from raybatch.spec.units import parse_duration

admin_app = typer.Typer(help="Identities: API tokens for users and service principals, per workspace and role.",
                        no_args_is_help=True)
token_app = typer.Typer(help="API tokens: create (shown once), list, revoke.", no_args_is_help=True)
admin_app.add_typer(token_app, name="token")

ROLES = "reader | contributor | owner | admin"


@token_app.command("create")
def token_create(
    user: str = typer.Option(..., "--user", "-u", help="The user or service principal it is for."),
    workspace: str = typer.Option("default", "--workspace", "-w", help="Its workspace (every one for admin)."),
    role: str = typer.Option(..., "--role", "-r", help=ROLES),
    expires: Optional[str] = typer.Option(None, "--expires", help="Valid for this long (30d, 12h, 3600s); "
                                          "default: until revoked."),
    output: Output = OutputOpt,
) -> None:
    """Make an API token (a cluster admin, or an owner of the workspace). The token is printed
    once; the server keeps only its hash."""
    expires_in = None
    if expires is not None:
        try:
            expires_in = parse_duration(expires)
        except ValueError as e:
            _fail(f"--expires: {e}", code=2)
    made = _call(_client().create_token, user, role, workspace, expires_in)
    if output == Output.json:
        render.print_json(made)
        return
    print(made["token"], flush=True)
    where = "every workspace" if made["workspace"] == "*" else f"workspace '{made['workspace']}'"
    until = f"expires {render.ts(made['expires_at'])}" if made.get("expires_at") else "no expiry"
    render.err_console.print(f"{made['id']}: {made['user']}, {made['role']} in {where}, {until}. This is the only "
                             "time the token is shown: give it to its user (RAYBATCH_TOKEN).", highlight=False)


def tokens_table(rows: list[dict]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("ID", "USER", "WORKSPACE", "ROLE", "STATE", "CREATED", "BY", "EXPIRES"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["user"], r["workspace"], r["role"], r["state"], render.ts(r["created_at"]),
                  r["created_by"], render.ts(r["expires_at"]) if r.get("expires_at") else "-")
    return t


@token_app.command("list")
def token_list(
    workspace: Optional[str] = typer.Option(None, "--workspace", "-w", help="Only this workspace's tokens."),
    output: Output = OutputOpt,
) -> None:
    """API tokens (never the tokens themselves): an owner sees its workspace's, an admin all."""
    rows = _call(_client().tokens, workspace)
    if output == Output.json:
        render.print_json(rows)
    else:
        render.console.print(tokens_table(rows))


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., metavar="ID", help="The token's id (tok-...)."),
                 output: Output = OutputOpt) -> None:
    """Revoke a token: refused from the next request on (its web sessions end too)."""
    row = _call(_client().revoke_token, token_id)
    if output == Output.json:
        render.print_json(row)
    else:
        print(f"{row['id']} revoked ({row['user']}, {row['role']} in {row['workspace']})")


@admin_app.command("whoami")
def whoami(output: Output = OutputOpt) -> None:
    """Who the server takes this CLI's token for: user, role, workspace."""
    me = _call(_client().whoami)
    if output == Output.json:
        render.print_json(me)
    else:
        where = "every workspace" if me["workspace"] == "*" else f"workspace '{me['workspace']}'"
        print(f"{me['user']}: {me['role']} in {where}" + (f" (token {me['token_id']})" if me.get("token_id") else ""))


def audit(
    workspace: Optional[str] = typer.Option(None, "--workspace", "-w", help="Only this workspace's records "
                                            "(an owner always sees only its own)."),
    limit: int = typer.Option(200, help="At most this many, newest first."),
    output: Output = OutputOpt,
) -> None:
    """The audit log: every state-changing request (who, what, when, from where, the result)."""
    rows = _call(_client().audit, workspace, limit)
    if output == Output.json:
        render.print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("WHEN", "USER", "WORKSPACE", "REQUEST", "CLIENT", "STATUS"):
        t.add_column(col)
    for r in rows:
        t.add_row(render.ts(r["at"]), Text(r["user"] or "-"), Text(r["workspace"] or "-"),
                  Text(f"{r['method']} {r['path']}" + (f" -> {r['target']}" if r.get("target") else "")),
                  Text(r["client"] or "-"), str(r["status"]))
    render.console.print(t)
