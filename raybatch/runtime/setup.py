"""Getting a gang's nodes ready before any rank starts, in the order the driver runs it:

1. ``check_storage``: every location reachable (inputs read, the rest written), before
   anything is reserved: a bad location fails in seconds, not a gang's worth of time;
2. ``build_environment``: the job's ``packages``/``image`` built by Ray on every node;
3. ``stage_inputs``: ``download`` and ``upload`` inputs and blob checkpoints on every node
   (phase STAGING);
4. ``ship_code``: the job's code package in every node's cache;
5. ``run_prepare``: the job's ``prepare`` command once per node (phase PREPARING);
6. ``start_mpi_agent``: for mpirun frameworks, rank 0's agent server.

Each step that can fail returns an ``Outcome`` (why, and what kind of failure), or None.
Steps take a ``stopped()`` callable: true once the attempt is asked to stop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import ray
from ray.exceptions import RayActorError, RuntimeEnvSetupError

from raybatch.frameworks import mpi
from raybatch.runtime import environment
from raybatch.runtime.code import package_code
from raybatch.runtime.gang import Gang, as_completed, cause_of
from raybatch.runtime.launch import AttemptDirs, RankLaunch, prepare_log_dir
from raybatch.runtime.protocol import CodeRef, Outcome, Phase, Staging
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import StorageError, open_backend
from raybatch.storage.plan import AttemptStorage, environment_log, prepare_logs
from raybatch.storage.plan import join as storage_join

TICK_S = 0.5  # how often a step that waits checks for a stop and reports progress
CHECK_GRACE_S = 30.0  # a failed build waits this long for the pip check's words (it names the package)

Log = Callable[[str], None]
Stopped = Callable[[], bool]
ReportFn = Callable[..., None]


def _failed(message: str, kind: AttemptOutcome = AttemptOutcome.START_FAILED) -> Outcome:
    return Outcome(kind, None, message)


def check_storage(storage: AttemptStorage, timeout_s: float, stopped: Stopped, log: Log) -> Optional[Outcome]:
    """Can every location be reached (inputs read, everything else written)? Retries
    transient errors for up to ``timeout_s``; the first lasting problem."""
    st = storage
    checks: list[tuple[str, Any, bool]] = []
    for ident, access in st.inputs.items():
        checks.append((f"input '{ident}'", access, False))
    if st.over is not None:
        checks.append(("array.over", st.over, False))
    if st.resume_items is not None:
        checks.append(("the resumed job's items", st.resume_items, False))
    for name, access in [("logs", st.logs), ("checkpoints", st.checkpoints),
                         *((f"output '{i}'", a) for i, a in st.outputs.items()),
                         *((("items", st.items),) if st.items is not None else ()),
                         *((("trials", st.trials),) if st.trials is not None else ())]:
        if access.kind != "local":
            checks.append((name, access, True))
    seen: set[tuple] = set()
    for name, access, write in checks:
        if access.kind == "upload":  # uploaded with the job: the zip the driver sends from here
            if not Path(access.path).is_file():
                return _failed(f"{name}: the input uploaded with the job ({access.uri}) is not in the server's "
                               f"store ({access.path}); submit the job again")
            continue
        if access.kind == "local" and not write:
            if not Path(access.path).exists():
                return _failed(f"{name}: path {access.path} does not exist on the head node")
            continue
        key = (access.endpoint, access.container, access.credential_kind, access.secret, access.path, write)
        if key in seen:
            continue
        seen.add(key)
        deadline = time.monotonic() + timeout_s
        delay = 1.0
        while True:
            try:
                backend = open_backend(access)
                if write:
                    backend.check(write=True)
                elif not backend.list():
                    backend.check(write=False)  # a missing container says so
                    raise StorageError(access.uri, "no such file or directory (nothing is stored there)")
                break
            except StorageError as e:
                if not e.transient or time.monotonic() + delay > deadline or stopped():
                    return _failed(f"{name}: {e}")
                log(f"{name}: {e} (retrying in {delay:.0f} s)")
                time.sleep(delay)
                delay = min(8.0, delay * 2)
    return None


def build_environment(gang: Gang, storage: AttemptStorage, attempt: int, cache_dir: str,
                      stopped: Stopped, log: Log) -> Optional[Outcome]:
    """With ``packages`` or ``image``: wait until Ray has built the job's environment on
    every node and the rank actors run in it (an env already built on a node is reused).
    A pip list that cannot be installed fails fast (``environment.RequirementsCheck``, on
    node 0 of the gang: pip fetches and builds there, never on the head); a failed
    build's output goes to stdouterr/attempt-<n>/environment/."""
    spec = gang.spec
    if environment.runtime_env(spec) is None:
        return None
    what = environment.describe(spec)
    log(f"building the job's environment ({what}) on {spec.nodes} node(s)")
    marker = environment.ok_marker(cache_dir, spec)
    check = None
    if spec.packages and spec.packages.pip and not marker.exists():
        check = environment.RequirementsCheck(spec, gang.pg, 0).start()
        log("checking the pip list with `pip install --dry-run` on node 0 of the gang")
    refs = {a.node_info.remote(): i for i, a in enumerate(gang.actors)}
    waiting = set(refs.values())
    t0 = last_note = time.monotonic()
    try:
        for done in as_completed(refs, TICK_S):
            if done is not None:
                waiting.discard(done.key)
                if isinstance(done.error, RuntimeEnvSetupError):
                    # the dry-run check names what cannot be installed; Ray's error often only
                    # the command that failed: wait a little for the check when it is still running
                    verdict = check.wait(CHECK_GRACE_S) if check is not None else None
                    if verdict is not None:
                        return _environment_failed(spec, storage, attempt, None, verdict, log)
                    return _environment_failed(spec, storage, attempt, gang.node_rank(done.key), str(done.error), log)
                if done.error is not None:
                    raise done.error
                continue
            if stopped():
                return _failed("stopped while building the job's environment")
            if check is not None and (failed := check.poll()) is not None:
                return _environment_failed(spec, storage, attempt, None, failed, log)
            if time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                log(f"still building the job's environment ({time.monotonic() - t0:.0f} s)")
    finally:
        if check is not None:
            check.stop()
        if waiting:  # given up: actors still waiting for their env would answer no call
            gang.kill_actors()
    log(f"environment ready on {spec.nodes} node(s) in {time.monotonic() - t0:.1f} s")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass
    return None


def _environment_failed(spec: Any, storage: AttemptStorage, attempt: int, node_rank: Optional[int],
                        output: str, log: Log) -> Outcome:
    """A failed build: its cause in a few lines, and its full log, both without credentials."""
    rel = environment_log(attempt, node_rank)
    where = ""
    try:
        where = environment.write_log(storage, rel, output)
    except Exception as e:  # noqa: BLE001 - the reason still says what failed
        log(f"could not write {rel}: {e}")
    what = environment.describe(spec)
    on = (f" on node {node_rank}" if node_rank is not None
          else ": `pip install --dry-run` of the list on node 0 fails")
    summary = environment.failure_summary(output, spec)
    log(f"the job's environment ({what}) could not be built{on}")
    return _failed(f"the job's environment ({what}) could not be built{on}: {summary}"
                   + (f"; the full log is in {where}" if where else ""))


def stage_inputs(gang: Gang, storage: AttemptStorage, dirs: AttemptDirs, cache_dir: str,
                 stopped: Stopped, report: ReportFn, log: Log,
                 checkpoints: bool = True) -> dict[int, dict[str, str]] | Outcome:
    """Stage ``download`` inputs and restore blob checkpoints on every node of the gang,
    once per node (its first rank), reporting progress. Node rank -> input id -> local
    path, or why it failed (STORAGE_UNAVAILABLE when a blip outlasted the retries).
    ``checkpoints=False``: a slot's gang, which restores each unit's own before it runs."""
    st = storage
    downloads = [i for i, m in st.input_modes.items() if m in ("download", "upload")]
    restore = checkpoints and st.checkpoints.kind != "local"
    if not downloads and not restore:
        return {}
    firsts = gang.first_actors()
    uploads = {}  # inputs uploaded with the job: their zips, read by the nodes that lack them
    for ident in downloads:
        access = st.inputs[ident]
        if st.input_modes[ident] == "upload":
            try:
                uploads[ident] = [ray.put(Path(access.path).read_bytes())]
            except OSError as e:
                return _failed(f"input '{ident}': the input uploaded with the job cannot be read on the "
                               f"driver's node: {e}")
    refs = {a.prepare.remote(st.to_dict(secrets=True), cache_dir,
                             str(dirs.node_mirror(k) / "checkpoints") if restore else None, uploads): k
            for k, a in firsts.items()}
    log(f"staging {len(downloads)} input(s){' and checkpoints' if restore else ''} on {len(firsts)} node(s)")
    staged: dict[int, dict[str, str]] = {}
    waiting = set(refs.values())
    t0 = time.monotonic()
    for done in as_completed(refs, TICK_S):
        if done is None:
            if stopped():
                return _failed("stopped while staging")
            prog = ray.get([firsts[k].staging_progress.remote() for k in waiting])
            report(Phase.STAGING, staging=Staging(bytes_done=sum(p[0] for p in prog),
                                                  bytes_total=sum(p[1] for p in prog),
                                                  nodes_left=len(waiting),
                                                  seconds=round(time.monotonic() - t0, 1)))
            continue
        k = done.key
        waiting.discard(k)
        if isinstance(done.error, RayActorError):
            raise done.error
        if done.error is not None:
            cause = cause_of(done.error)
            # still failing after the stager's retries: a blip outlasted them (the
            # locations were checked a moment ago), so the infrastructure budget pays
            transient = isinstance(cause, StorageError) and cause.transient
            return _failed(f"staging on node {k}: {cause}",
                           AttemptOutcome.STORAGE_UNAVAILABLE if transient else AttemptOutcome.START_FAILED)
        result = done.value
        staged[k] = result["inputs"]
        for ident, info in result["staged"].items():
            log(f"node {k}: input '{ident}': {info['files']} file(s), {info['bytes']} bytes, "
                f"{info['downloaded']} downloaded, {info['seconds']:.2f} s")
        if result["checkpoint_files"]:
            log(f"node {k}: restored {result['checkpoint_files']} checkpoint file(s)")
    return staged


def ship_code(gang: Gang, code: Optional[CodeRef], cache_dir: str, log: Log) -> dict[int, str] | Outcome:
    """Node rank -> the job's code directory there (``raybatch.runtime.code``). Nodes whose
    cache has the package answer at once; only for the others is the zip read and put
    in the object store, and unpacked there."""
    if code is None:
        return {}
    firsts = gang.first_actors()
    dirs = _code_replies({k: a.ensure_code.remote(code.sha, None, cache_dir) for k, a in firsts.items()})
    if isinstance(dirs, Outcome):
        return dirs
    missing = [k for k, d in dirs.items() if d is None]
    if missing:
        zipped = Path(code.zip)
        try:
            # a package uploaded before the server kept the zip: zip its unpacked tree
            data = zipped.read_bytes() if zipped.is_file() else package_code(code.dir)[1]
        except OSError as e:
            return _failed(f"the job's code package {code.sha[:12]} cannot be read on the driver's node: {e}")
        box = [ray.put(data)]  # in a list: Ray passes the reference, the actor gets the bytes
        fetched = _code_replies({k: firsts[k].ensure_code.remote(code.sha, box, cache_dir) for k in missing})
        if isinstance(fetched, Outcome):
            return fetched
        dirs.update(fetched)
    log(f"code {code.sha[:12]}: unpacked on {len(missing)} node(s), cached on {len(dirs) - len(missing)}")
    return dirs  # type: ignore[return-value]


def _code_replies(refs: dict[int, Any]) -> dict[int, Optional[str]] | Outcome:
    out = {}
    for k, ref in refs.items():
        try:
            out[k] = ray.get(ref)
        except RayActorError:
            raise
        except ray.exceptions.RayError as e:
            return _failed(f"could not unpack the job's code on node {k}: {cause_of(e)}")
    return out


def run_prepare(gang: Gang, launches: list[RankLaunch], storage: AttemptStorage, dirs: AttemptDirs,
                stopped: Stopped, report: ReportFn, log: Log) -> Optional[Outcome]:
    """The job's ``prepare`` command once on every node (its first rank's actor, with
    that rank's environment), before any rank starts; Batch AI's jobPreparation. Its
    output: stdouterr/attempt-<n>/prepare/node-<k>/."""
    spec = gang.spec
    firsts = {}
    for node_rank, actor in gang.first_actors().items():
        launch = launches[node_rank * gang.P]
        log_dir = prepare_log_dir(storage, dirs, node_rank)
        ray.get(actor.start.remote(["/bin/bash", "-c", spec.prepare], launch.env, launch.cwd, log_dir,
                                   launch.make_dirs, spec.grace_period, launch.files, None,
                                   gang.secrets or None))
        firsts[actor.wait.remote()] = (node_rank, actor, log_dir)
    log(f"prepare: running on {len(firsts)} node(s)")
    report(Phase.PREPARING)
    waiting = dict((v[0], v[1]) for v in firsts.values())
    for done in as_completed(firsts, TICK_S):
        if done is None:
            if stopped():
                for actor in waiting.values():
                    ray.get(actor.terminate.remote(spec.grace_period))
                return _failed("stopped while the prepare command ran")
            continue
        node_rank, actor, log_dir = done.key
        waiting.pop(node_rank)
        if done.error is not None:
            raise done.error
        code = done.value
        if code != 0:
            for other in waiting.values():
                other.terminate.remote(0)
            tail = ray.get(actor.tail.remote(str(Path(log_dir) / "stderr.txt"), 2000))
            where = storage_join(storage.logs.uri or storage.logs.path, prepare_logs(dirs.attempt, node_rank))
            return _failed(f"prepare failed on node {node_rank} with exit code {code}; its output is in "
                           f"{where}/" + (f"; stderr ends with: {tail.strip()}" if tail.strip() else ""))
    log("prepare: done on every node")
    return None


def start_mpi_agent(gang: Gang, launches: list[RankLaunch], infos: list[dict[str, Any]], log: Log) -> None:
    """mpirun (in rank 0) reaches the other nodes through rank 0's actor, which starts
    each node's MPI daemon in that node's first rank actor (Open MPI's rsh agent)."""
    spec = gang.spec
    nodes = {}
    for node_rank in range(spec.nodes):
        launch = launches[node_rank * gang.P]
        # the daemon's processes (the job's MPI ranks) inherit its environment, secrets included
        nodes[mpi.host_name(node_rank)] = {"actor": gang.actors[node_rank * gang.P],
                                           "env": mpi.daemon_env({**launch.env, **gang.secrets}),
                                           "cwd": launch.cwd, "log_dir": launch.log_dir}
    hostnames = [infos[k * gang.P]["hostname"] for k in range(spec.nodes)]
    # several Ray nodes of one machine (a laptop, the tests' cluster) report one host name,
    # which Open MPI cannot tell apart: each daemon then gets its own UTS namespace
    own_uts = len(set(hostnames)) < len(hostnames)
    env0 = launches[0].env
    info = ray.get(gang.actors[0].serve_mpi_agent.remote(
        env0[mpi.AGENT_SOCKET_ENV], nodes, own_uts, env0[mpi.HOSTFILE_ENV], spec.world_size))
    log(f"mpi: {spec.nodes} node(s) as {', '.join(nodes)}"
        + (" (one UTS namespace each: the nodes share a host name)" if own_uts else "")
        + (f"; {info}" if info else ""))
