"""The chaos run's engine (issue 19), shared by benchmarks/chaos.py (the long run) and
tests/test_chaos_e2e.py (the short run in the suite): one place, so the suite checks the
code the benchmark measures.

On one machine, loopback only: a 3-node Ray cluster (tests.conftest.RayTestCluster), a
real ``python -m raybatch.server`` (tests.conftest.ServerProcess) and Azurite
(tests.azurite.Azurite) holding a blob datastore. For ``minutes`` a submitter sends a
seeded stream of jobs (the DDP recipe with checkpoints, the MPI recipe, no-ops, failing
ones, cancelled ones, ones writing a known payload and its sha256 to the blob datastore or
to the server's disk) while an injector, one fault at a time, does what operators and
machines do:

- ``raylet``: SIGKILL of a worker node's raylet (preferably one holding a running rank);
  the node is then replaced by a fresh one, as a cloud would;
- ``rank``: SIGKILL of a running rank's process (a pid from the job's attempt in the API);
- ``driver``: SIGKILL of the attempt's Ray job driver (its pid in the attempt's status.json);
- ``server``: ``kill -9`` of the server, a short pause, then a new server on the same state
  dir and port, as an operator restarts it;
- ``azurite``: Azurite stopped for a few seconds, then started again (same port and data);
- ``disk``: once, the server's state disk (a small tmpfs) filled to ENOSPC for a few
  seconds, then freed.

Then, once every job has ended (the drain), the invariants are checked (``Report.broken``
names every broken one with its evidence): one terminal state each that the job's history
explains, attempts never overlapping, complete outputs with the right checksums for every
SUCCEEDED job, no process of an ended job left, and every request answered (no 5xx but a
503 while the disk was full; connection errors only while the server was down on purpose).

The seed fixes the jobs (kinds, sizes, durations) and the faults (kinds, order, pauses);
when each lands depends on a loaded machine's timing, so two runs differ in detail."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from raybatch.client import Client, RaybatchError
from raybatch.state.states import ALLOWED, FINAL_STATES, AttemptOutcome, JobState
from tests.azurite import Azurite
from tests.conftest import RECIPES, RayTestCluster, ServerProcess, process_alive
from tests.fake_autoscaling import cmdline

FAULT_KINDS = ("raylet", "rank", "driver", "server", "azurite", "disk")
JOB_KINDS = ("noop", "fail", "cancel", "blob", "local", "ddp", "mpi")
KEY_ENV = "RB_CHAOS_STORAGE_KEY"
PAYLOAD_BLOCK = 4096


# ---------------------------------------------------------------------------------------
# what the jobs run

PAYLOAD_SCRIPT = '''\
"""A chaos job's rank: marks its start and end (attempt, rank, time, pid) in a file of
the job's own, and writes a known payload (derived from the job id and its rank) and its
sha256 to an output, slowly (so that faults land while it writes)."""
import hashlib, os, sys, time
from pathlib import Path

mode, marks = sys.argv[1], Path(sys.argv[2])
job = os.environ["RAYBATCH_JOB_ID"]
attempt = os.environ.get("RAYBATCH_ATTEMPT", "?")
rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("RANK") or "0"

def mark(what):
    with open(marks / (job + ".marks"), "a") as f:
        f.write(f"{what} {attempt} {rank} {time.time():.6f} {os.getpid()}\\n")

if mode == "start":
    mark("start")
    sys.exit(0)
out = Path(os.environ[sys.argv[3]])
size, seconds = int(sys.argv[4]), float(sys.argv[5])
if mode == "run":
    mark("start")
out.mkdir(parents=True, exist_ok=True)
h, blocks = hashlib.sha256(), max(1, size // BLOCK)
with open(out / f"payload-{rank}.bin", "wb") as f:
    for i in range(blocks):
        block = hashlib.sha256(f"{job}:{rank}:{i}".encode()).digest() * (BLOCK // 32)
        f.write(block)
        h.update(block)
        if i % max(1, blocks // 8) == 0:
            f.flush()
            time.sleep(seconds / 8)
(out / f"payload-{rank}.sha256").write_text(h.hexdigest() + "\\n")
mark("end")
'''.replace("BLOCK", str(PAYLOAD_BLOCK))


def expected_payload(job_id: str, rank: int, size: int) -> bytes:
    """What ``PAYLOAD_SCRIPT`` writes for this job's rank."""
    return b"".join(hashlib.sha256(f"{job_id}:{rank}:{i}".encode()).digest() * (PAYLOAD_BLOCK // 32)
                    for i in range(max(1, size // PAYLOAD_BLOCK)))


@dataclass
class Planned:
    """One job of the stream as the submitter planned it (the seed decides all of it)."""

    seq: int
    kind: str
    nodes: int = 1
    size: int = 0              # payload bytes per rank (0: no payload)
    seconds: float = 0.0       # how long its payload takes to write
    cancel_after: float = 0.0  # cancel kind: seconds after it runs
    job_id: Optional[str] = None
    submitted_at: Optional[float] = None
    cancel_sent_at: Optional[float] = None

    @property
    def name(self) -> str:
        return f"chaos-{self.kind}-{self.seq}"


def kind_of(name: str) -> Optional[str]:
    parts = name.split("-")
    return parts[1] if len(parts) == 3 and parts[0] == "chaos" and parts[1] in JOB_KINDS else None


# ---------------------------------------------------------------------------------------
# every request the run sends, and how it was answered

class Requests:
    """Every HTTP request of the run's clients: when it was sent (a failed one: when it
    failed), what, and its status (None: no answer, with the error)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[float, str, str, Optional[int], str]] = []

    def add(self, *row) -> None:
        with self.lock:
            self.rows.append(row)


class _Recording(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, log: Requests):
        self.inner, self.log = inner, log

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        t = time.time()
        try:
            response = self.inner.handle_request(request)
        except httpx.HTTPError as e:  # when it failed: a request the server's kill cut is in its window
            self.log.add(time.time(), request.method, request.url.path, None, f"{type(e).__name__}: {e}")
            raise
        self.log.add(t, request.method, request.url.path, response.status_code, "")
        return response

    def close(self) -> None:
        self.inner.close()


def recording_client(server: ServerProcess, log: Requests, timeout: float = 60.0) -> Client:
    """The SDK's client with every request recorded (same base URL, token and timeout)."""
    c = server.client()
    old = c._http
    c._http = httpx.Client(base_url=old.base_url, headers=old.headers, timeout=timeout,
                           transport=_Recording(httpx.HTTPTransport(), log))
    old.close()
    return c


# ---------------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    at: float                          # epoch s
    target: str = ""                   # what it hit, in words
    job: str = ""                      # the job it aimed at (rank, driver; raylet: a job on that node)
    attempt: Optional[int] = None      # the attempt it hit (rank, driver)
    down_s: Optional[float] = None     # deliberate outage (server, azurite, disk)
    recovered_s: Optional[float] = None  # fault -> recovered (None: not within the limit)
    recovered_what: str = ""
    until: Optional[float] = None      # end of its window (epoch s)


@dataclass
class ChaosConfig:
    seed: int = 0
    minutes: float = 10.0
    jobs_per_minute: float = 6.0
    faults: tuple[str, ...] = FAULT_KINDS
    kinds: dict[str, float] = field(default_factory=lambda: {
        "noop": 2, "fail": 1, "cancel": 1, "blob": 3, "local": 1, "ddp": 1, "mpi": 1})
    fault_every_s: float = 30.0        # mean pause between one fault's recovery and the next fault
    first_fault_s: float = 10.0        # the first fault comes this long after the stream starts
    drain_s: float = 300.0             # after the stream: how long jobs may take to end
    recovery_limit_s: float = 240.0
    process_grace_s: float = 30.0      # an ended job's processes may take this long to exit
    ddp_epochs: int = 4
    workdir: Optional[Path] = None     # default: a fresh temporary folder, removed at the end
    log: Callable[[str], None] = print


@dataclass
class Report:
    config: ChaosConfig
    jobs: dict[str, Any] = field(default_factory=dict)      # job id -> JobDetail
    planned: dict[str, Planned] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)         # faults not injected, and why
    held: list[str] = field(default_factory=list)
    broken: dict[str, list[str]] = field(default_factory=dict)
    requests: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        by_kind: dict[str, dict[str, int]] = {}
        for d in self.jobs.values():
            k = kind_of(d.name) or "?"
            by_kind.setdefault(k, {})
            by_kind[k][d.state.value] = by_kind[k].get(d.state.value, 0) + 1
        lines = [f"chaos run: seed {self.config.seed}, {self.config.minutes:g} min of jobs at "
                 f"{self.config.jobs_per_minute:g}/min, {self.seconds:.0f} s in all",
                 f"jobs run: {len(self.jobs)}  (attempts {sum(len(d.attempts) for d in self.jobs.values())}, "
                 f"requests {self.requests})"]
        for k in sorted(by_kind):
            lines.append(f"  {k:8s} " + ", ".join(f"{s} {n}" for s, n in sorted(by_kind[k].items())))
        planned = {"fail": "FAILED", "cancel": "CANCELLED"}
        other = [d for d in self.jobs.values() if d.state.value != planned.get(kind_of(d.name) or "", "SUCCEEDED")]
        if other:
            lines.append(f"ended otherwise than planned ({len(other)}; the history check says whether a fault "
                         "explains each):")
            for d in other[:15]:
                lines.append(f"  {d.id} {d.name}: {d.state.value} after " + ", ".join(
                    f"{a.outcome}" + (f"({a.exit_code})" if a.exit_code else "") for a in d.attempts))
        counts: dict[str, list[Fault]] = {}
        for f in self.faults:
            counts.setdefault(f.kind, []).append(f)
        lines.append(f"faults injected: {len(self.faults)}")
        lines.append(f"  {'kind':8s} {'n':>3s}  {'recovery median':>15s} {'max':>7s}  {'not recovered':>13s}  "
                     f"{'outage median':>13s}")
        for k in FAULT_KINDS:
            fs = counts.get(k, [])
            if not fs:
                continue
            rec = [f.recovered_s for f in fs if f.recovered_s is not None]
            down = [f.down_s for f in fs if f.down_s is not None]
            lines.append(f"  {k:8s} {len(fs):3d}  {_s(statistics.median(rec) if rec else None):>15s} "
                         f"{_s(max(rec) if rec else None):>7s}  {len(fs) - len(rec):13d}  "
                         f"{_s(statistics.median(down) if down else None):>13s}")
        for s in self.skipped:
            lines.append(f"  skipped: {s}")
        lines.append("recovery per fault (s after the run's start: kind target -> seconds, what):")
        t0 = self.faults[0].at if self.faults else 0
        for f in self.faults:
            lines.append(f"  +{f.at - t0:6.1f} {f.kind:8s} {f.target[:24]:24s} -> {_s(f.recovered_s):>6s}  "
                         f"{f.recovered_what}")
        lines.append(f"invariants: {len(self.held)} held, {len(self.broken)} broken")
        for name in self.held:
            lines.append(f"  held:   {name}")
        for name, evidence in self.broken.items():
            lines.append(f"  BROKEN: {name}")
            for e in evidence[:20]:
                lines.append(f"    - {e}")
            if len(evidence) > 20:
                lines.append(f"    ... and {len(evidence) - 20} more")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def _s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def job_of(pid: int) -> Optional[str]:
    """The RAYBATCH_JOB_ID in a live process's environment."""
    try:
        for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if kv.startswith(b"RAYBATCH_JOB_ID="):
                return kv.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def job_processes(job_ids: set[str]) -> dict[str, list[int]]:
    """Live processes (not zombies) carrying one of these job ids in their environment."""
    out: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            j = job_of(int(entry.name))
            if j in job_ids and process_alive(int(entry.name)):
                out.setdefault(j, []).append(int(entry.name))
    return out


# ---------------------------------------------------------------------------------------
class Chaos:
    def __init__(self, config: ChaosConfig):
        self.cfg = config
        self.log = config.log
        self.requests = Requests()
        self.report = Report(config)
        self.planned: dict[int, Planned] = {}
        self.by_id: dict[str, Planned] = {}
        self.by_name: dict[str, Planned] = {}
        self.lock = threading.Lock()
        self.stop_stream = threading.Event()
        self.time_up = threading.Event()
        self.server_down: list[list[float]] = []   # [start, end] windows: the server down on purpose
        self.disk_full: list[list[float]] = []     # [start, end]: 503 allowed
        self.azurite_down: list[list[float]] = []
        self.node_pids_after_kill: list[int] = []  # a killed raylet's node processes (not the jobs')
        self._own_workdir = config.workdir is None
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="raybatch-chaos-"))
        self.marks = self.workdir / "marks"
        self.tmpfs: Optional[Path] = None
        self.rc: Optional[RayTestCluster] = None
        self.server: Optional[ServerProcess] = None
        self.azurite: Optional[Azurite] = None

    # ---- set-up and tear-down --------------------------------------------------------
    def setup(self) -> None:
        t = time.monotonic()
        self.marks.mkdir(parents=True, exist_ok=True)
        self.marks.chmod(0o777)
        self.payload = self.workdir / "payload.py"
        self.payload.write_text(PAYLOAD_SCRIPT)
        state = self.workdir / "state"
        state.mkdir()
        if "disk" in self.cfg.faults:
            state = self._mount_tmpfs(state)
        self.azurite = Azurite(self.workdir / "azurite").start()
        self.azurite.create_container("results")
        (state / "datastores.yaml").write_text(textwrap.dedent(f"""\
            datastores:
              results:
                url: az://results
                account: {self.azurite.account_name}
                endpoint: {self.azurite.endpoint}
                credential: {{account_key: {{env: {KEY_ENV}}}}}
            """))
        self.rc = RayTestCluster(nodes=3)
        self.server_env = {KEY_ENV: self.azurite.account_key, "RAYBATCH_CACHE_DIR": str(self.workdir / "cache"),
                           "RAYBATCH_STORAGE_CHECK_S": "30"}
        self.server = ServerProcess(self.rc, state, env=self.server_env).start()
        self.log(f"chaos: cluster, server and Azurite up in {time.monotonic() - t:.0f} s "
                 f"(workdir {self.workdir}, state disk {'tmpfs' if self.tmpfs else 'the workdir'})")

    def _mount_tmpfs(self, state: Path) -> Path:
        """The server's state dir on a small tmpfs of its own, to fill once (a real ENOSPC)."""
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(state)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            self.report.skipped.append(f"disk: cannot mount a tmpfs ({p.stderr.strip() or p.returncode}); "
                                       "the disk-full fault is not injected")
            self.cfg.faults = tuple(k for k in self.cfg.faults if k != "disk")
            return state
        self.tmpfs = state
        return state

    def teardown(self) -> None:
        for step in (lambda: self.server and self.server.stop(), lambda: self.rc and self.rc.shutdown(),
                     lambda: self.azurite and self.azurite.close()):
            try:
                step()
            except Exception as e:  # noqa: BLE001
                self.log(f"chaos: tear-down step failed: {e!r}")
        for pid in self.node_pids_after_kill:  # what outlived a killed raylet (Ray's workers, agents)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)
        if self._own_workdir and os.environ.get("KEEP_CHAOS") is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> Client:
        return recording_client(self.server, self.requests)

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> Report:
        t0 = time.time()
        try:
            self.setup()
            submitter = threading.Thread(target=self._guard(self._submit_loop), name="chaos-submit")
            canceller = threading.Thread(target=self._guard(self._cancel_loop), name="chaos-cancel")
            timer = threading.Timer(self.cfg.minutes * 60, self.time_up.set)
            for th in (submitter, canceller, timer):
                th.start()
            # the injector in this (the main) thread: ray.cluster_utils adds a node (a raylet's
            # replacement) only there, as it sets signal handlers. The stream ends when the
            # time is up and every fault kind was tried at least once.
            self._guard(self._fault_loop)()
            self.time_up.wait()
            self.stop_stream.set()
            timer.cancel()
            submitter.join()
            self._drain()
            canceller.join()
            self._check()
        finally:
            self.stop_stream.set()
            self.report.seconds = time.time() - t0
            self.teardown()
        return self.report

    def _guard(self, fn):
        def run():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 -- a crashed thread is the run's failure, said plainly
                import traceback

                self.report.broken.setdefault("the chaos run itself ran to its end", []).append(
                    f"{threading.current_thread().name}: {e!r}\n{traceback.format_exc()[-2000:]}")
                self.stop_stream.set()
                self.time_up.set()
        return run

    # ---- the job stream ----------------------------------------------------------------
    def _plan(self, rng: random.Random, seq: int) -> Planned:
        kinds = [k for k, w in self.cfg.kinds.items() if w > 0]
        kind = rng.choices(kinds, [self.cfg.kinds[k] for k in kinds])[0]
        p = Planned(seq, kind)
        if kind in ("blob", "local"):
            p.nodes = rng.choice((1, 1, 2))
            p.size = rng.choice((64, 256, 1024)) * 1024
            p.seconds = rng.uniform(2, 10)
        elif kind == "cancel":
            p.nodes = rng.choice((1, 2))
            p.cancel_after = rng.uniform(1, 8)
        elif kind in ("ddp", "mpi"):
            p.nodes = 2
            p.size = 64 * 1024
        return p

    def _spec(self, p: Planned) -> tuple[Any, list[str]]:
        """(job file or dict, overrides) for a planned job."""
        py, marks, script = sys.executable, str(self.marks), str(self.payload)
        retries = {"infrastructure": 10, "user": 2}
        base = {"name": p.name, "experiment": "chaos", "nodes": p.nodes, "resources": {"cpus": 1},
                "max_wall_clock": "10m", "retries": retries}
        if p.kind == "noop":
            return {**base, "command": "true", "retries": {"infrastructure": 10}}, []
        if p.kind == "fail":
            return {**base, "command": f"{py} {script} start {marks} && exit 3",
                    "retries": {"infrastructure": 10}}, []
        if p.kind == "cancel":
            return {**base, "command": f"{py} {script} start {marks} && sleep 300", "grace_period": "2s"}, []
        if p.kind in ("blob", "local"):
            spec = {**base, "outputs": {"data": {}}, "sync_interval": "2s",
                    "command": f"{py} {script} run {marks} RAYBATCH_OUTPUT_DATA {p.size} {p.seconds:.1f}"}
            if p.kind == "blob":
                spec["output_root"] = "datastore://results/chaos"
            return spec, []
        if p.kind == "ddp":
            cmd = (f"{py} {script} start {marks} && python train.py --epochs {self.cfg.ddp_epochs} "
                   f"--sleep-per-epoch 0.5 && {py} {script} write {marks} RAYBATCH_OUTPUT_MODEL {p.size} 0")
            return RECIPES / "pytorch-digits-ddp" / "job.yaml", [
                f"name={p.name}", "experiment=chaos", f"command={cmd}", "output_root=datastore://results/chaos",
                "retries.infrastructure=10", "retries.user=2", "max_wall_clock=10m"]
        if p.kind == "mpi":
            return RECIPES / "mpi-allreduce" / "job.yaml", [
                f"name={p.name}", "experiment=chaos", "command=python allreduce.py --epochs 300",
                "retries.infrastructure=10", "retries.user=2", "max_wall_clock=10m"]
        raise ValueError(f"unknown job kind {p.kind!r}; allowed: {', '.join(JOB_KINDS)}")

    def _submit_loop(self) -> None:
        rng = random.Random(f"{self.cfg.seed}-jobs")
        client = self.client()
        seq, pending = 0, []
        next_at = time.monotonic()
        while not self.stop_stream.is_set():
            if time.monotonic() >= next_at:
                seq += 1
                pending.append(self._plan(rng, seq))
                next_at += rng.expovariate(self.cfg.jobs_per_minute / 60)
            while pending:  # in order; one the server did not take is sent again
                p = pending[0]
                self.by_name[p.name] = p
                job, overrides = self._spec(p)
                try:
                    sub = client.submit(job, overrides=overrides)
                except RaybatchError as e:
                    if e.status_code is not None and e.status_code < 500:
                        raise
                    break  # server down or store unavailable: later
                p.job_id, p.submitted_at = sub.id, time.time()
                with self.lock:
                    self.planned[p.seq] = p
                    self.by_id[sub.id] = p
                pending.pop(0)
            self.stop_stream.wait(max(0.1, min(1.0, next_at - time.monotonic())))
        if pending:
            self.report.notes.append(f"{len(pending)} planned job(s) not submitted before the stream ended")
        client.close()

    def _cancel_loop(self) -> None:
        """Cancels each ``cancel`` job some seconds after it runs (again, if the server did
        not answer)."""
        client = self.client()
        while True:
            with self.lock:
                todo = [p for p in self.planned.values() if p.kind == "cancel" and p.cancel_sent_at is None]
            if not todo and self.stop_stream.is_set():
                break
            for p in todo:
                try:
                    d = client.get(p.job_id)
                    if d.state.is_final:
                        p.cancel_sent_at = -1.0
                        continue
                    if d.state != JobState.RUNNING or time.time() - (d.started_at or time.time()) < p.cancel_after:
                        continue
                    client.cancel(p.job_id)
                    p.cancel_sent_at = time.time()
                except RaybatchError as e:
                    if e.status_code is not None and e.status_code < 500:
                        raise
            time.sleep(0.5)
        client.close()

    # ---- faults --------------------------------------------------------------------------
    def _fault_loop(self) -> None:
        rng = random.Random(f"{self.cfg.seed}-faults")
        client = self.client()
        kinds = [k for k in self.cfg.faults if k != "disk"]
        disk_once = "disk" in self.cfg.faults
        cycle: list[str] = []
        tried: set[str] = set()
        if self.stop_stream.wait(self.cfg.first_fault_s):
            return
        while not self.stop_stream.is_set() and not (self.time_up.is_set() and tried >= set(self.cfg.faults)):
            if not cycle:
                cycle = list(kinds) + (["disk"] if disk_once else [])
                rng.shuffle(cycle)
                disk_once = False
            kind = cycle.pop(0)
            tried.add(kind)
            fault = getattr(self, f"_fault_{kind}")(client, rng)
            if fault is not None:
                self.log(f"chaos: {kind:8s} {fault.target[:24]:24s} recovered in {_s(fault.recovered_s)} s "
                         f"({fault.recovered_what})")
            if self.time_up.wait(rng.uniform(0.5, 1.5) * self.cfg.fault_every_s) and tried >= set(self.cfg.faults):
                break
        client.close()

    def _poll(self, check, limit: Optional[float] = None, interval: float = 0.25):
        deadline = time.monotonic() + (limit or self.cfg.recovery_limit_s)
        while time.monotonic() < deadline:
            try:
                v = check()
            except RaybatchError:
                v = None
            if v:
                return v
            time.sleep(interval)
        return None

    def _running_job(self, client: Client, rng: random.Random, want: Callable[[Any], bool] = lambda d: True,
                     limit: float = 60.0):
        """A RUNNING job of this run whose ranks have pids (and that ``want`` accepts)."""
        def pick():
            running = [j for j in client.list(state=["RUNNING"], experiment="chaos", limit=1000)]
            rng.shuffle(running)
            for j in running:
                d = client.get(j.id)
                if d.state == JobState.RUNNING and d.attempts and d.attempts[-1].ranks \
                        and all(r.pid for r in d.attempts[-1].ranks) and want(d):
                    return d
            return None
        return self._poll(pick, limit, 0.5)

    def _moved_on(self, client: Client, job_id: str, attempt: int) -> Optional[str]:
        """The job's attempt ``attempt`` ended and the job runs again (or ended): in words."""
        d = client.get(job_id)
        if d.state.is_final:
            return f"job {d.state.value}"
        if len(d.attempts) > attempt and d.state == JobState.RUNNING:
            return f"attempt {attempt + 1} running (attempt {attempt} {d.attempts[attempt - 1].outcome})"
        return None

    def _fault_rank(self, client: Client, rng: random.Random) -> Optional[Fault]:
        d = self._running_job(client, rng)
        if d is None:
            self.report.skipped.append("rank: no running job with rank pids within 60 s")
            return None
        a = d.attempts[-1]
        r = rng.choice(a.ranks)
        f = Fault("rank", time.time(), d.id, d.id, a.n)
        try:
            os.kill(r.pid, signal.SIGKILL)
        except ProcessLookupError:
            self.report.skipped.append(f"rank: {d.id} rank {r.rank} pid {r.pid} had exited already")
            return None
        self.report.faults.append(f)
        f.target = f"{d.id}/a{a.n}/r{r.rank}"
        f.recovered_what = self._poll(lambda: self._moved_on(client, d.id, a.n)) or "not recovered"
        f.recovered_s = time.time() - f.at if f.recovered_what != "not recovered" else None
        f.until = time.time()
        return f

    def _fault_driver(self, client: Client, rng: random.Random) -> Optional[Fault]:
        d = self._running_job(client, rng)
        if d is None:
            self.report.skipped.append("driver: no running job within 60 s")
            return None
        a = d.attempts[-1]
        status = self.server.state_dir / "attempts" / d.id / str(a.n) / "status.json"
        try:
            pid = json.loads(status.read_text())["pid"]
        except (OSError, ValueError, KeyError) as e:
            self.report.skipped.append(f"driver: {d.id} attempt {a.n}: no driver pid in {status} ({e!r})")
            return None
        f = Fault("driver", time.time(), f"{d.id}/a{a.n}", d.id, a.n)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.report.skipped.append(f"driver: {d.id} attempt {a.n}: driver pid {pid} had exited already")
            return None
        self.report.faults.append(f)
        f.recovered_what = self._poll(lambda: self._moved_on(client, d.id, a.n)) or "not recovered"
        f.recovered_s = time.time() - f.at if f.recovered_what != "not recovered" else None
        f.until = time.time()
        return f

    def _fault_raylet(self, client: Client, rng: random.Random) -> Optional[Fault]:
        from raybatch.scheduler.cluster import gcs_client, node_hex

        workers = {n.node_id: n for n in self.rc.cluster.worker_nodes}
        d = self._running_job(client, rng, lambda d: any(r.node_id in workers for r in d.attempts[-1].ranks),
                              limit=30.0)
        if d is not None:
            node_id = rng.choice([r.node_id for r in d.attempts[-1].ranks if r.node_id in workers])
        else:
            node_id = rng.choice(sorted(workers))
        victim = workers[node_id]
        before = self.rc.node_pids(victim)
        raylet = self.rc.raylet_pid(victim)
        f = Fault("raylet", time.time(), f"node {node_id[:8]}" + (f" ({d.id})" if d else ""),
                  d.id if d else "", d.attempts[-1].n if d else None)
        os.kill(raylet, signal.SIGKILL)
        self.report.faults.append(f)

        def dead():
            info = {node_hex(k): v for k, v in gcs_client(self.rc.address).get_all_node_info(timeout=10).items()}
            n = info.get(node_id)
            return n is not None and n.end_time_ms

        self._poll(dead, 120, 0.5)
        try:
            self.rc.cluster.remove_node(victim, allow_graceful=False)  # cluster_utils' books
        except Exception:  # noqa: BLE001
            pass
        self.rc.add_node(1)  # the cloud replaces the machine
        if d is not None:
            what = self._poll(lambda: self._moved_on(client, d.id, d.attempts[-1].n))
        else:
            what = "Ray marked the node dead; a new node joined"
        f.recovered_what = what or "not recovered"
        f.recovered_s = time.time() - f.at if what else None
        f.until = time.time()
        # Ray's own processes of the dead node that outlived its raylet are cleaned up at
        # the end; the jobs' processes are left alone: the invariants check those
        self.node_pids_after_kill += [p for p in before if p != raylet and job_of(p) is None]
        return f

    def _fault_server(self, client: Client, rng: random.Random) -> Optional[Fault]:
        old = self.server
        f = Fault("server", time.time(), f"pid {old.proc.pid}")
        window = [f.at - 0.1, float("inf")]
        self.server_down.append(window)
        old.kill(signal.SIGKILL)
        self.report.faults.append(f)
        pause = rng.uniform(1, 5)
        time.sleep(pause)
        new = ServerProcess(self.rc, old.state_dir, env=self.server_env)
        new.port, new.url = old.port, old.url  # as an operator restarts it: same state dir and port
        new.start()
        self.server = new
        window[1] = time.time()
        f.down_s = window[1] - f.at
        f.recovered_s = window[1] - f.at
        f.recovered_what = f"restarted after a {pause:.1f} s pause; /health answers"
        f.until = window[1]
        return f

    def _fault_azurite(self, client: Client, rng: random.Random) -> Optional[Fault]:
        f = Fault("azurite", time.time(), f"port {self.azurite.port}")
        window = [f.at, float("inf")]
        self.azurite_down.append(window)
        self.azurite.stop()
        self.report.faults.append(f)
        time.sleep(rng.uniform(3, 10))
        restart = time.time()
        self.azurite.start()
        window[1] = time.time()
        f.down_s = restart - f.at
        f.recovered_s = window[1] - f.at
        f.recovered_what = f"down {f.down_s:.1f} s; answering {window[1] - restart:.1f} s after its start"
        f.until = window[1]
        return f

    def _fault_disk(self, client: Client, rng: random.Random) -> Optional[Fault]:
        if self.tmpfs is None:
            return None
        filler = self.tmpfs / "chaos-filler.bin"
        f = Fault("disk", time.time(), str(self.tmpfs))
        window = [f.at, float("inf")]
        self.disk_full.append(window)
        hit = False
        self.report.faults.append(f)
        with open(filler, "wb") as out:
            chunk = b"\0" * 2**20
            try:
                while True:
                    out.write(chunk)
                    out.flush()
            except OSError as e:
                hit = "No space" in str(e) or getattr(e, "errno", None) == 28
        hold = rng.uniform(4, 8)
        # while full: submits must be refused with 503 (or taken, if SQLite found room)
        probe_answers = []
        t_end = time.time() + hold
        while time.time() < t_end:
            try:
                client.submit({"name": "chaos-noop-0", "experiment": "chaos", "command": "true"})
                probe_answers.append("201")
            except RaybatchError as e:
                probe_answers.append(str(e.status_code))
            time.sleep(0.5)
        filler.unlink()
        freed = time.time()

        def ok():
            client.list(limit=1)
            return True
        self._poll(ok, 60, 0.2)
        window[1] = time.time() + 2.0  # a request sent just before the disk was freed
        f.down_s = freed - f.at
        f.recovered_s = time.time() - f.at
        f.until = window[1]
        f.recovered_what = (f"ENOSPC {'hit' if hit else 'NOT hit'}; full {f.down_s:.1f} s; probe submits "
                            f"answered {','.join(sorted(set(probe_answers)))}; answering {time.time() - freed:.1f} s "
                            "after it was freed")
        return f

    # ---- the drain -------------------------------------------------------------------
    def _drain(self) -> None:
        client = self.client()
        deadline = time.monotonic() + self.cfg.drain_s
        left: list[str] = []
        while time.monotonic() < deadline:
            try:
                left = [j.id for j in client.list(state=["QUEUED", "STARTING", "RUNNING", "PREEMPTED",
                                                         "RESTARTING"], experiment="chaos", limit=5000)]
            except RaybatchError:
                left = ["?"]
            if not left:
                break
            time.sleep(1)
        if left:
            self.report.notes.append(f"drain: {len(left)} job(s) still not ended after {self.cfg.drain_s:.0f} s")
        client.close()

    # ---- invariants ------------------------------------------------------------------
    def _check(self) -> None:
        client = self.client()
        for s in client.list(experiment="chaos", limit=100000):
            self.report.jobs[s.id] = client.get(s.id)
        self.report.planned = dict(self.by_id)
        checks = [
            ("every job is in exactly one terminal state that its history explains", self._inv_terminal),
            ("no two attempts of a job ran at once, no attempt ran twice", self._inv_overlap),
            ("every SUCCEEDED job's outputs are complete and match their checksums",
             lambda: self._inv_outputs(client)),
            ("no process of an ended job is left", self._inv_processes),
            ("the server answered every request (5xx only 503 while the disk was full; no answer only "
             "while it was down on purpose)", self._inv_requests),
        ]
        for name, fn in checks:
            evidence = fn()
            if evidence:
                self.report.broken[name] = evidence
            else:
                self.report.held.append(name)
        client.close()
        self.report.requests = len(self.requests.rows)

    def _faults_on(self, job_id: str, attempt: int, kinds: tuple[str, ...]) -> list[Fault]:
        return [f for f in self.report.faults if f.kind in kinds and f.job == job_id and f.attempt == attempt]

    def _faults_during(self, a, kinds: tuple[str, ...], slack: float = 10.0) -> list[Fault]:
        start, end = a.started_at - slack, (a.ended_at or time.time()) + slack
        return [f for f in self.report.faults if f.kind in kinds and f.at <= end and (f.until or f.at) >= start]

    def _explain_attempt(self, d, a, kind: str) -> Optional[str]:
        """Why an attempt ended as it did, or None when nothing the run did explains it."""
        o = a.outcome
        if o == AttemptOutcome.SUCCEEDED.value:
            return "ok" if kind not in ("fail", "cancel") else None
        if o == AttemptOutcome.CANCELLED.value:
            return "cancel" if kind == "cancel" else None
        if o == AttemptOutcome.USER_ERROR.value:
            if kind == "fail" and a.exit_code == 3:
                return "its command exits 3"
            if self._faults_on(d.id, a.n, ("rank",)):
                return "a rank of it was SIGKILLed"
            if self._faults_during(a, ("disk",)):
                return "the state disk was full"
            return None
        if o == AttemptOutcome.NODE_LOST.value:
            if self._faults_on(d.id, a.n, ("raylet", "rank")) or self._faults_during(a, ("raylet",), 5):
                return "a raylet was killed"
            return None
        if o == AttemptOutcome.DRIVER_LOST.value:
            if self._faults_on(d.id, a.n, ("driver",)) or self._faults_during(a, ("server", "disk", "raylet")):
                return "its driver was killed (or the server/disk was down)"
            return None
        if o in (AttemptOutcome.UPLOAD_FAILED.value, AttemptOutcome.STORAGE_UNAVAILABLE.value):
            return "Azurite was down" if self._faults_during(a, ("azurite", "disk"), 30) else None
        if o in (AttemptOutcome.START_FAILED.value, AttemptOutcome.PLACEMENT_TIMEOUT.value):
            return "a fault during its start" if self._faults_during(a, ("raylet", "disk", "server", "azurite")) \
                else None
        return None

    def _inv_terminal(self) -> list[str]:
        bad = []
        for d in self.report.jobs.values():
            kind = kind_of(d.name)
            if not d.state.is_final:
                bad.append(f"{d.id} ({d.name}) is {d.state.value} after the drain: {d.reason}")
                continue
            tr = d.transitions
            if not tr or tr[0].from_state is not None or tr[0].to_state != JobState.QUEUED:
                bad.append(f"{d.id}: history does not start with -> QUEUED: {[t.to_state.value for t in tr[:2]]}")
            for x, y in zip(tr, tr[1:]):
                if y.from_state != x.to_state or y.to_state not in ALLOWED[x.to_state]:
                    bad.append(f"{d.id}: history {x.to_state.value} then {y.from_state and y.from_state.value}"
                               f" -> {y.to_state.value} at {y.at:.3f} ({y.reason})")
            finals = [t for t in tr if t.to_state in FINAL_STATES]
            if len(finals) != 1 or tr[-1].to_state != d.state:
                bad.append(f"{d.id}: {len(finals)} final transitions, last {tr[-1].to_state.value}, state "
                           f"{d.state.value}")
            starts = sum(1 for t in tr if t.to_state == JobState.STARTING)
            if starts != len(d.attempts):
                bad.append(f"{d.id}: {starts} STARTING transitions but {len(d.attempts)} attempts")
            if kind is None:
                continue
            for a in d.attempts:
                if a.ended_at is None or a.outcome is None:
                    bad.append(f"{d.id}: attempt {a.n} has no end ({a.outcome}, {a.ended_at})")
                elif self._explain_attempt(d, a, kind) is None:
                    bad.append(f"{d.id} ({d.name}): attempt {a.n} ended {a.outcome} (exit {a.exit_code}) with no "
                               f"fault to explain it: {a.reason}")
            last = d.attempts[-1].outcome if d.attempts else None
            want = {"SUCCEEDED": JobState.SUCCEEDED, "CANCELLED": JobState.CANCELLED}.get(last or "")
            if not d.attempts and d.state != JobState.CANCELLED:
                bad.append(f"{d.id} ({d.name}) is {d.state.value} without ever starting: {d.reason}")
            elif d.state == JobState.CANCELLED and kind != "cancel":
                bad.append(f"{d.id} ({d.name}) CANCELLED, but only cancel jobs are cancelled: {d.reason}")
            elif want is not None and d.state != want:
                bad.append(f"{d.id} ({d.name}) is {d.state.value} but its last attempt {last}")
            elif want is None and d.attempts and d.state != JobState.FAILED and d.state != JobState.CANCELLED:
                bad.append(f"{d.id} ({d.name}) is {d.state.value} after a last attempt {last}")
            if kind == "fail" and d.state == JobState.SUCCEEDED:
                bad.append(f"{d.id} ({d.name}) exits 3 but SUCCEEDED")
        return bad

    def _marks(self, job_id: str) -> list[tuple[str, str, str, float, int]]:
        p = self.marks / f"{job_id}.marks"
        if not p.exists():
            return []
        rows = []
        for line in p.read_text().splitlines():
            what, attempt, rank, t, pid = line.split()
            rows.append((what, attempt, rank, float(t), int(pid)))
        return rows

    def _inv_overlap(self) -> list[str]:
        bad = []
        for d in self.report.jobs.values():
            atts = sorted(d.attempts, key=lambda a: a.n)
            for a, b in zip(atts, atts[1:]):
                if a.ended_at is None or a.ended_at > b.started_at:
                    bad.append(f"{d.id}: attempt {a.n} ended at {a.ended_at} after attempt {b.n} started at "
                               f"{b.started_at}")
            marks = self._marks(d.id)
            starts: dict[tuple[str, str], int] = {}
            for what, attempt, rank, _, _ in marks:
                if what == "start":
                    starts[(attempt, rank)] = starts.get((attempt, rank), 0) + 1
            for (attempt, rank), n in starts.items():
                if n > 1:
                    bad.append(f"{d.id}: attempt {attempt} rank {rank} started {n} times (marks)")
            ended = {a.n: a.ended_at for a in atts}
            for a in atts:
                later_starts = [t for what, att, _, t, _ in marks if what == "start" and att.isdigit()
                                and int(att) > a.n]
                mine = [t for what, att, _, t, _ in marks if att == str(a.n)]
                last_mine = max(mine + [0.0])
                if later_starts and min(later_starts) < last_mine:
                    bad.append(f"{d.id}: a rank of attempt {a.n} was still running at {last_mine:.3f}, after a "
                               f"later attempt's rank started at {min(later_starts):.3f}")
                if mine and ended.get(a.n) and last_mine > ended[a.n] + 1.0:
                    bad.append(f"{d.id}: a rank of attempt {a.n} wrote at {last_mine:.3f}, after the attempt "
                               f"ended at {ended[a.n]:.3f}")
        return bad

    def _inv_outputs(self, client: Client) -> list[str]:
        bad = []
        dl = self.workdir / "downloads"
        for d in self.report.jobs.values():
            kind = kind_of(d.name)
            if d.state != JobState.SUCCEEDED or kind not in ("blob", "local", "ddp", "mpi"):
                continue
            p = self.by_id.get(d.id) or self.by_name.get(d.name)  # a submit sent again: same plan
            out = {"ddp": "model", "mpi": "result"}.get(kind, "data")
            dest = dl / d.id
            try:
                got = client.download(d.id, dest, f"outputs/{out}")
            except RaybatchError as e:
                bad.append(f"{d.id} ({d.name}): cannot download outputs/{out}: {e}")
                continue
            names = sorted(x.relative_to(dest).as_posix() for x in got)
            if kind == "mpi":
                try:
                    r = json.loads((dest / "result.json").read_text())
                    if r["allreduce_sum"] != r["size"] * (r["size"] + 1) // 2 or r["size"] != 2:
                        bad.append(f"{d.id}: result.json {r}")
                except (OSError, ValueError, KeyError) as e:
                    bad.append(f"{d.id} ({d.name}): no valid result.json in {d.outputs.get(out)} ({names}): {e!r}")
                continue
            if p is None:
                bad.append(f"{d.id} ({d.name}): SUCCEEDED, but the run has no record of submitting it")
                continue
            if kind == "ddp" and not {"model.pt", "metrics.json"} <= set(names):
                bad.append(f"{d.id} ({d.name}): model.pt/metrics.json missing from {d.outputs.get(out)}: {names}")
            for r in range(p.nodes):  # one process per node: RANK 0..nodes-1
                binf, shaf = dest / f"payload-{r}.bin", dest / f"payload-{r}.sha256"
                if not binf.exists() or not shaf.exists():
                    bad.append(f"{d.id} ({d.name}): rank {r}'s payload or checksum missing at "
                               f"{d.outputs.get(out)}: {names}")
                    continue
                data = binf.read_bytes()
                want = expected_payload(d.id, r, p.size)
                sha = shaf.read_text().strip()
                if data != want or hashlib.sha256(data).hexdigest() != sha:
                    bad.append(f"{d.id} ({d.name}): rank {r}'s payload is {len(data)} bytes (want {len(want)}), "
                               f"sha256 {hashlib.sha256(data).hexdigest()[:12]} vs written {sha[:12]} vs expected "
                               f"{hashlib.sha256(want).hexdigest()[:12]}")
        return bad

    def _inv_processes(self) -> list[str]:
        """Every pid of every attempt's ranks, and any process carrying an ended job's id,
        gone (a short grace: an ended attempt's last processes exit within seconds)."""
        ended = {d.id for d in self.report.jobs.values() if d.state.is_final}

        def leftovers() -> list[str]:
            out = []
            for d in self.report.jobs.values():
                if d.id not in ended:
                    continue
                for a in d.attempts:
                    for r in a.ranks:
                        if r.pid and process_alive(r.pid) and job_of(r.pid) == d.id:
                            out.append(f"{d.id} attempt {a.n} rank {r.rank} pid {r.pid} ({r.role}) alive; the job "
                                       f"ended {d.state.value} at {d.ended_at}")
            for job, pids in job_processes(ended).items():
                for pid in pids:
                    line = f"{job}: process {pid} alive, its command: {cmdline(pid)[:160]}"
                    if not any(str(pid) in o for o in out):
                        out.append(line)
            return out

        deadline = time.monotonic() + self.cfg.process_grace_s
        left = leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(2)
            left = leftovers()
        return left

    def _inv_requests(self) -> list[str]:
        bad = []

        def within(t: float, windows: list[list[float]], slack: float = 0.0) -> bool:
            return any(w[0] - slack <= t <= w[1] + slack for w in windows)

        for t, method, path, status, err in self.requests.rows:
            if status is None:
                if not within(t, self.server_down, 1.0):
                    bad.append(f"{time.strftime('%H:%M:%S', time.localtime(t))} {method} {path}: no answer while "
                               f"the server was up ({err})")
            elif status >= 500:
                if not (status == 503 and within(t, self.disk_full)):
                    bad.append(f"{time.strftime('%H:%M:%S', time.localtime(t))} {method} {path}: {status}")
        return bad


def run_chaos(config: ChaosConfig) -> Report:
    return Chaos(config).run()
