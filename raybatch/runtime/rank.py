"""The rank actor: one per process of the gang, placed in the job's placement
group. It spawns the user's command as a subprocess in its own session, tees
stdout/stderr to the job's files (and to the Ray job's log, so the dashboard
shows them), and stops it with SIGTERM -> grace -> SIGKILL.

If the actor itself dies (node lost, driver killed), a tiny shell watchdog kills
the user's process group, so no user process outlives its attempt."""

from __future__ import annotations

import ctypes
import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import ray

from raybatch.runtime.code import CodeCache
from raybatch.runtime.metrics import MetricCollector
from raybatch.private_dir import ensure_private_parents
from raybatch.runtime.protocol import SpawnError
from raybatch.runtime.secrets import Masker
from raybatch.storage.backends import open_backend
from raybatch.storage.datastores import Access
from raybatch.storage.plan import AttemptStorage
from raybatch.storage.staging import InputCache, download_tree
from raybatch.storage.sync import DirSync, LogSync, NodeSync

_PR_SET_PDEATHSIG = 1
PYLIB = str(Path(__file__).resolve().parents[1] / "pylib")  # raybatch_metrics


def _in_child() -> None:
    """In the child before exec (preexec_fn): get SIGKILL when the actor's process dies, and run at
    normal priority. Ray starts its workers, so this actor too, at niceness 15
    (RAY_worker_niceness); Ray's own job drivers, the user's main process, run at 0, and so
    should the user's ranks. Niced, they yield to every wake-up of Ray's and raybatch's
    daemons, and MPI ranks that busy-poll stall each other: an MPI recipe ran 1.48x its
    direct mpirun time. Lowering niceness needs CAP_SYS_NICE (root) or RLIMIT_NICE; where
    neither is there the rank keeps the actor's niceness (clusters raybatch starts set
    RAY_worker_niceness=0, so their workers are not niced in the first place)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass


def exit_code_of(returncode: int) -> int:
    """Popen's -N for 'killed by signal N' as a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _tee(src, path: Path, mirror, activity: list[float], lines: Optional[Callable[[bytes], None]] = None,
         mask: Optional[Masker] = None) -> None:
    """Copy a pipe to a file and to the actor's own stream; ``lines`` gets each complete
    line, undecoded (the metric parser, on stdout). ``mask``: the job's secret values become
    ``***`` before anything is written (the file, the actor's stream, which Ray copies
    into the job's log and its dashboard)."""
    pending = b""
    with open(path, "ab", buffering=0) as out:
        fd = src.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                if not mask:
                    break
                chunk, mask = mask.flush(), None  # the end held back for a value that did not come
                if not chunk:
                    break
            else:
                activity[0] = time.monotonic()
                if mask:
                    chunk = mask.feed(chunk)
                    if not chunk:
                        continue
            out.write(chunk)
            try:
                mirror.write(chunk)
                mirror.flush()
            except (OSError, ValueError):
                pass
            if lines is not None:
                if b"\n" in chunk:
                    *complete, pending = (pending + chunk).split(b"\n")
                    for raw in complete:
                        lines(raw)
                else:
                    pending += chunk
                    if len(pending) > 1 << 20:  # no newline in 1 MiB: not a metric line
                        pending = b""
    if lines is not None and pending:
        lines(pending)
    src.close()


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """A child's environment: the actor's, then the rank's, with this Python's bin directory
    first on PATH so that ``python``, ``mpirun``, ``torchrun`` are the job's environment's
    (a runtime_env virtualenv, or the node's venv) even when the node's PATH lacks it."""
    child = {**os.environ, **env}
    if env.get("PYTHONPATH") and os.environ.get("PYTHONPATH"):  # the job's first, then the node's
        child["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    # last: `import raybatch_metrics` works in any Python the job uses (an image, a venv)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (child.get("PYTHONPATH"), PYLIB) if p)
    bindir = os.path.dirname(sys.executable)
    path = child.get("PATH", "")
    if bindir and path.split(os.pathsep)[0] != bindir:
        child["PATH"] = bindir + (os.pathsep + path if path else "")
    child.setdefault("PYTHONUNBUFFERED", "1")
    return child


def _write_files(make_dirs: list[str], files: Optional[dict[str, str]]) -> None:
    for d in make_dirs:
        ensure_private_parents(d)  # the scratch root is this user's 0700 dir, checked on every node
        Path(d).mkdir(parents=True, exist_ok=True)
    for path, text in (files or {}).items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class RankActor:
    """Threaded actor: ``wait`` blocks while ``terminate`` can still be called."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.threads: list[threading.Thread] = []
        self.watchdog: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._activity = [time.monotonic()]  # when the process last printed anything
        self._staging = [0, 0]  # bytes done, bytes total of this node's inputs and checkpoints
        self.sync: Optional[NodeSync] = None
        self._released = threading.Event()  # ends wait() of a rank that runs nothing itself
        # processes started for mpirun (exec_start), each with the event its waiter sets
        self._execs: dict[int, tuple[subprocess.Popen, threading.Event]] = {}
        self._agent_server = None
        self.metrics: Optional[MetricCollector] = None

    def node_info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
        }

    def ensure_code(self, sha: str, box: Optional[list], cache_dir: str) -> Optional[str]:
        """The job's code package's directory on this node: from the node's cache, or
        unpacked from ``box`` (a list holding its object reference); None when the cache
        lacks it and no box came."""
        return CodeCache(cache_dir).ensure(sha, (lambda: ray.get(box[0])) if box else None)

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, argv: list[str], env: dict[str, str], cwd: Optional[str], log_dir: str,
              make_dirs: list[str], grace: float, files: Optional[dict[str, str]] = None,
              metrics: Optional[dict] = None, secrets: Optional[dict[str, str]] = None) -> int:
        """Start the rank's process. ``metrics``: collect its metrics (``runtime.metrics``):
        {store, file, mlflow_db, regex}. ``secrets``: the job's secrets, added to the process's
        environment only and masked in its output (``runtime.secrets``)."""
        _write_files([log_dir, *make_dirs], files)
        child_env = child_environment({**env, **(secrets or {})})
        self.threads = []  # a warm actor (an array job's slot) runs one process after another
        self.metrics = MetricCollector(metrics["store"], metrics["file"], metrics.get("mlflow_db"),
                                       metrics.get("regex")).start() if metrics else None
        with self._lock:
            try:
                self.proc = subprocess.Popen(
                    argv, env=child_env, cwd=cwd or os.getcwd(), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                    preexec_fn=_in_child,
                )
            except (OSError, subprocess.SubprocessError) as e:
                self._finish_metrics()
                raise SpawnError(spawn_words(e, argv, child_env)) from None
        pid = self.proc.pid
        if self._agent_server is not None:  # rank 0 of an mpi job: serve mpirun's session only
            self._agent_server.expect_session(pid)  # start_new_session: its session id is its pid
        self._activity[0] = time.monotonic()
        for src, name, mirror in ((self.proc.stdout, "stdout", sys.stdout.buffer),
                                  (self.proc.stderr, "stderr", sys.stderr.buffer)):
            parse = self.metrics.raw_line if self.metrics is not None and name == "stdout" else None
            mask = Masker(secrets.values()) if secrets else None
            t = threading.Thread(target=_tee, args=(src, Path(log_dir) / f"{name}.txt", mirror,
                                                    self._activity, parse, mask), daemon=True)
            t.start()
            self.threads.append(t)
        # Kills the process group if this actor's process disappears first, or its node's
        # raylet: a worker outlives a SIGKILLed raylet (Ray 2.60), and its rank would run on
        # beside the next attempt's.
        me, raylet = os.getpid(), _raylet_pid()
        # a dead raylet may stay a zombie a while (its parent reaps it late): read its state
        raylet_up = (f"{{ read -r _ _ st _ < /proc/{raylet}/stat && [ \"$st\" != Z ] && [ \"$st\" != X ]; }} "
                     "2>/dev/null") if raylet else "true"
        # (the orphaned actor goes first: the driver then sees the rank lost with its node, not
        # a rank that exited 143)
        script = (
            f"while kill -0 {me} 2>/dev/null && {raylet_up} && kill -0 -{pid} 2>/dev/null; do sleep 1; done; "
            f"if ! {raylet_up}; then kill -KILL {me} 2>/dev/null; fi; "
            f"if kill -0 -{pid} 2>/dev/null; then kill -TERM -{pid}; sleep {max(1, int(grace))}; "
            f"kill -KILL -{pid} 2>/dev/null; fi"
        )
        self.watchdog = subprocess.Popen(
            ["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        return pid

    # ---- storage: runs on this rank's node ------------------------------------------------
    def prepare(self, storage: dict, cache_dir: str, checkpoint_dir: Optional[str],
                uploads: Optional[dict] = None) -> dict:
        """Stage this node's ``download`` and ``upload`` inputs through the node's cache
        and, when the checkpoints are in blob storage, restore them into ``checkpoint_dir``.
        ``uploads``: input id -> a list holding the object reference of its zip, read only
        when the node's cache lacks it. Returns each input's local path and what was moved."""
        plan = AttemptStorage.from_dict(storage)
        cache = InputCache(cache_dir)
        done: dict[str, int] = {}
        totals: dict[str, int] = {}

        def progress(key: str):
            def cb(n: int, total: int) -> None:
                done[key], totals[key] = n, total
                self._staging = [sum(done.values()), sum(totals.values())]
            return cb

        out: dict = {"inputs": {}, "staged": {}, "checkpoint_files": 0}
        for ident, access in plan.inputs.items():
            mode = plan.input_modes.get(ident)
            if mode == "upload":
                box = (uploads or {}).get(ident)
                res = cache.stage_upload(access.uri, (lambda b=box: ray.get(b[0])) if box else None,
                                         progress(f"in:{ident}"))
                if res is None:
                    raise RuntimeError(f"input '{ident}': this node lacks the uploaded input and none was sent")
            elif mode == "download":
                res = cache.stage(open_backend(access), progress(f"in:{ident}"))
            else:
                continue
            out["inputs"][ident] = res.path
            out["staged"][ident] = {"files": res.files, "bytes": res.bytes_total,
                                    "downloaded": res.bytes_downloaded, "seconds": round(res.seconds, 3)}
        if checkpoint_dir and plan.checkpoints.kind != "local":
            ensure_private_parents(checkpoint_dir)
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            files, _ = download_tree(open_backend(plan.checkpoints), Path(checkpoint_dir), progress("ckpt"))
            out["checkpoint_files"] = files
        return out

    def stage_item(self, access: dict, cache_dir: str) -> str:
        """An array item (one file or tree) through this node's input cache: its local path."""
        return InputCache(cache_dir).stage(open_backend(Access.from_dict(access))).path

    def restore_dir(self, access: dict, local: str) -> int:
        """Everything under a location into ``local`` (an array task's checkpoints): files."""
        Path(local).mkdir(parents=True, exist_ok=True)
        return download_tree(open_backend(Access.from_dict(access)), Path(local))[0]

    def copy_tree(self, src: str, dest: str) -> str:
        """A private copy of a directory on this node (a sweep trial's code: what one trial
        writes next to its script, another never sees). Copies, not hard links: a file
        opened for writing in place would change the node's cached package."""
        if not Path(dest).is_dir():
            tmp = f"{dest}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, symlinks=True)
            os.replace(tmp, dest)
        return dest

    def staging_progress(self) -> list[int]:
        return list(self._staging)

    def start_sync(self, dirs: list[tuple[str, dict]], logs: list[tuple[str, dict, str]],
                   interval: float) -> None:
        """Copy this rank's logs (and, on one rank per node, outputs and checkpoints) out
        while the process runs."""
        self.sync = NodeSync(
            [DirSync(Path(local), open_backend(Access.from_dict(a))) for local, a in dirs],
            [LogSync(Path(local), open_backend(Access.from_dict(a)), rel) for local, a, rel in logs],
            interval,
        )
        self.sync.start()

    def finish_sync(self, timeout: float) -> dict:
        """The last pass, after the process ended: what could not be uploaded, and why."""
        sync, self.sync = self.sync, None  # a warm actor starts a new one for its next process
        if sync is None:
            return {"unsynced": [], "error": None}
        report = sync.finish(timeout)
        return {"unsynced": report.unsynced, "error": report.error,
                "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname()}

    def idle_seconds(self) -> float:
        """Seconds since the process last wrote to stdout or stderr (or started)."""
        return time.monotonic() - self._activity[0]

    def hold(self, make_dirs: list[str], files: Optional[dict[str, str]] = None) -> None:
        """This rank runs nothing itself (an MPI node, a first-node-only job's other nodes):
        it keeps its share of the node, and ``wait`` returns when it is terminated."""
        _write_files(make_dirs, files)
        with self._lock:
            self.proc = None
            self._released.clear()
        return None

    def wait(self) -> int:
        if self.proc is None:  # held: returns when terminated (or raises if the node dies)
            self._released.wait()
            return 0
        code = self.proc.wait()
        for t in self.threads:
            t.join(timeout=5)
        self._finish_metrics()
        return exit_code_of(code)

    def _finish_metrics(self) -> None:
        m = self.metrics
        if m is not None and not m.done:
            m.finish()

    def metric_events(self, cursor: int, timeout: float) -> tuple[list[dict], bool]:
        """The process's metric events past ``cursor`` (waiting up to ``timeout`` for one),
        and whether there will be no more."""
        m = self.metrics
        if m is None:
            return [], True
        return m.since(cursor, timeout)

    def tail(self, path: str, nbytes: int) -> str:
        """The end of a file on this node (a failed prepare command's stderr)."""
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - nbytes))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def remove_dir(self, path: str) -> None:
        """Remove a per-attempt scratch directory on this node (AZ_BATCHAI_JOB_TEMP)."""
        shutil.rmtree(path, ignore_errors=True)

    # ---- mpirun's remote daemons (raybatch.runtime.mpi_agent) --------------------------------
    def serve_mpi_agent(self, path: str, nodes: dict[str, dict], own_uts: bool,
                        hostfile: str, total_slots: int) -> str:
        """On rank 0: answer mpirun's agents (HOST -> that node's first rank actor). When
        the gang's nodes share a host name and this machine cannot give a daemon its own
        (no ``unshare --uts``), every process runs under the first node's daemon instead."""
        from raybatch.runtime import mpi_agent  # noqa: PLC0415

        note = ""
        if own_uts and not mpi_agent.uts_available():
            first = next(iter(nodes))
            Path(hostfile).write_text(f"{first} slots={total_slots}\n")
            nodes = {first: nodes[first]}
            own_uts = False
            note = ("the gang's nodes share one host name and `unshare --uts` is not permitted here: "
                    f"all {total_slots} MPI processes run on the first node")
        self._agent_server = mpi_agent.AgentServer(path, nodes, own_uts)
        return note

    def exec_start(self, argv: list[str], env: dict[str, str], cwd: Optional[str], log_dir: str) -> int:
        """Start a process for another rank's mpirun (this node's MPI daemon); its output is
        appended to this rank's log. Returns a handle for exec_wait / exec_kill."""
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(log_dir) / "stdout.txt", "ab") as out, open(Path(log_dir) / "stderr.txt", "ab") as err:
            proc = subprocess.Popen(
                argv, env=child_environment(env), cwd=cwd if cwd and os.path.isdir(cwd) else None,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                preexec_fn=_in_child,
            )
        self._activity[0] = time.monotonic()
        # a thread blocked in wait(): Popen.wait(timeout) polls (up to 20 wake-ups a second),
        # and every wake-up on a node whose cores run busy-polling MPI ranks stalls them
        ended = threading.Event()
        threading.Thread(target=lambda: (proc.wait(), ended.set()), daemon=True).start()
        with self._lock:
            self._execs[proc.pid] = (proc, ended)
        return proc.pid

    def exec_wait(self, handle: int, timeout: float) -> Optional[int]:
        """The process's exit code, or None if it still runs after ``timeout`` seconds."""
        proc, ended = self._execs[handle]
        if not ended.wait(timeout):
            return None
        return exit_code_of(proc.returncode)

    def exec_kill(self, handle: int, grace: float = 2.0) -> None:
        if handle in self._execs:
            _stop_group(self._execs[handle][0], grace)

    def terminate(self, grace: float) -> tuple[Optional[int], bool]:
        """SIGTERM the whole process group, wait ``grace`` seconds, then SIGKILL (and the
        same for processes started for mpirun); a held rank is released. Returns the
        command's exit code and whether it was still running when it was signalled (one that
        had already exited ended on its own, whatever stopped the others)."""
        for proc, _ended in list(self._execs.values()):
            _stop_group(proc, grace)
        if self._agent_server is not None:
            self._agent_server.close()
        self._released.set()
        proc = self.proc
        if proc is None:
            return None, False
        code, signalled = _stop_group(proc, grace)
        for t in self.threads:
            t.join(timeout=5)
        self._finish_metrics()
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait()
        return exit_code_of(code), signalled


def _raylet_pid() -> Optional[int]:
    """The raylet this worker process hangs under (its parent, or its parent's parent when a
    runtime_env's setup process sits between), or None when it cannot be told."""
    pid = os.getpid()
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "raylet":
                    return pid
        except (OSError, ValueError, IndexError):
            return None
    return None


def spawn_words(error: BaseException, argv: list[str], env: dict[str, str]) -> str:
    """Why the kernel refused to start a rank, in words a user can act on."""
    what = f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"
    if isinstance(error, OSError) and error.errno == errno.E2BIG:
        largest = max([*((len(a), "an argument of the command") for a in argv),
                       *((len(k) + len(v) + 1, f"the environment variable {k}") for k, v in env.items())])
        total = sum(len(a) + 1 for a in argv) + sum(len(k) + len(v) + 2 for k, v in env.items())
        return (f"the rank's process could not be started: {what} (command + environment {total} bytes; "
                f"the largest is {largest[1]}, {largest[0]} bytes; Linux refuses any one over 131072 bytes "
                "and all of them together over its ARG_MAX)")
    return f"the rank's process could not be started: {what} (command {shlex.join(argv)[:200]!r})"


def _stop_group(proc: subprocess.Popen, grace: float) -> tuple[int, bool]:
    """SIGTERM the process's group, wait ``grace`` seconds, SIGKILL the group (it may hold
    children after the leader exited); the leader's return code, and whether the leader
    was still running when it got the SIGTERM."""
    signalled = proc.poll() is None
    if signalled:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc.pid, signal.SIGKILL)
    return proc.wait(), signalled


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
