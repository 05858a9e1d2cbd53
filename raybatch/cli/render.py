"""Turning API models into tables and text for the terminal (rich)."""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any, Iterable, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raybatch.models import JobDetail, JobSummary
from raybatch.scheduler.deadline import RULE_WORDS
from raybatch.spec.units import format_duration
from raybatch.state.states import preempted_words
from raybatch.sweep import split_trial_id

class Output(str, enum.Enum):
    """``-o``: every list/show command prints a table or JSON."""

    table = "table"
    json = "json"


OutputOpt = typer.Option(Output.table, "--output", "-o", help="table or json")


def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal:  # piped or captured: don't squeeze tables into 80 columns
        c = Console(stderr=stderr, width=200)
    return c


console = _console()
err_console = _console(stderr=True)

STATE_STYLE = {
    "QUEUED": "yellow", "STARTING": "cyan", "RUNNING": "blue", "SUCCEEDED": "green",
    "FAILED": "red", "CANCELLED": "magenta", "PREEMPTED": "yellow", "RESTARTING": "yellow",
}


def esc(value: Any) -> str:
    """User text (a command, a path, a reason, a resource name) as rich prints it
    literally: ``[/x]`` in a command must not end a style, or crash ``show``."""
    return escape(str(value))


def ts(t: Optional[float]) -> str:
    if not t:
        return "-"
    try:
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a deadline 1e22 s away is past any calendar
        return f"{t:.6g} (epoch s)"


def state(s: Any) -> str:
    s = getattr(s, "value", s)
    return f"[{STATE_STYLE.get(s, 'white')}]{s}[/]"


def print_json(data: Any) -> None:
    if isinstance(data, BaseModel):
        text = data.model_dump_json(indent=2)
    elif isinstance(data, list) and data and isinstance(data[0], BaseModel):
        text = json.dumps([d.model_dump(mode="json") for d in data], indent=2)
    else:
        text = json.dumps(data, indent=2, default=str)
    print(text)


def jobs_table(jobs: Iterable[JobSummary]) -> Table:
    jobs = list(jobs)
    # a WORKSPACE column once a job outside the default workspace is listed
    spaces = any(j.workspace != "default" for j in jobs)
    t = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", *(("WORKSPACE",) if spaces else ()), "EXPERIMENT", "STATE", "PRIO", "NODES",
                "ATTEMPT", "SUBMITTED", "DURATION", "EXIT"):
        t.add_column(col)
    for j in jobs:
        dur = (j.ended_at or dt.datetime.now().timestamp()) - j.started_at if j.started_at else None
        t.add_row(esc(j.id), esc(j.name), *((esc(j.workspace),) if spaces else ()), esc(j.experiment),
                  state(j.state), str(j.priority), str(j.nodes), str(j.attempt), ts(j.submitted_at),
                  format_duration(dur), "-" if j.exit_code is None else str(j.exit_code))
    return t


def _where(j: Any) -> str:
    """'experiment E', with the workspace when it is not the default one."""
    ws = getattr(j, "workspace", "default")
    return (f"workspace {esc(ws)}, " if ws != "default" else "") + f"experiment {esc(j.experiment)}"


def show_job(j: JobDetail) -> None:
    c = console
    c.print(f"[bold]{esc(j.id)}[/]  {esc(j.name)}  ({_where(j)})  {state(j.state)}")
    if j.reason:
        c.print(f"  reason:      {esc(j.reason)}")
    if j.waiting_reason:
        c.print(f"  waiting:     {esc(j.waiting_reason)}")
    if j.phase:
        line = j.phase.value
        if j.staging and j.staging.bytes_total:
            done, total = j.staging.bytes_done, j.staging.bytes_total
            line += f": {size(done)} of {size(total)} ({100 * done / total:.0f}%)"
        c.print(f"  phase:       {line}")
    if j.items is not None:
        c.print(f"  items:       {items_line(j.items)}")
    if j.trials is not None:
        c.print(f"  trials:      {trials_line(j.trials, j.best)}   (raybatch sweep show {j.id})")
    if j.preempt_requested:
        c.print(f"  stopping:    {esc(preempted_words(j.preempted_by))}")
    if j.preemptions:
        c.print(f"  preempted:   {j.preemptions} time(s); last: {esc(preempted_words(j.preempted_by))}")
    if j.evictions:
        limit = j.spec.retries.evictions
        c.print(f"  evicted:     {j.evictions} time(s) from spot nodes"
                + (f" (retries.evictions {limit})" if limit is not None else ""))
    if j.deadline is not None:
        for line in deadline_lines(j.deadline, j.state):
            c.print(line, highlight=False)
    s = j.spec
    c.print(f"  framework:   {esc(s.framework)}   nodes: {s.nodes} x {s.processes_per_node} process(es)"
            f"   per node: {esc(s.resources.as_ray_bundle())}   priority: {j.priority}")
    c.print(f"  command:     {esc(s.command)}")
    c.print(f"  submitted:   {ts(j.submitted_at)}   started: {ts(j.started_at)}   ended: {ts(j.ended_at)}"
            f"   exit code: {'-' if j.exit_code is None else j.exit_code}")
    c.print(f"  job dir:     {esc(j.job_dir)}")
    c.print(f"  logs:        {esc(j.logs_dir)}")
    c.print(f"  checkpoints: {esc(j.checkpoint_dir)}")
    if j.dashboard_url:  # a plain link; `raybatch dashboard ID` opens it with the browser logged in
        c.print(f"  ray job:     {esc(j.dashboard_url)}   (raybatch dashboard {esc(j.id)} --open)", highlight=False)
    for ident, path in j.outputs.items():
        c.print(f"  output {esc(ident)}: {esc(path)}")
    if s.array is not None:
        a = s.array
        source = a.over or (f"count {a.count}" if a.count is not None else f"{len(a.values or [])} values")
        c.print(f"  array:       {esc(source)}; {a.items_per_task} item(s) per task, up to {a.max_concurrent} slot(s), "
                f"error threshold {a.error_threshold}, item timeout {format_duration(a.item_timeout)}, "
                f"{a.retries} retries   (raybatch items {esc(j.id)})")
    if j.slots:
        c.print()
        c.print(f"[bold]Slots[/] (attempt {j.slots[0].attempt})")
        t = Table(box=None, header_style="bold", padding=(0, 1))
        for col in ("SLOT", "STATE", "NOW", "TASK", "NODES", "GRANTED", "RELEASED", "WHY"):
            t.add_column(col)
        for sl in j.slots:
            t.add_row(str(sl.slot), esc(sl.state), esc(sl.activity or "-"), "-" if sl.task is None else str(sl.task),
                      esc(", ".join(n[:12] for n in sl.nodes)), ts(sl.granted_at), ts(sl.released_at),
                      esc(sl.reason or "-"))
        c.print(t)
    c.print()
    c.print("[bold]History[/]")
    for t in j.transitions:
        src = getattr(t.from_state, "value", t.from_state) or "-"
        c.print(f"  {ts(t.at)}  {src:>10} -> {state(t.to_state)}  {esc(t.reason)}")
    for a in j.attempts:
        c.print()
        c.print(f"[bold]Attempt {a.n}[/]  ray job {esc(a.ray_job_id)}  {esc(a.outcome or 'in progress')}"
                f"  {ts(a.started_at)} -> {ts(a.ended_at)}" + (f"  ({esc(a.reason)})" if a.reason else ""))
        if a.deadline_rule is not None:
            c.print(f"  node class chosen by deadline rule {a.deadline_rule}: {RULE_WORDS[a.deadline_rule]}",
                    highlight=False)
        if a.lost_nodes:
            c.print(f"  lost rank(s) on node(s): {esc(', '.join(n[:12] for n in a.lost_nodes))}")
        if a.ranks:
            t = Table(box=None, header_style="bold", padding=(0, 1))
            for col in ("RANK", "ROLE", "NODE RANK", "LOCAL", "NODE ID", "IP", "HOST", "PID", "EXIT", "STDOUT"):
                t.add_column(col)
            for r in a.ranks:
                t.add_row(str(r.rank), esc(r.role or "rank"), str(r.node_rank), str(r.local_rank),
                          esc((r.node_id or "-")[:12]), esc(r.node_ip or "-"), esc(r.hostname or "-"),
                          str(r.pid or "-"), "-" if r.exit_code is None else str(r.exit_code), esc(r.stdout))
            c.print(t)


def deadline_lines(d, job_state: Any = None) -> list[str]:
    """A job's deadline for ``show``: the deadline and slack, the rule in force, p, C and d."""
    when = ts(d.deadline_at)
    if d.met is not None:
        first = f"  deadline:    {when}  ({'met' if d.met else 'missed'})"
    elif d.slack_s is not None:
        first = f"  deadline:    {when}  (slack {_signed(d.slack_s)}: D - t - (C - p))"
    else:
        first = f"  deadline:    {when}"
    overhead = (f"measured on {d.restarts_measured} restart(s)" if d.restarts_measured
                else "the default until it has restarted once")
    out = [first, f"  progress:    p {format_duration(d.progress_s)} of C {format_duration(d.runtime_estimate_s)}"
                  f" (to its newest checkpoint); restart overhead d {format_duration(d.restart_overhead_s)}"
                  f" ({overhead})"]
    if d.rule is not None:
        state_value = getattr(job_state, "value", job_state)
        act = ("its next start" if state_value in ("STARTING", "RUNNING") else "now")
        out.append(f"  nodes:       {esc(d.words)}; low_priority_nodes {d.low_priority_nodes} at {act}"
                   f" (where: {esc(d.where)}, spot available: {'yes' if d.spot_available else 'no'})")
    return out


def _signed(seconds: float) -> str:
    return ("-" if seconds < 0 else "") + format_duration(abs(seconds))


def deadline_cell(d) -> str:
    """A job's deadline in the queue table: the rule in force, the class, the slack."""
    if d is None:
        return "-"
    if d.rule is None:
        return f"slack {_signed(d.slack_s)}" if d.slack_s is not None else "-"
    return f"rule {d.rule} ({d.nodes}), slack {_signed(d.slack_s)}, p {format_duration(d.progress_s)}"


def _bundle(b: dict[str, float]) -> str:
    parts = []
    for k, v in b.items():
        parts.append(f"{v / 2**30:.3g}GiB" if k == "memory" else f"{v:g} {k}")
    return ", ".join(parts)


def items_line(i) -> str:
    """An array job's progress: done/failed/running of all, rate and ETA."""
    line = f"{i.done + i.skipped}/{i.total} done"
    if i.skipped:
        line += f" ({i.skipped} by the resumed job)"
    line += f", {i.failed} failed, {i.running} running"
    if i.rate:
        line += f", {i.rate * 60:.3g}/min"
    if i.eta_s is not None:
        line += f", ETA {format_duration(i.eta_s)}"
    return line


def trials_line(c, best=None) -> str:
    """A sweep's progress: trials ended of all, running, and the best so far."""
    line = f"{c.done + c.failed}/{c.total} ended ({c.done} done), {c.running} running"
    if best:
        line += f"; best {best['trial']} = {best['value']:.4g}"
    return line


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def show_sweep(job, trials) -> None:
    s = job.spec.sweep
    c = console
    c.print(f"[bold]{esc(job.id)}[/]  {esc(job.name)}  ({_where(job)})  {state(job.state)}")
    c.print(f"  objective:   {s.objective.goal} {esc(s.objective.primary_metric)}   sampling: {s.sampling_algorithm.type}"
            f"   early termination: {s.early_termination.type if s.early_termination else 'none'}")
    c.print(f"  limits:      {s.limits.max_total_trials} trials, {s.limits.max_concurrent_trials} at once, "
            f"{format_duration(s.limits.trial_timeout)} each")
    if job.reason:
        c.print(f"  reason:      {esc(job.reason)}")
    t = Table(box=None, header_style="bold", padding=(0, 1))
    for col in ("RANK", "TRIAL", "STATE", "BEST", "LAST", "REPORTS", "RUNS", "PARAMETERS"):
        t.add_column(col, overflow="fold")
    for tr in trials:
        t.add_row("-" if tr.rank is None else str(tr.rank), esc(tr.id), esc(tr.state),
                  "-" if tr.best is None else f"{tr.best:.4g}", "-" if tr.last is None else f"{tr.last:.4g}",
                  str(tr.reports), str(tr.runs), esc(_params(tr.params)))
    c.print(t)


def show_trial(tr) -> None:
    c = console
    c.print(f"[bold]{esc(tr.id)}[/]  {esc(tr.state)}" + (f"  (rank {tr.rank})" if tr.rank else ""))
    c.print(f"  parameters:  {esc(_params(tr.params))}")
    c.print(f"  {esc(tr.metric or 'metric')}:{' ' * max(1, 12 - len(tr.metric or 'metric'))}best "
            f"{'-' if tr.best is None else f'{tr.best:.6g}'}, last "
            f"{'-' if tr.last is None else f'{tr.last:.6g}'}, {tr.reports} report(s)")
    c.print(f"  runs:        {tr.runs}   exit code: {'-' if tr.exit_code is None else tr.exit_code}"
            f"   started: {ts(tr.started_at)}   ended: {ts(tr.ended_at)}")
    if tr.message:
        c.print(f"  message:     {esc(tr.message)}")
    job, _ = split_trial_id(tr.id)
    c.print(f"  logs:        raybatch logs {esc(tr.id)}   files: raybatch files {esc(tr.id)}   "
            f"metrics: GET /api/v1/jobs/{esc(job)}/metrics?trial={tr.n}")


def items_table(items) -> Table:
    t = Table(box=None, header_style="bold", padding=(0, 1))
    for col in ("TASK", "STATE", "RUNS", "EXIT", "SECONDS", "SLOT", "ITEMS", "MESSAGE"):
        t.add_column(col, overflow="fold")
    for i in items:
        shown = ", ".join(i.keys[:3]) + (f" and {len(i.keys) - 3} more" if len(i.keys) > 3 else "")
        t.add_row(str(i.task), esc(i.state), str(i.runs or "-"), "-" if i.exit_code is None else str(i.exit_code),
                  "-" if i.seconds is None else f"{i.seconds:.1f}", "-" if i.slot is None else str(i.slot),
                  esc(shown), esc(i.message or ""))
    return t


def queue_table(entries) -> Table:
    now = dt.datetime.now().timestamp()
    t = Table(box=None, header_style="bold")
    for col in ("POS", "ID", "NAME", "EXPERIMENT", "PRIO", "NODES", "PER NODE", "WAITING", "START BY", "DEADLINE",
                "WHY"):
        t.add_column(col, overflow="fold")
    for e in entries:
        start = "-"
        if e.estimated_start is not None:
            start = "now" if e.estimated_start <= now + 1 else ts(e.estimated_start)
        t.add_row(str(e.position), esc(e.id), esc(e.name), esc(e.experiment), str(e.priority), str(e.nodes),
                  esc(_bundle(e.per_node)), format_duration(e.waiting_s), start, esc(deadline_cell(e.deadline)),
                  esc(f"{e.slots}, next waits: {e.reason or '-'}" if e.slots else e.reason or "-"))
    return t


def scheduler_line(info) -> str:
    p = info.policy
    on = [k for k in ("backfill", "preemption", "fair_share") if p.get(k)]
    line = (f"scheduler: {info.queued} queued, {info.active} active; last cycle {info.last_cycle_ms:.1f} ms; "
            f"policy: {', '.join(on) or 'strict order'}")
    if p.get("quotas"):
        line += f"; quotas for {esc(', '.join(p['quotas']))}"
    if info.policy_error:
        line += f"\n[red]policy file error (previous policy kept):[/] {esc(info.policy_error)}"
    if info.autoscaler:
        line += f"\nautoscaler: {esc(info.autoscaler.get('summary', ''))}"
    return line


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def files_table(entries) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("PATH", "SIZE", "MODIFIED", "LOCATION"):
        t.add_column(col, justify="right" if col == "SIZE" else "left")
    for e in entries:
        t.add_row(esc(e.path), size(e.size), ts(e.modified), esc(e.location))
    return t


def datastores_table(rows: list[dict]) -> Table:
    t = Table(box=None, header_style="bold")
    for col in ("NAME", "URL", "ACCOUNT", "ENDPOINT", "CREDENTIAL", "DEFAULT"):
        t.add_column(col)
    for r in rows:
        t.add_row(esc(r["name"]), esc(r["url"]), esc(r.get("account") or "-"), esc(r.get("endpoint") or "-"),
                  esc(r.get("credential") or "-"), "yes" if r.get("default") else "")
    return t
