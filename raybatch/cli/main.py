"""``raybatch``: submit, watch and manage jobs.

    raybatch submit recipes/pytorch-digits-ddp/job.yaml --wait
    raybatch list | show ID | logs ID --follow | cancel ID | wait ID | queue
    raybatch files ID [--path P] | download ID DEST [--path P] | datastores
    raybatch up [--nodes 2] | down | status
    raybatch cost --by type|experiment|job [--since 7d]

With no ``--address`` (or RAYBATCH_ADDRESS), commands talk to the embedded local
default under RAYBATCH_HOME (~/.raybatch); ``submit`` starts it when needed.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from raybatch.cli import render
from raybatch.cli.render import Output, OutputOpt
from raybatch.cli.session import OPTS
from raybatch.cli.session import call as _call
from raybatch.cli.session import client as _client
from raybatch.cli.session import fail as _fail
from raybatch.client import Client, RaybatchError, exit_code_for
from raybatch.runtime.protocol import Phase
from raybatch.sweep import split_trial_id
from raybatch.spec.loader import SpecError, load_job_document, read_document
from raybatch.state.states import JobState

app = typer.Typer(
    help="raybatch: queue, gang-schedule and run training jobs on Ray from one job file.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


class Stream(str, enum.Enum):
    stdout = "stdout"
    stderr = "stderr"


@app.callback()
def main(
    address: Optional[str] = typer.Option(
        None, "--address", envvar="RAYBATCH_ADDRESS",
        help="URL of a raybatch server (default: the embedded local one)."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="RAYBATCH_TOKEN", help="Bearer token of that server.", show_default=False),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", envvar="RAYBATCH_CLUSTER",
        help="A cluster `raybatch cluster up` made: talk to the server on its head."),
    ca_cert: Optional[str] = typer.Option(
        None, "--ca-cert", envvar="RAYBATCH_CA_CERT",
        help="CA certificate (PEM) to verify an https server with (a cluster's self-signed one)."),
) -> None:
    OPTS.address, OPTS.token = address, token
    OPTS.cluster = cluster
    OPTS.ca_cert = ca_cert
    if cluster:
        from raybatch.cluster.lifecycle import ClusterError, ca_cert_of, connect  # noqa: PLC0415

        try:
            OPTS.address, cluster_token = connect(cluster)
        except ClusterError as e:
            _fail(str(e))
        OPTS.token = token or cluster_token
        OPTS.ca_cert = ca_cert or ca_cert_of(cluster)  # its server's self-signed certificate (HTTPS)


MountRootOpt = typer.Option(
    None, "--mount-root", help="Batch AI job.json: where $AZ_BATCHAI_MOUNT_ROOT's file systems are "
    "mounted on every node.")


def _load(job_file: Path, overrides: List[str], mount_root: Optional[str] = None):
    """The job file (raybatch, Batch AI job.json or Azure ML command job), validated; a bad
    one exits 2 before any server is contacted. Conversion warnings go to stderr."""
    try:
        spec, notes = load_job_document(job_file, overrides, mount_root)
    except SpecError as e:
        _fail(str(e), code=2)
    for note in notes:
        render.err_console.print(f"[yellow]warning:[/] {render.esc(note)}", highlight=False)
    return spec


def _progress_line(job, started: float) -> Text:
    t = Text()
    t.append(f"{job.id} ", style="bold")
    t.append(job.state.value, style=render.STATE_STYLE.get(job.state.value, "white"))
    t.append(f"  attempt {job.attempt}  {time.monotonic() - started:5.0f}s")
    if job.phase and job.phase is not Phase.DONE:
        t.append(f"  {job.phase.value}", style="cyan")
        if job.staging and job.staging.bytes_total:
            done, total = job.staging.bytes_done, job.staging.bytes_total
            t.append(f" {render.size(done)} of {render.size(total)} ({100 * done / total:.0f}%)", style="cyan")
    if job.items is not None:
        t.append(f"  items {render.items_line(job.items)}", style="cyan")
    if job.trials is not None:
        t.append(f"  trials {render.trials_line(job.trials, job.best)}", style="cyan")
    extra = job.waiting_reason or job.reason
    if extra:
        t.append(f"  {extra}", style="dim")
    return t


def _wait_with_progress(client: Client, job_id: str, timeout: Optional[float]) -> int:
    """Poll until the job is final: a live status line on a terminal, one line per
    change otherwise; then say where the logs and outputs are."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    last = None
    with render.err_console.status("", spinner="dots") as spinner:
        while True:
            job = _call(client.get, job_id)
            line = _progress_line(job, started)
            key = (job.state.value, job.attempt, job.phase,
                   (job.items.done, job.items.failed) if job.items else None,
                   (job.trials.done, job.trials.failed) if job.trials else None)
            if render.err_console.is_terminal:
                spinner.update(line)
            elif key != last:
                render.err_console.print(line)
            last = key
            if JobState(job.state).is_final:
                break
            if deadline is not None and time.monotonic() > deadline:
                _fail(f"job {job_id} still {job.state.value} after {timeout:g} s", code=124)
            time.sleep(0.5)
    if render.err_console.is_terminal:
        render.err_console.print(_progress_line(job, started))
    outputs = "".join(f"\n  output {k}: {v}" for k, v in job.outputs.items())
    render.console.print(render.esc(f"logs: {job.logs_dir}{outputs}\ncheckpoints: {job.checkpoint_dir}"),
                         highlight=False, soft_wrap=True)
    return exit_code_for(job)


@app.command()
def submit(
    job_file: Path = typer.Argument(..., help="Job file: raybatch YAML, Batch AI job.json or Azure ML command job."),
    set_: List[str] = typer.Option([], "--set", help="Override a field: --set nodes=2 --set resources.cpus=1"),
    wait: bool = typer.Option(False, "--wait", help="Show progress and exit with the job's exit code."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up after this many seconds."),
    mount_root: Optional[str] = MountRootOpt,
    resume_from: Optional[str] = typer.Option(
        None, "--resume-from", help="An array job's id: use its frozen listing and skip the items it finished."),
    output: Output = OutputOpt,
) -> None:
    """Validate a job file and queue it; prints the job id."""
    spec = _load(job_file, set_, mount_root)
    if resume_from:
        if spec.array is None:
            _fail(f"--resume-from: {job_file} has no `array:` block; only array jobs resume", code=2)
        spec.array.resume_from = resume_from
    client = _client(auto_start=True)
    job = _call(client.submit, spec)
    _print_warnings(job)
    if output == Output.json:
        render.print_json(job)
    else:
        print(job.id, flush=True)
    if wait:
        raise typer.Exit(_wait_with_progress(client, job.id, timeout))


def _print_warnings(job) -> None:
    """What the server said about a job it queued (no live node can hold it): stderr, exit 0."""
    for w in job.warnings or ():
        render.err_console.print(f"[yellow]warning:[/] {job.id}: {render.esc(w)}", highlight=False, soft_wrap=True)


@app.command("list")
def list_(
    state: List[str] = typer.Option([], "--state", "-s", help="Only jobs in this state (repeatable)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e"),
    limit: int = typer.Option(200, help="At most this many, newest first."),
    workspace: Optional[str] = typer.Option(None, "--workspace", "-w", help="Only this workspace's jobs."),
    output: Output = OutputOpt,
) -> None:
    """List jobs, newest first (those of the workspaces your token may read)."""
    for s in state:
        if s.upper() not in JobState.__members__:
            _fail(f"--state {s}: allowed: {', '.join(JobState.__members__)}", code=2)
    jobs = _call(_client().list, state=state, experiment=experiment, limit=limit, workspace=workspace)
    if output == Output.json:
        render.print_json([j.model_dump(mode="json") for j in jobs])
    else:
        render.console.print(render.jobs_table(jobs))


@app.command()
def queue(
    limit: int = typer.Option(200, help="At most this many waiting jobs."),
    estimate: bool = typer.Option(True, help="Estimate start times (simulates the first 100)."),
    output: Output = OutputOpt,
) -> None:
    """Waiting jobs in the order the scheduler takes them: why each waits, and when it
    starts at the latest if every job runs to its max_wall_clock."""
    client = _client()
    entries = _call(client.queue, limit=limit, estimate=estimate)
    if output == Output.json:
        render.print_json([e.model_dump(mode="json") for e in entries])
        return
    if not entries:
        render.console.print("the queue is empty")
        return
    render.console.print(render.queue_table(entries))


@app.command()
def show(job_id: str, output: Output = OutputOpt) -> None:
    """A job's state history, attempts, where each rank ran and where its files are (a
    sweep's trial, given as <sweep id>.t<n>: its parameters, state and metric)."""
    parent, n = split_trial_id(job_id)
    if n is not None:
        trial = _call(_client().trial, parent, n)
        if output == Output.json:
            render.print_json(trial)
        else:
            render.show_trial(trial)
        return
    job = _call(_client().get, job_id)
    if output == Output.json:
        render.print_json(job)
    else:
        render.show_job(job)


@app.command()
def logs(
    job_id: str,
    rank: int = typer.Option(0, "--rank", "-r", help="Which rank's log."),
    stderr: bool = typer.Option(False, "--stderr", help="stderr instead of stdout."),
    attempt: Optional[int] = typer.Option(None, "--attempt", "-a", help="Default: the latest (with --item: "
                                          "the task's latest run)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
    item: Optional[int] = typer.Option(None, "--item", "-i", help="An array job's task (see `raybatch items`)."),
    trial: Optional[int] = typer.Option(None, "--trial", "-t", help="A sweep's trial (or give ID as <id>.t<n>)."),
) -> None:
    """Print a rank's stdout (or stderr); of one task of an array job with --item, of one
    trial of a sweep with --trial. A job with no attempt yet has no log: logs says why on
    stderr (queued: why it waits, as `raybatch queue` says; or cancelled before it started)
    and exits 0, since that is no error; with --follow it waits for the first attempt."""
    client = _client()
    stream = "stderr" if stderr else "stdout"
    if item is None and trial is None and attempt is None and split_trial_id(job_id)[1] is None:
        job = _call(client.get, job_id)
        if job.attempt == 0:  # nothing ran: say why there is no log rather than print nothing
            render.err_console.print(render.esc(_no_attempt_words(job, follow)), highlight=False, soft_wrap=True)
            if not follow or JobState(job.state).is_final:
                return
    try:
        for chunk in client.follow_logs(job_id, rank=rank, stream=stream, attempt=attempt, follow=follow,
                                        item=item, trial=trial):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except RaybatchError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)


def _no_attempt_words(job, follow: bool) -> str:
    """Why a job with no attempt has no log, in words (the queue's for a waiting job)."""
    state = JobState(job.state)
    if state is JobState.QUEUED:
        words = (f"job {job.id} has not started yet, so it has no log: it is queued, "
                 f"{job.waiting_reason or 'not considered yet'}")
        return words + ("; waiting for its first attempt (Ctrl-C to stop)" if follow else "")
    if state is JobState.CANCELLED:
        return f"job {job.id} was cancelled before it started, so it has no log"
    return f"job {job.id} has no attempt, so it has no log: it is {state.value}" + (
        f" ({job.reason})" if job.reason else "")


@app.command()
def items(
    job_id: str,
    failed: bool = typer.Option(False, "--failed", help="Only the items that failed for good."),
    state: List[str] = typer.Option([], "--state", "-s", help="Only these: pending, running, done, failed, skipped."),
    output: Output = OutputOpt,
) -> None:
    """An array job's items (tasks): state, runs, exit code, time, slot; `logs ID --item K` prints one's log."""
    wanted = (["failed"] if failed else []) + [s.lower() for s in state]
    rows = _call(_client().items, job_id, state=wanted or None)
    if output == Output.json:
        render.print_json([r.model_dump(mode="json") for r in rows])
    elif not rows:
        render.console.print("no items" + (f" in state {', '.join(wanted)}" if wanted else
                                           " (the job has not listed them yet)"))
    else:
        render.console.print(render.items_table(rows))


@app.command()
def files(
    job_id: str,
    path: str = typer.Option("", "--path", "-p",
                             help="Only under this path: stdouterr, checkpoints, outputs/<id>, or below."),
    output: Output = OutputOpt,
) -> None:
    """List a job's files (logs, checkpoints, outputs) with sizes and times, wherever they
    are stored (like `az batchai job file list`); a sweep trial's (<id>.t<n>) its own."""
    parent, n = split_trial_id(job_id)
    if n is not None and not path:
        client = _client()
        job = _call(client.get, parent)
        roots = [f"stdouterr/trials/{n}", f"checkpoints/trials/{n}", *(f"outputs/{o}/trials/{n}" for o in job.outputs)]
        entries = [e for root in roots for e in _call(client.files, parent, root)]
    else:
        entries = _call(_client().files, parent, path)
    if output == Output.json:
        render.print_json(entries)
    else:
        render.console.print(render.files_table(entries))


@app.command()
def download(
    job_id: str,
    dest: Path = typer.Argument(..., help="Local directory to write into."),
    path: str = typer.Option("", "--path", "-p", help="Only this file or directory of the job's tree."),
) -> None:
    """Fetch a job's files (default: all of them) into DEST, with progress."""
    from rich.progress import (  # noqa: PLC0415
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    client = _client()
    entries = _call(client.files, job_id, path)
    if not entries:
        _fail(f"job {job_id} has no files under '{path or '/'}'")
    total = sum(e.size for e in entries)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=render.err_console, transient=False) as bar:
        task = bar.add_task(f"{len(entries)} file(s)", total=total)
        written = _call(client.download, job_id, dest, path,
                        progress=lambda _e, n: bar.update(task, advance=n))
    render.console.print(f"{len(written)} file(s), {render.size(total)} -> {dest}", highlight=False)


@app.command()
def datastores(output: Output = OutputOpt) -> None:
    """The server's datastores: name, location, credential kind (never a secret)."""
    info = _call(_client().datastores)
    if output == Output.json:
        render.print_json(info)
        return
    if info.get("error"):
        render.err_console.print(f"[red]datastores file:[/] {info['error']}", highlight=False)
    render.console.print(render.datastores_table(info["datastores"]))


@app.command()
def cancel(job_id: str, output: Output = OutputOpt) -> None:
    """Cancel a job: queued jobs leave the queue; running ones get SIGTERM, the
    job's grace period, then SIGKILL. A sweep is cancelled whole."""
    parent, n = split_trial_id(job_id)
    if n is not None:
        _fail(f"{job_id} is a trial of sweep {parent}: cancel applies to the whole sweep "
              f"(raybatch cancel {parent})", code=2)
    job = _call(_client().cancel, job_id)
    if output == Output.json:
        render.print_json(job)
    else:
        render.console.print(f"{job.id}: {render.state(job.state)}"
                             + ("" if job.state == JobState.CANCELLED else " (cancel requested)"))


@app.command()
def wait(
    job_id: str,
    timeout: Optional[float] = typer.Option(None, help="Give up after this many seconds (exit 124)."),
) -> None:
    """Wait for a job to end; exit with its exit code (0 succeeded, 130 cancelled)."""
    raise typer.Exit(_wait_with_progress(_client(), job_id, timeout))


@app.command()
def up(
    nodes: int = typer.Option(2, min=1, help="Local Ray nodes to start (multi-node jobs need several)."),
    cpus_per_node: Optional[float] = typer.Option(None, help="CPUs each local node offers (default: cores/nodes)."),
    port: Optional[int] = typer.Option(None, help="Port of the raybatch server (default: a free one)."),
) -> None:
    """Start the embedded local default: Ray nodes and the raybatch server."""
    from raybatch.local.embedded import LocalCluster  # noqa: PLC0415

    local = LocalCluster()
    with render.err_console.status(f"starting {nodes} local Ray node(s) and the raybatch server..."):
        try:
            info = local.up(nodes=nodes, cpus_per_node=cpus_per_node, port=port)
        except Exception as e:  # noqa: BLE001
            _fail(str(e))
    render.console.print(f"raybatch server: {info['url']}\nRay dashboard:   {info['dashboard_url']}"
                         "   (logged in: raybatch dashboard --open)\n"
                         f"Ray nodes:       {info['nodes']} x {info['cpus_per_node']:g} CPU\n"
                         f"state:           {local.home}", highlight=False)
    if local.restarted:  # `up` on a running local default restarts only its dead parts
        render.console.print(f"restarted:       {', '.join(local.restarted)}", highlight=False)


@app.command()
def down() -> None:
    """Stop the embedded local default (queued jobs stay in the store)."""
    from raybatch.local.embedded import LocalCluster  # noqa: PLC0415

    local = LocalCluster()
    with render.err_console.status("stopping the raybatch server and local Ray nodes..."):
        stopped = local.down()
    render.console.print("stopped" if stopped else "nothing was running")


@app.command()
def status(output: Output = OutputOpt) -> None:
    """The server this CLI talks to, its scheduler, and the live Ray nodes; for the local
    default also each of its parts (Ray head, nodes, server, supervisor): pid, alive, restarts."""
    local = _local_health(output)
    client = _client()
    nodes = _call(client.cluster)
    if output == Output.json:
        render.print_json({"address": client.address, "nodes": nodes,
                           "scheduler": _call(client.scheduler).model_dump(mode="json"),
                           **({"local": local} if local else {})})
        return
    if local:
        render.console.print(_local_table(local))
    render.console.print(f"server: {client.address}")
    info = _call(client.scheduler)
    render.console.print(render.scheduler_line(info))
    from rich.table import Table  # noqa: PLC0415

    t = Table(box=None, header_style="bold")
    for col in ("NODE ID", "IP", "ALIVE", "CPU free/total", "GPU free/total"):
        t.add_column(col)
    for n in nodes:
        a, tot = n["available"], n["total"]
        t.add_row(n["node_id"][:12], n["ip"], str(n["alive"]),
                  f"{a.get('CPU', 0):g}/{tot.get('CPU', 0):g}", f"{a.get('GPU', 0):g}/{tot.get('GPU', 0):g}")
    render.console.print(t)


def _local_health(output: Output) -> Optional[dict]:
    """The local default's parts when this CLI talks to it (no --address/--cluster) and it
    was started; when its server does not answer, they are printed before the error."""
    if OPTS.address:
        return None
    from raybatch.local.embedded import LocalCluster  # noqa: PLC0415

    local = LocalCluster()
    health = local.health()
    if health and not local.running():
        if output == Output.json:
            render.print_json({"address": None, "nodes": [], "scheduler": None, "local": health})
        else:
            render.console.print(_local_table(health))
        head = next(p for p in health["parts"] if p["part"] == "ray-head")
        _fail("the local raybatch server does not answer: run `raybatch up`, which restarts only the dead parts"
              if head["alive"] else "the local Ray head is gone, and running jobs with it: `raybatch up` "
              "starts the local default afresh (their attempts are retried)")
    return health


def _local_table(health: dict):
    from rich.table import Table  # noqa: PLC0415

    t = Table(box=None, header_style="bold", title=f"local default ({health['home']})", title_justify="left")
    for col in ("PART", "PID", "ALIVE", "RESTARTS", "LAST RESTART"):
        t.add_column(col)
    for p in health["parts"]:
        last = p["last_restart"]
        when = f"{time.strftime('%H:%M:%S', time.localtime(last['at']))} {last['why']}" if last else ""
        alive = ("yes" if p.get("answers", True) else "yes, not answering") if p["alive"] else "DEAD"
        t.add_row(p["part"], str(p["pid"] or "-"), alive, str(p["restarts"]), when)
    return t


def _absolute(location: str) -> str:
    """A flag's path as the job file needs it: absolute (a URI stays as it is)."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


@app.command()
def score(
    model: str = typer.Option(..., "--model", help="The model: a path on every node or a blob location "
                              "(staged once per node); the command reads it as $RAYBATCH_INPUT_MODEL."),
    over: str = typer.Option(..., "--over", help="The files to score: a path glob or a blob glob "
                             "(datastore://name/in/*.parquet); one item per file."),
    command: str = typer.Option(..., "--command", help="What scores a task's files: $RAYBATCH_ITEM (or the "
                                "lines of $RAYBATCH_ITEMS_FILE) in, $RAYBATCH_ITEM_OUTPUT_DIR out."),
    out: Optional[str] = typer.Option(None, "--out", help="Where the predictions go (default: the job's outputs/predictions)."),
    code: Optional[Path] = typer.Option(None, "--code", help="A directory shipped with the job (the command runs in it)."),
    max_concurrent: int = typer.Option(4, "--max-concurrent", help="Slots: tasks at once."),
    items_per_task: int = typer.Option(1, "--items-per-task", help="Files per run of the command."),
    item_timeout: str = typer.Option("1h", "--item-timeout", help="Longest run of one task."),
    error_threshold: int = typer.Option(0, "--error-threshold", help="Failed items tolerated; -1: any."),
    cpus: float = typer.Option(1.0, "--cpus", help="CPUs per slot."),
    gpus: float = typer.Option(0.0, "--gpus", help="GPUs per slot."),
    name: str = typer.Option("score", "--name"),
    experiment: str = typer.Option("scoring", "--experiment", "-e"),
    set_: List[str] = typer.Option([], "--set", help="Override any field of the job built: --set priority=high"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the job as YAML; submit nothing."),
    wait: bool = typer.Option(False, "--wait", help="Show progress and exit with the job's exit code."),
) -> None:
    """Batch scoring: an array job that runs COMMAND over every file of OVER with MODEL,
    built from these flags (docs/arrays.md)."""
    import yaml  # noqa: PLC0415

    from raybatch.spec.loader import apply_overrides, parse_job  # noqa: PLC0415

    data: dict = {
        "name": name, "experiment": experiment, "command": command,
        **({"code": str(code.resolve())} if code else {}),
        "resources": {"cpus": cpus, **({"gpus": gpus} if gpus else {})},
        "inputs": {"model": _absolute(model)},
        "array": {"over": _absolute(over), "items_per_task": items_per_task, "max_concurrent": max_concurrent,
                  "item_timeout": item_timeout, "error_threshold": error_threshold},
        "outputs": {"predictions": {"path": _absolute(out)} if out else {}},
    }
    try:
        data = apply_overrides(data, set_, "raybatch score")
        spec = parse_job(data, base_dir=Path.cwd(), source="raybatch score")
    except SpecError as e:
        _fail(str(e), code=2)
    if dry_run:
        print(yaml.safe_dump(data, sort_keys=False), end="")
        return
    client = _client(auto_start=True)
    job = _call(client.submit, spec)
    _print_warnings(job)
    print(job.id, flush=True)
    if wait:
        raise typer.Exit(_wait_with_progress(client, job.id, None))


from raybatch.cli.cluster import cluster_app  # noqa: E402
from raybatch.cli import node_setup  # noqa: E402
from raybatch.cli import spot_watch  # noqa: E402
from raybatch.cli import cost as cost_cli  # noqa: E402
from raybatch.cli import tensorboard as tensorboard_cli  # noqa: E402
from raybatch.cli import dashboard as dashboard_cli  # noqa: E402

app.add_typer(cluster_app, name="cluster")
app.command("node-setup")(node_setup.node_setup)
app.command("spot-watch")(spot_watch.spot_watch)
app.command("cost")(cost_cli.cost)
app.command("tensorboard")(tensorboard_cli.tensorboard)
app.command("dashboard")(dashboard_cli.dashboard)
app.command("env")(dashboard_cli.env)
from raybatch.cli import web as web_cli  # noqa: E402

app.command("web")(web_cli.web)
from raybatch.cli import admin as admin_cli  # noqa: E402

app.add_typer(admin_cli.admin_app, name="admin")  # API tokens (users, service principals), whoami
app.command("audit")(admin_cli.audit)

sweep_app = typer.Typer(help="Sweeps: their trials ranked, and a picture of them.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("show")
def sweep_show(
    job_id: str,
    state: List[str] = typer.Option([], "--state", "-s", help="Only these: pending, running, done, failed, "
                                    "early_terminated, cancelled."),
    output: Output = OutputOpt,
) -> None:
    """A sweep's trials, best first: parameters, state, the primary metric's best and last value."""
    client = _client()
    job = _call(client.get, job_id)
    if job.spec.sweep is None:
        _fail(f"{job_id} is not a sweep (it has no search_space); `raybatch show {job_id}` shows it", code=2)
    trials = _call(client.trials, job_id, state=[s.lower() for s in state] or None)
    if output == Output.json:
        render.print_json([t.model_dump(mode="json") for t in trials])
        return
    render.show_sweep(job, trials)


@sweep_app.command("plot")
def sweep_plot(
    job_id: str,
    out: Path = typer.Option(..., "--output", "-o", help="The HTML file to write."),
) -> None:
    """A picture of a sweep (one HTML file, no scripts): its primary metric per step for every
    trial, and every trial's parameters and result as parallel coordinates."""
    from raybatch.sweep.plot import sweep_page  # noqa: PLC0415

    client = _client()
    job = _call(client.get, job_id)
    sweep = job.spec.sweep
    if sweep is None:
        _fail(f"{job_id} is not a sweep (it has no search_space)", code=2)
    metric = sweep.objective.primary_metric
    trials = _call(client.trials, job_id)
    series = {}
    for t in trials:
        events = _call(client.metrics, job_id, trial=t.n, name=metric)
        series[t.id] = [(e.step, e.value) for e in events]
    page = sweep_page(f"{job.name} ({job_id})", metric, sweep.objective.goal == "maximize",
                      [t.model_dump(mode="json") for t in trials], series)
    out.write_text(page)
    print(f"wrote {out}: {len(trials)} trial(s)")


@app.command()
def convert(
    job_file: Path = typer.Argument(..., help="A Batch AI job.json or an Azure ML command job YAML."),
    mount_root: Optional[str] = MountRootOpt,
    output: Output = OutputOpt,
) -> None:
    """Print the raybatch job file equivalent to a Batch AI or Azure ML job file; what
    cannot be honoured is an error (exit 2) or a warning (stderr)."""
    try:
        data, kind, notes = read_document(job_file, mount_root)
        load_job_document(job_file, (), mount_root)  # the result must be a valid raybatch job
    except SpecError as e:
        _fail(str(e), code=2)
    for note in notes:
        render.err_console.print(f"[yellow]warning:[/] {render.esc(note)}", highlight=False)
    if kind == "raybatch":
        render.err_console.print(render.esc(f"{job_file} is already a raybatch job file"), highlight=False)
    if output == Output.json:
        render.print_json(data)
    else:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(data, sort_keys=False), end="")


@app.command()
def validate(
    job_file: Path,
    set_: List[str] = typer.Option([], "--set", help="Override a field, as with submit."),
    mount_root: Optional[str] = MountRootOpt,
    output: Output = OutputOpt,
) -> None:
    """Check a job file without submitting it; print the job as raybatch reads it."""
    spec = _load(job_file, set_, mount_root)
    if output == Output.json:
        render.print_json(spec)
    else:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")


if __name__ == "__main__":
    app()
