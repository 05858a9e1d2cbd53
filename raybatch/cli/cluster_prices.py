"""``raybatch cluster prices --region R [--file PATH] [--currency USD]``: the hourly prices of
a region's Linux VMs, dedicated and Spot, from Azure's public Retail Prices API
(raybatch.cluster.prices), written to ``prices.yaml`` (default ``<RAYBATCH_HOME>/prices.yaml``,
the file ``raybatch cost`` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raybatch.cli import render
from raybatch.cli.cluster import cluster_app


@cluster_app.command("prices")
def prices(
    region: str = typer.Option(..., "--region", help="Azure region name, e.g. westeurope (`az account list-locations`)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Where to write (default: <RAYBATCH_HOME>/prices.yaml, "
                                        "which `raybatch cost` reads)."),
    currency: str = typer.Option("USD", "--currency", help="3-letter currency code; USD is Azure's own, "
                                 "others are for reference."),
) -> None:
    """Write the hourly prices of a region's Linux VMs (pay-as-you-go and Spot) from Azure's
    public Retail Prices API (no login) for `raybatch cost`. List prices: an agreement's
    discounts are not in them."""
    from rich.progress import Progress, SpinnerColumn, TextColumn  # noqa: PLC0415

    from raybatch import config  # noqa: PLC0415
    from raybatch.cluster.prices import PricesFetchError, fetch_prices, new_client, write_prices  # noqa: PLC0415
    from raybatch.scheduler.cost import PRICES_FILE  # noqa: PLC0415

    path = file or config.home() / PRICES_FILE
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=render.err_console,
                      transient=True) as bar:
            task = bar.add_task(f"reading VM prices of {region}...", total=None)
            with new_client() as client:
                table = fetch_prices(region, currency, client=client, on_page=lambda n, items: bar.update(
                    task, description=f"reading VM prices of {region}: page {n}, {items} items"))
        written = write_prices(table, path)
    except PricesFetchError as e:
        render.err_console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1)
    except OSError as e:
        render.err_console.print(f"[red]error:[/] {escape(f'{path}: cannot write: {e.strerror or e}')}",
                                 highlight=False)
        raise typer.Exit(1)
    spot = sum(1 for p in table.prices.values() if p.spot is not None)
    dedicated = sum(1 for p in table.prices.values() if p.dedicated is not None)
    render.console.print(f"wrote {written}: {len(table.prices)} VM sizes in {table.region} "
                         f"({dedicated} dedicated, {spot} spot prices, {table.currency} per hour)", highlight=False)
