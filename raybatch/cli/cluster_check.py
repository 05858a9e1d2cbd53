"""``raybatch cluster check FILE [-o json]``: raybatch's rules for a cluster config
(raybatch.cluster.configs.lint, no network), then the pre-flight checks of an Azure config
against Azure (raybatch.cluster.preflight) — one line per problem, errors in red, warnings
in yellow; exit 1 if any error. ``cluster up`` runs the same checks first."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from raybatch.cli import render
from raybatch.cli.cluster import cluster_app


LINT = "lint"  # the field of raybatch's rules' problems in -o json (their message says the rest)


def _bad_file(path: Path, why: str) -> None:
    render.err_console.print(f"[red]error:[/] {escape(f'{path}: {why}')}", highlight=False)
    raise typer.Exit(2)


def read_config(path: Path) -> dict:
    """The cluster YAML as a dict; a clear exit 2 when it cannot be read."""
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(path.expanduser().read_text())
    except OSError as e:
        _bad_file(path, f"cannot read: {e.strerror or e}")
    except yaml.YAMLError as e:
        _bad_file(path, f"not valid YAML: {e}")
    if not isinstance(data, dict):
        _bad_file(path, "a cluster config is a YAML mapping")
    return data


@cluster_app.command("check")
def check(
    config_file: Path = typer.Argument(..., metavar="FILE", help="A Ray cluster YAML for Azure."),
    output: render.Output = render.OutputOpt,
) -> None:
    """raybatch's rules for the config (command lists, resources, spot marks, file_mounts),
    then the pre-flight: credentials, az login, resource group, VM sizes (availability,
    Spot, vCPUs/GPUs, Hyper-V generation) and quota (head + min_workers must fit,
    max_workers should), before anything is created."""
    from raybatch.cluster import configs, preflight  # noqa: PLC0415

    config = read_config(config_file)
    # a lint line names the file and the field itself: "<file>: <type> <field>: <what>"
    problems = [preflight.Problem("error", None, LINT, line) for line in configs.lint(config, str(config_file))]
    problems += preflight.check(config)
    if output == render.Output.json:
        print(preflight.to_json(problems))
    else:
        for p in problems:
            style = "red" if p.level == "error" else "yellow"
            text = p.message if p.field == LINT else str(p)
            render.console.print(f"[{style}]{p.level}:[/] {escape(text)}", highlight=False, soft_wrap=True)
        if not problems:
            render.console.print(f"{config_file}: no problems found", highlight=False)
    if any(p.level == "error" for p in problems):
        raise typer.Exit(1)
