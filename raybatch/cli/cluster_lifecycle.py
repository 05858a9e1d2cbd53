"""``raybatch cluster up|down|status|nodes|scale|logs|head-setup`` (raybatch.cluster.lifecycle
does the work; this module parses, shows progress and prints)."""

from __future__ import annotations

import enum
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from raybatch.cli import render
from raybatch.cli.cluster import cluster_app
from raybatch.client import Client, RaybatchError


class OnShrink(str, enum.Enum):
    requeue = "requeue"
    wait = "wait"


_NameOpt = typer.Argument(..., help="The cluster's name (its cluster_name; see ~/.raybatch/clusters/).")


def _fail(message: str, code: int = 1) -> None:
    render.err_console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _why(e: Exception) -> str:
    """One line for a failed cluster command: raybatch's own errors as they are; anything
    else (Ray's autoscaler, ARM's HttpResponseError, raybatch's ArmError) with its type;
    token-like values hidden."""
    from raybatch.cluster.lifecycle import ClusterError  # noqa: PLC0415
    from raybatch.runtime.environment import redact  # noqa: PLC0415

    text = str(e) if isinstance(e, (ClusterError, ValueError)) else f"{type(e).__name__}: {e}"
    return redact(text)


def _attempt(fn, *args, done=None, **kwargs):
    """``fn(*args, **kwargs)``; any failure becomes an ``error:`` line and exit 1 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - Ray's autoscaler, Azure and ssh fail in many ways
        if done is not None:
            done()
        _fail(_why(e))


def _steps():
    """A rich status line that shows the running step; each finished one stays printed."""
    status = render.err_console.status("", spinner="dots")
    status.start()
    last: list[str] = []

    def step(message: str) -> None:
        if last:
            render.err_console.print(f"[green]✓[/] {last[0]}", highlight=False)
            last.clear()
        if message.startswith("warning:"):
            render.err_console.print(f"[yellow]{message}[/]", highlight=False)
            return
        last.append(message)
        status.update(message)

    def done() -> None:
        status.stop()
        if last:
            render.err_console.print(f"[green]✓[/] {last[0]}", highlight=False)

    return step, done


def _client(name: str) -> Client:
    from raybatch.cluster.lifecycle import connect  # noqa: PLC0415

    from raybatch.cluster.lifecycle import ca_cert_of  # noqa: PLC0415

    url, token = _attempt(connect, name)
    return Client(url, token, auto_start=False, ca_cert=ca_cert_of(name))


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RaybatchError as e:
        _fail(str(e))


def _ago(t: Optional[float]) -> str:
    if not t:
        return "-"
    s = max(0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


@cluster_app.command("up")
def up(
    config_file: Path = typer.Argument(..., help="The cluster YAML (cluster_configs/*.yaml)."),
    mounts: Optional[Path] = typer.Option(None, "--mounts", help="File systems every node mounts "
                                          "(cluster_configs/mounts.example.yaml)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before creating cloud resources."),
    restart: bool = typer.Option(False, "--restart", help="Restart Ray on a running head (stops its jobs)."),
) -> None:
    """Create the cluster, or bring a running one in line with CONFIG_FILE (idempotent):
    pre-flight, render, Ray's autoscaler, state disk, server, SSH tunnel."""
    from raybatch.cluster import configs, lifecycle  # noqa: PLC0415

    try:
        kind = lifecycle.provider_kind(configs.load(config_file))
    except ValueError as e:
        _fail(str(e), code=2)
    if kind == "azure" and not yes and not typer.confirm(f"create or update Azure resources for {config_file}?"):
        raise typer.Exit(1)
    step, done = _steps()
    state = _attempt(lifecycle.up, config_file, mounts, step, restart=restart, done=done)
    done()
    name = state["name"]
    render.console.print(f"cluster {name} is up ({state['kind']})\nserver: {state['url']}\n"
                         f"use it:  raybatch --cluster {name} submit JOB.yaml", highlight=False)


@cluster_app.command("down")
def down(
    name: str = _NameOpt,
    workers_only: bool = typer.Option(False, "--workers-only", help="Keep the head (and its server)."),
    force: bool = typer.Option(False, "--force", help="Azure: detach the state disk even when the head "
                               "could not stop the server or unmount it (its last writes may be lost)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Remove the cluster (Azure: the server is stopped and the state disk unmounted,
    detached and kept)."""
    from raybatch.cluster import lifecycle  # noqa: PLC0415

    if not yes and not typer.confirm(f"tear down {'the workers of ' if workers_only else ''}cluster {name}?"):
        raise typer.Exit(1)
    step, done = _steps()
    _attempt(lifecycle.down, name, workers_only, step, force=force, done=done)
    done()
    render.console.print(f"cluster {name}: {'workers ' if workers_only else ''}down")


@cluster_app.command("status")
def status(name: str = _NameOpt, output: render.Output = render.OutputOpt) -> None:
    """steady or resizing; worker nodes idle/running/preparing/unusable/leaving/preempted;
    what the queue asks of the autoscaler; failed launches."""
    with _client(name) as client:
        info = _call(client.node_status)
    if output == render.Output.json:
        render.print_json(info)
        return
    c = info["counts"]
    render.console.print(f"cluster {name}: [bold]{info['phase']}[/]" + (f" ({info['why']})" if info["why"] else ""))
    render.console.print("nodes: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "preempted")
                         + f"; preempted {c.get('preempted', 0)} in the last {info['preempted_window_s'] / 3600:g} h",
                         highlight=False)
    if info.get("head"):
        h = info["head"]
        render.console.print(f"head:  {h['node_id'][:12]} {h.get('ip') or ''} {h['state']}", highlight=False)
    demand = info.get("demand")
    render.console.print("demand: " + (demand["summary"] if demand else "none (the server has no cluster config)"),
                         highlight=False)
    failures = info.get("launch_failures") or []
    if failures:
        render.console.print("launch failures:")
        for f in failures:
            render.console.print(f"  {f['node_type']}  {_ago(f.get('at'))}  {f['category']}: {f['message']}",
                                 highlight=False)


@cluster_app.command("nodes")
def nodes(
    name: str = _NameOpt,
    ended: bool = typer.Option(False, "--all", "-a", help="Also the nodes that are gone."),
    output: render.Output = render.OutputOpt,
) -> None:
    """Every node: type, spot, state since when, jobs on it, reason."""
    with _client(name) as client:
        rows = _call(client.nodes, ended=ended)
    if output == render.Output.json:
        render.print_json(rows)
        return
    t = Table(box=None, header_style="bold")
    for col in ("NODE", "TYPE", "SPOT", "STATE", "SINCE", "JOBS", "REASON"):
        t.add_column(col)
    ids = [n["node_id"] for n in rows]
    k = next((k for k in range(12, 65) if len({i[:k] for i in ids}) == len(set(ids))), 64)  # shortest unique prefix
    for n in rows:
        t.add_row(n["node_id"][:k] + (" (head)" if n["head"] else ""), n.get("node_type") or "-",
                  "yes" if n["spot"] else "", n["state"], _ago(n["state_since"]), ", ".join(n["jobs"]) or "-",
                  n.get("reason") or n.get("end_reason") or "")
    render.console.print(t)


@cluster_app.command("scale")
def scale(
    name: str = _NameOpt,
    node_type: str = typer.Option(..., "--type", "-t", help="The worker type to scale."),
    min_workers: int = typer.Option(..., "--min", min=0),
    max_workers: int = typer.Option(..., "--max", min=0),
    on_shrink: OnShrink = typer.Option(OnShrink.wait, "--on-shrink", help="Jobs on nodes beyond the new max: "
                                       "wait (no preemption) or requeue (preempted back to the queue now)."),
) -> None:
    """Set a worker type's min and max (min = max: a fixed size). The rendered config is
    rewritten; Ray's autoscaler and the server pick it up.

    Shrinking below the nodes in use: Ray's autoscaler removes idle nodes first; when more
    nodes are busy than the new max, it also removes busy ones. --on-shrink requeue
    preempts the jobs on the nodes beyond the max first (SIGTERM, grace period, back to
    the queue at their place, resuming from their checkpoints); with wait nothing is
    preempted, and a job whose node the autoscaler still removes ends as a node loss
    (retried under its infrastructure budget)."""
    from raybatch.cluster import lifecycle  # noqa: PLC0415

    step, done = _steps()
    path = _attempt(lifecycle.scale, name, node_type, min_workers, max_workers, step, done=done)
    done()
    requeued: list[str] = []
    if on_shrink == OnShrink.requeue:
        with _client(name) as client:
            requeued = _call(_requeue_beyond, client, node_type, max_workers)
    render.console.print(f"{node_type}: min {min_workers}, max {max_workers} (written to {path})"
                         + (f"; requeued {', '.join(requeued)}" if requeued else ""), highlight=False)


def _requeue_beyond(client: Client, node_type: str, max_workers: int) -> list[str]:
    """Preempt the jobs on the ``node_type`` nodes beyond the first ``max_workers`` (the
    busiest are kept): back to the queue at their place, resuming from their checkpoints."""
    nodes = [n for n in client.nodes() if n["node_type"] == node_type and not n["head"]]
    nodes.sort(key=lambda n: (-len(n["jobs"]), n["first_seen"]))
    extra = [n["node_id"] for n in nodes[max_workers:]]
    return client.requeue_nodes(extra) if extra else []


@cluster_app.command("logs")
def logs(
    name: str = _NameOpt,
    node: str = typer.Argument(..., help="A node id (a prefix is enough) or its IP address."),
    setup: bool = typer.Option(False, "--setup", help="The node's set-up log (~/.raybatch/setup.log)."),
) -> None:
    """A node's set-up log (raybatch node-setup: mounts, packages)."""
    from raybatch.cluster import lifecycle  # noqa: PLC0415

    if not setup:
        _fail("say which log: --setup (the node's set-up log); the Ray logs are in the Ray dashboard", code=2)
    with _client(name) as client:
        rows = _call(client.nodes, ended=True)
    match = [n for n in rows if n["node_id"].startswith(node) or n.get("ip") == node]
    if len(match) != 1:
        _fail(f"node {node!r}: " + ("no such node" if not match else f"{len(match)} nodes match; give more of the id")
              + f" (`raybatch cluster nodes {name}` lists them)")
    print(_attempt(lifecycle.setup_log, name, match[0]), end="")


@cluster_app.command("head-setup")
def head_setup(
    state_dir: str = typer.Option(..., "--state-dir", help="The server's state directory (the state disk)."),
    cluster_config: Path = typer.Option(..., "--cluster-config", help="The autoscaler's config on the head."),
    disk_lun: Optional[int] = typer.Option(None, "--disk-lun", help="Mount the state disk at this LUN first."),
    port: int = typer.Option(8765, "--port", help="The server's port on 127.0.0.1."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="The server serves HTTPS with this "
                                            "certificate (PEM; with --tls-key). Made here, with its key, "
                                            "if either is missing; kept otherwise."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="The certificate's private key (PEM, "
                                           "0600; it never leaves this node)."),
    print_unit: bool = typer.Option(False, "--print", help="Print the unit; make and install nothing."),
) -> None:
    """On the head node (the cluster YAML runs it): make the server's TLS certificate and key
    if missing, then install and start raybatch-server.service."""
    from raybatch.cluster import systemd  # noqa: PLC0415

    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together (the certificate and its private key)")
    tls = {k: str(v.expanduser().resolve()) for k, v in (("tls_cert", tls_cert), ("tls_key", tls_key)) if v}
    unit = systemd.render_unit(state_dir=state_dir, cluster_config=str(cluster_config.expanduser().resolve()),
                               port=port, **tls)
    if print_unit:
        print(unit, end="")
        return
    try:
        if tls:
            systemd.ensure_tls(Path(tls["tls_cert"]), Path(tls["tls_key"]))
        if disk_lun is not None:
            systemd.mount_state_disk(state_dir, disk_lun)
        path = systemd.install(unit)
    except Exception as e:  # noqa: BLE001 - sudo, systemctl, mkfs
        _fail(f"{type(e).__name__}: {e}")
    print(f"installed {path}" + ("" if disk_lun is not None else
                                 f" (the server starts once {state_dir} is mounted)"))

