"""``raybatch node-setup --mounts FILE [--dry-run]``: Batch AI's cluster ``mountVolumes`` on
this node (raybatch.cluster.mounts). The cluster YAMLs' setup commands run it on every node
after installing raybatch; ``--dry-run`` prints what it would do, account keys masked."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from raybatch.cli import render


def node_setup(
    mounts: Path = typer.Option(..., "--mounts", help="Batch AI mountVolumes (YAML or JSON): azureFileShares, "
                                "azureBlobFileSystems, unmanagedFileSystems, and optionally root."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the steps (keys masked); run nothing."),
) -> None:
    """Mount the file systems of the --mounts file (Batch AI's mountVolumes) under one root
    on this node; mounted directories are skipped, so it can rerun. Steps are logged to
    ~/.raybatch/setup.log without secrets."""
    from raybatch.cluster import mounts as m  # noqa: PLC0415
    from raybatch.errors import SpecError  # noqa: PLC0415

    try:
        volumes = m.load(mounts)
    except SpecError as e:
        render.err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2)
    plans = m.plan(volumes)
    missing = m.missing_tools(plans)
    if dry_run:
        print(f"# mount root {volumes.root}; {len(plans)} mount(s) (dry run: nothing is run)")
        for p in plans:
            print(f"# {p.name}" + (f": skipped, {p.skip}" if p.skip else ""))
            for s in p.steps:
                print(m.redact(s.describe, volumes.secrets()))
        for line in missing:
            render.err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False)
        return
    log = m.SetupLog(m.default_log_path(), volumes.secrets(), echo=print)
    if not plans:
        log(f"{mounts}: nothing to mount")
        return
    if missing:
        for line in missing:
            log(f"cannot mount: {line}")
            render.err_console.print(f"[red]error:[/] {escape(line)}", highlight=False)
        raise typer.Exit(1)
    failures = m.run(plans, log)
    for line in failures:
        render.err_console.print(f"[red]error:[/] {escape(line)}", highlight=False)
    log(f"done: {len(plans) - len(failures)} of {len(plans)} mount(s) in place"
        + (f", {len(failures)} failed" if failures else ""))
    if failures:
        raise typer.Exit(1)
