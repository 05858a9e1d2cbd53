"""``raybatch cost --by type|experiment|job [--since DURATION|TIME] [--prices PATH] [-o json]``:
node-hours, idle hours and hours lost to spot evictions from the server's records, and money
when a prices file exists (``raybatch cluster prices`` writes ``<RAYBATCH_HOME>/prices.yaml``).
The definitions are raybatch.scheduler.cost's; docs/azure.md ("Cost") says them for users."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from raybatch.cli import render
from raybatch.cli.session import call as _call
from raybatch.cli.session import client as _client
from raybatch.cli.session import fail as _fail
from raybatch.scheduler.cost import NO_JOB, CostGroup, CostReport, GroupBy
from raybatch.spec.units import parse_duration_or_time


HOW_TO_PRICE = ("no prices: `raybatch cluster prices --region <region>` writes {path} "
                "(or pass --prices FILE); the money columns appear then")


def parse_since(text: str, now: Optional[float] = None) -> float:
    """The window's start: a duration back from now ('7d', '12h', '90m') or a time with its
    time zone ('2025-01-31T00:00Z', '2025-01-31T08:00+01:00'); a time without one is an
    error (raybatch.spec.units.parse_duration_or_time, as a job's deadline)."""
    now = time.time() if now is None else now
    parsed = parse_duration_or_time(text, "--since")
    since = now - parsed if isinstance(parsed, float) else parsed.timestamp()
    if since > now:
        raise ValueError(f"--since '{text}': in the future")
    return since


def _hours(h: Optional[float]) -> str:
    return "-" if h is None else f"{h:,.2f}"


def _money(v: Optional[float], unpriced: Optional[float] = None) -> str:
    if v is None:
        return "-"
    return f"{v:,.2f}" + ("*" if unpriced else "")


def _sizes(g: CostGroup) -> str:
    names = sorted({(r.vm_size or "?") + (" spot" if r.spot else "") for r in g.rates if r.node_hours})
    return ", ".join(names) or "-"


def cost_table(rep: CostReport) -> Table:
    priced = rep.prices is not None
    t = Table(box=None, header_style="bold", show_footer=True, footer_style="bold")
    first = {"type": "NODE TYPE", "experiment": "EXPERIMENT", "job": "JOB"}[rep.by]
    cols = [first] + (["NAME"] if rep.by == "job" else []) + ["VM SIZE", "NODES", "NODE-HOURS", "IDLE H",
                                                               "EVICTION LOSS H"]
    if priced:
        cur = rep.prices.currency
        cols += [f"COST {cur}", f"EVICTION LOSS {cur}"]
    total = rep.total
    foot = {first: "total", "NODES": str(total.nodes), "NODE-HOURS": _hours(total.node_hours),
            "IDLE H": _hours(total.idle_hours), "EVICTION LOSS H": _hours(total.eviction_loss_hours)}
    if priced:
        foot[cols[-2]] = _money(total.cost, total.unpriced_hours)
        foot[cols[-1]] = _money(total.eviction_loss_cost)
    for c in cols:
        t.add_column(c, footer=foot.get(c, ""), justify="left" if c in (first, "NAME", "VM SIZE") else "right",
                     overflow="fold")
    for g in rep.groups:
        row = [g.key] + ([g.name or ("" if g.key == NO_JOB else "-")] if rep.by == "job" else [])
        row += [_sizes(g), str(g.nodes), _hours(g.node_hours), _hours(g.idle_hours), _hours(g.eviction_loss_hours)]
        if priced:
            row += [_money(g.cost, g.unpriced_hours), _money(g.eviction_loss_cost)]
        t.add_row(*row)
    return t


def show(rep: CostReport, prices_path: Path) -> None:
    c = render.console
    start = render.ts(rep.since) if rep.since is not None else "the first record"
    c.print(f"cost by {rep.by}, from {start} to {render.ts(rep.until)}", highlight=False)
    if not rep.groups:
        c.print("nothing recorded in this window")
    else:
        c.print(cost_table(rep))
    if rep.prices is not None:
        p = rep.prices
        c.print(f"prices: {escape(p.file)} ({p.region}, {p.currency} per hour, read {p.fetched_at})",
                highlight=False)
        if rep.total.unpriced_hours:
            c.print(f"* {rep.total.unpriced_hours:,.2f} node-hour(s) have no price and are not in the money "
                    "columns", highlight=False)
    else:
        c.print(escape(HOW_TO_PRICE.format(path=prices_path)), highlight=False)
    for note in rep.notes:
        c.print(f"note: {escape(note)}", highlight=False)


def cost(
    by: GroupBy = typer.Option(GroupBy.type, "--by", help="Group by node type, experiment or job."),
    since: Optional[str] = typer.Option(None, "--since", help="Only from then on: a duration back from now "
                                        "(7d, 12h) or a time with its time zone (2025-01-31T00:00Z, "
                                        "2025-01-31T08:00+01:00; a time without one is an error). "
                                        "Default: all."),
    prices: Optional[Path] = typer.Option(None, "--prices", help="A prices file (default: "
                                          "<RAYBATCH_HOME>/prices.yaml when it exists)."),
    output: render.Output = render.OutputOpt,
) -> None:
    """What the cluster cost: node-hours, idle hours and hours lost to spot evictions per node
    type, experiment or job; money when a prices file exists (`raybatch cluster prices`).
    Definitions: docs/azure.md, "Cost"."""
    from raybatch import config  # noqa: PLC0415
    from raybatch.scheduler.cost import PRICES_FILE, PricesError, load_prices  # noqa: PLC0415
    from raybatch.scheduler.cost import price as price_report  # noqa: PLC0415

    start = None
    if since is not None:
        try:
            start = parse_since(since)
        except ValueError as e:
            _fail(str(e), code=2)
    default_prices = config.home() / PRICES_FILE
    path = prices.expanduser() if prices is not None else default_prices
    table = None
    if prices is not None or default_prices.exists():
        try:
            table = load_prices(path)
        except PricesError as e:
            _fail(str(e), code=2)
    rep = _call(_client().cost, by.value, start)
    if table is not None:
        rep = price_report(rep, table, path)
    if output == render.Output.json:
        render.print_json(rep)
    else:
        show(rep, path)
