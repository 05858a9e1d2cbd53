"""``raybatch tensorboard ID|EXPERIMENT [--port 6006] [--host localhost]``: TensorBoard over
the event files (``events.out.tfevents.*``) that jobs write anywhere in their tree (outputs,
checkpoints, logs), wherever the tree is stored.

TensorBoard cannot read ``az://`` without plugins, and the CLI may not run where the
server does, so the event files are mirrored into a local cache through the server's files
API (the server reads blob storage with its datastore credentials: the user needs no key);
a file the server stores at a path this machine can read is read there directly. The
first sync shows progress; then a background thread re-lists the jobs every ``--refresh``
seconds and appends what each event file grew by (event files are append-only, and
TensorBoard keeps each file open and reads on from where it was: a file replaced by a new
copy would never be read again). An experiment is re-listed too: a job submitted to it
later becomes a new run.

Each job is a directory of the cache, ``<job name>-<job id>``, so TensorBoard names each
run ``<job name>-<job id>/<path in the job's tree>`` - what ``--logdir_spec name:path,...``
would do, with one logdir, which TensorBoard's fast loader also accepts.

TensorBoard runs in this process (killing its pid stops it) and is told to use its own
TensorFlow stub even when TensorFlow is installed: the cache is local files, for which the
stub is enough, and importing TensorFlow would cost seconds and hundreds of MB."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
import threading
import types
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import typer

from raybatch import config
from raybatch.cli import render
from raybatch.cli.session import call as _call
from raybatch.cli.session import client as _client
from raybatch.cli.session import fail as _fail
from raybatch.client import Client, RaybatchError
from raybatch.models import FileEntry, JobSummary
from raybatch.state.states import JobState

EVENT_PREFIX = "events.out.tfevents."
NOT_INSTALLED = "TensorBoard is not installed here: pip install tensorboard"


def tensorboard_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a broken install, or one hidden in sys.modules
        return False


def is_event_file(path: str) -> bool:
    """A TensorBoard event file (what SummaryWriter, tf.summary and Keras' TensorBoard write)."""
    return PurePosixPath(path).name.startswith(EVENT_PREFIX)


def run_name(job: JobSummary) -> str:
    """The cache directory (and TensorBoard run prefix) of a job: ``<name>-<id>``, with
    anything but letters, digits, '.', '_' and '-' made '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{job.name}-{job.id}")


def cache_file(cache: Path, run: str, tree_path: str) -> Optional[Path]:
    """Where a file of a job's tree goes in the cache; None for a path that would leave it."""
    parts = PurePosixPath(tree_path).parts
    if not parts or tree_path.startswith("/") or any(p in ("..", ".", "") for p in parts):
        return None
    return cache.joinpath(run, *parts)


@dataclass
class Pending:
    """An event file whose bytes from ``offset`` on are not in the cache yet."""

    job_id: str
    entry: FileEntry
    target: Path
    offset: int  # 0 with ``rewrite``: the copy is longer than the source (rewritten) and starts over
    rewrite: bool = False

    @property
    def missing(self) -> int:
        return self.entry.size - self.offset


def pending(job_id: str, run: str, entries: list[FileEntry], cache: Path) -> list[Pending]:
    """The event files among ``entries`` that are new, or have grown, since the cache
    copied them (the copy's size is how far it got)."""
    out = []
    for e in entries:
        if not is_event_file(e.path):
            continue
        target = cache_file(cache, run, e.path)
        if target is None:
            continue
        have = target.stat().st_size if target.exists() else 0
        if have < e.size:
            out.append(Pending(job_id, e, target, have))
        elif have > e.size:
            out.append(Pending(job_id, e, target, 0, rewrite=True))
    return out


def read_local(location: str, offset: int, size: int) -> Optional[bytes]:
    """Bytes ``offset:size`` of a file the server stores at a path this machine reads too
    (the local default, a shared file system); None when it cannot be read here."""
    if "://" in location or not os.path.isabs(location):
        return None
    try:
        with open(location, "rb") as f:
            if os.fstat(f.fileno()).st_size < size:
                return None  # not the file the server listed (another machine's path)
            f.seek(offset)
            return f.read(size - offset)
    except OSError:
        return None


class EventMirror:
    """The event files of one job, or of every job of an experiment, mirrored into ``cache``."""

    def __init__(self, client: Client, cache: Path, job: Optional[JobSummary] = None,
                 experiment: Optional[str] = None):
        self.client, self.cache = client, cache
        self.job, self.experiment = job, experiment
        self.done: set[str] = set()  # final jobs synced after they ended: nothing more comes
        self.jobs_seen: dict[str, str] = {}  # job id -> run name
        self.files = 0
        self.error: Optional[str] = None

    def jobs(self) -> list[JobSummary]:
        if self.experiment is not None:
            return self.client.list(experiment=self.experiment, limit=100000)
        assert self.job is not None
        if self.job.id in self.done:
            return [self.job]
        self.job = self.client.get(self.job.id)
        return [self.job]

    def plan(self) -> list[Pending]:
        """What to fetch now; jobs that were final when listed are marked done (their
        files, fetched in this pass, will not change)."""
        out = []
        for job in self.jobs():
            run = self.jobs_seen.setdefault(job.id, run_name(job))
            if job.id in self.done:
                continue
            try:
                entries = self.client.files(job.id)
            except RaybatchError as e:
                if e.status_code == 404:  # no files yet, or a tree part not served
                    continue
                raise
            out += pending(job.id, run, entries, self.cache)
            if JobState(job.state).is_final:
                self.done.add(job.id)
        return out

    def fetch(self, p: Pending, staging: Path) -> int:
        """Append what ``p`` is missing to its cache copy; the bytes added."""
        data = read_local(p.entry.location, p.offset, p.entry.size)
        if data is None:
            written = self.client.download(p.job_id, staging, p.entry.path)
            try:
                with open(written[0], "rb") as f:
                    f.seek(p.offset)
                    data = f.read()
            finally:
                for w in written:
                    w.unlink(missing_ok=True)
        p.target.parent.mkdir(parents=True, exist_ok=True)
        with open(p.target, "wb" if p.rewrite else "ab") as f:  # same inode: TensorBoard reads on
            f.write(data)
        return len(data)

    def fetch_all(self, todo: list[Pending], on_file: Optional[Callable[[Pending, int], None]] = None) -> int:
        """Fetch what ``plan`` found; the bytes added."""
        added = 0
        with tempfile.TemporaryDirectory(prefix="raybatch-tb-") as tmp:
            for p in todo:
                n = self.fetch(p, Path(tmp))
                added += n
                if on_file:
                    on_file(p, n)
        self.files = sum(1 for _ in self.cache.rglob(EVENT_PREFIX + "*"))
        return added

    def sync(self) -> int:
        """One pass: list, then fetch every new or grown event file. The bytes added."""
        return self.fetch_all(self.plan())

    def keep_syncing(self, every: float, stop: threading.Event) -> None:
        """The background refresh: a failure is reported once (dim, on stderr) and retried."""
        while not stop.wait(every):
            try:
                self.sync()
                if self.error is not None:
                    render.err_console.print("[dim]event file sync works again[/]", highlight=False)
                self.error = None
            except Exception as e:  # noqa: BLE001 - the server may be away for a while
                error = f"{type(e).__name__}: {e}"
                if error != self.error:
                    render.err_console.print(f"[dim]event file sync failed (retrying every {every:g} s): "
                                             f"{error}[/]", highlight=False)
                self.error = error


def _first_sync(mirror: EventMirror) -> None:
    """The first pass, with a progress bar on stderr while files are fetched."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn  # noqa: PLC0415

    with render.err_console.status("listing the jobs' event files..."):
        todo = mirror.plan()
    if not todo:
        mirror.fetch_all([])
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  console=render.err_console, transient=False) as bar:
        task = bar.add_task(f"{len(todo)} event file(s)", total=sum(p.missing for p in todo))
        mirror.fetch_all(todo, on_file=lambda _p, n: bar.update(task, advance=n))


def _serve(logdir: Path, host: str, port: int, reload_s: float) -> int:
    """TensorBoard over ``logdir``, in this process, until it is stopped."""
    # TensorBoard's documented no-TensorFlow mode (its 'no_tensorflow' build target provides
    # this module): its stub reads local event files; TensorFlow itself is not imported
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard import program  # noqa: PLC0415

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(logdir), "--host", host, "--port", str(port),
                       "--reload_interval", f"{reload_s:g}"])
    return tb.main()


def tensorboard(
    target: str = typer.Argument(..., help="A job id, or an experiment's name: every job of it."),
    port: int = typer.Option(6006, "--port", help="TensorBoard's port."),
    host: str = typer.Option("localhost", "--host", help="The address TensorBoard listens on "
                             "(0.0.0.0: every interface)."),
    refresh: float = typer.Option(10.0, "--refresh", min=1.0, help="Seconds between syncs of new and grown "
                                  "event files."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the event files are mirrored "
                                             "(default: <RAYBATCH_HOME>/tensorboard/<ID|EXPERIMENT>)."),
) -> None:
    """TensorBoard over a job's event files (events.out.tfevents.* anywhere in its outputs,
    checkpoints or logs), or over every job of an experiment, one run per job
    (<name>-<id>/...); local or blob storage alike, through the server. Needs TensorBoard
    installed (pip install tensorboard); stop it with Ctrl-C."""
    if not tensorboard_installed():
        _fail(NOT_INSTALLED)
    client = _client()
    try:
        job: Optional[JobSummary] = client.get(target)
        experiment = None
    except RaybatchError as e:
        if e.status_code != 404:
            _fail(str(e))
        job, experiment = None, target
        if not _call(client.list, experiment=target, limit=1):
            _fail(f"no job with id '{target}' and no experiment named '{target}' (`raybatch list` shows both)")
    cache = cache_dir or config.home() / "tensorboard" / re.sub(r"[^A-Za-z0-9._-]", "_", target)
    cache.mkdir(parents=True, exist_ok=True)
    mirror = EventMirror(client, cache, job=job, experiment=experiment)
    try:
        _first_sync(mirror)
    except RaybatchError as e:
        _fail(f"reading the event files: {e}")
    what = f"job {target}" if job is not None else f"experiment {target} ({len(mirror.jobs_seen)} job(s))"
    if mirror.files:
        render.err_console.print(f"{mirror.files} event file(s) of {what} in {cache}; new ones are synced every "
                                 f"{refresh:g} s", highlight=False, soft_wrap=True)
    else:
        render.err_console.print(f"no event files in {what} yet ({EVENT_PREFIX}* in its outputs, checkpoints "
                                 f"or logs); looking again every {refresh:g} s", highlight=False, soft_wrap=True)
    stop = threading.Event()
    threading.Thread(target=mirror.keep_syncing, args=(refresh, stop), name="event-sync", daemon=True).start()
    try:
        code = _serve(cache, host, port, min(refresh, 5.0))
    except KeyboardInterrupt:
        raise typer.Exit(130)
    finally:
        stop.set()
    if code:
        raise typer.Exit(1)
