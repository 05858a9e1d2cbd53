"""``raybatch cluster``: create, inspect, scale and remove Ray clusters (Azure, or
fake_multinode on this machine) that run a raybatch server on their head.

The commands live beside this file, one module per concern; this one only holds the
Typer group they register on."""

from __future__ import annotations

import typer

cluster_app = typer.Typer(
    help="Ray clusters for raybatch: up, check, status, nodes, scale, logs, down; prices for `raybatch cost`.",
    no_args_is_help=True)

# the command modules register on cluster_app when imported
from raybatch.cli import cluster_check, cluster_lifecycle, cluster_prices  # noqa: E402,F401
