"""The entrypoint of an attempt's Ray Job: ``python -m raybatch.runtime.driver ATTEMPT_JSON``.

1. reserve one placement group for the whole gang (STRICT_SPREAD by default);
2. start one rank actor per process, rank 0 picks MASTER_PORT on its node;
3. start every rank's process with the env contract, report "running";
4. watch: the first rank to exit non-zero, a lost rank, a stop request from the
   server (``control.json``: cancel), SIGTERM from outside raybatch (``ray job
   stop``: reported as DRIVER_LOST) or the wall-clock limit ends the attempt; the
   other ranks get SIGTERM -> grace -> SIGKILL;
5. when outputs, checkpoints or logs live in blob storage: each node's last sync
   (retried with backoff until FINAL_SYNC_TIMEOUT_S); the attempt fails with the
   files that are not out, and their local copies are kept;
6. free the placement group, then report "done" with each rank's exit code.

Storage is checked before anything is reserved (a bad location fails in seconds),
and ``download`` inputs and blob checkpoints are staged on every node after the
gang is placed and before any rank starts (phase "staging", with progress).

The server reads the reports from ``status.json`` (see ``layout``)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import ray
from ray.exceptions import RayActorError, RayError, RuntimeEnvSetupError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raybatch import frameworks
from raybatch.frameworks import mpi
from raybatch.frameworks.base import RankContext
from raybatch.runtime import environment, layout
from raybatch.runtime.rank import RankActor
from raybatch.spec.job import JobSpec
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import StorageError, open_backend
from raybatch.storage.plan import AttemptStorage
from raybatch.storage.plan import join as storage_join

PLACEMENT_TIMEOUT_S = float(os.environ.get("RAYBATCH_PLACEMENT_TIMEOUT_S", "120"))
FAILURE_STOP_GRACE_S = 10.0  # when one rank failed, the others get at most this
EXTERNAL_STOP_GRACE_S = 1.5  # stopped outside raybatch: Ray kills the driver after 3 s
NODE_LOST_GRACE_S = 2.0  # the gang is broken: survivors are usually stuck in a collective
STALL_CHECK_S = 2.0
# how often a running attempt looks at its control file, signals and wall clock; a rank's
# exit wakes ray.wait at once. Every wake-up takes CPU from ranks on the driver's node.
WAIT_TICK_S = 0.5
LOST_RANK_CHECK_S = 20.0  # after a rank failed: how long to wait for Ray's verdict on the others
STORAGE_CHECK_S = 20.0        # retrying transient errors before failing the attempt
FINAL_SYNC_TIMEOUT_S = 300.0  # the last upload's retries (both: the server's settings win)


class Attempt:
    def __init__(self, attempt_file: str):
        self.info = layout.read_json(attempt_file)
        if self.info is None:
            raise SystemExit(f"cannot read {attempt_file}")
        self.spec = JobSpec.model_validate(self.info["spec"])
        self.framework = frameworks.get(self.spec.framework)
        self.job_id: str = self.info["job_id"]
        self.n: int = self.info["attempt"]
        self.job_dir = Path(self.info["job_dir"])
        self.status_file = self.info["status_file"]
        self.control_file = Path(self.status_file).with_name("control.json")
        self.stop = threading.Event()
        self.stop_reason: Optional[tuple[AttemptOutcome, str]] = None
        self.lost_nodes: set[str] = set()
        self.job_temps: list[str] = []  # per rank, removed when the attempt ends
        self.started = time.monotonic()
        self.pg = None
        self.actors: list[Any] = []
        self.ranks: list[dict[str, Any]] = []
        self.contexts: list[RankContext] = []
        self.storage = self.load_storage()
        self.cache_dir = self.info.get("cache_dir") or str(Path.home() / ".cache" / "raybatch")
        # this attempt's local copies of blob outputs/checkpoints/logs, one per node of the gang
        self.mirror = Path(tempfile.gettempdir()) / "raybatch-mirror" / self.job_id / f"attempt-{self.n}"
        self.staged_inputs: dict[int, dict[str, str]] = {}  # node rank -> input id -> local path
        self.unsynced: list[str] = []
        self.synced: Optional[bool] = None  # None: no final upload yet; True: everything is out
        self.staging_transient = False
        self.storage_check_s = float(self.info.get("storage_check_s") or STORAGE_CHECK_S)
        self.final_sync_timeout_s = float(self.info.get("final_sync_timeout_s") or FINAL_SYNC_TIMEOUT_S)

    def load_storage(self) -> AttemptStorage:
        """The resolved locations; credentials come in a file only the server's user can
        read, removed as soon as it is read."""
        secrets = self.control_file.with_name("secrets.json")
        data = layout.read_json(secrets)
        secrets.unlink(missing_ok=True)
        return AttemptStorage.from_dict(data if data is not None else self.info["storage"])

    # ---- reporting ---------------------------------------------------------
    def report(self, phase: str, **extra: Any) -> None:
        layout.write_json_atomic(
            self.status_file,
            {"phase": phase, "at": time.time(), "pid": os.getpid(), "ranks": self.ranks, **extra},
        )

    def log(self, msg: str) -> None:
        print(f"[raybatch +{time.monotonic() - self.started:.2f}s] {msg}", flush=True)

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_reason is None:
            self.stop_reason = (AttemptOutcome.DRIVER_LOST,
                                f"the attempt's driver got {signal.Signals(signum).name} from outside raybatch")
        self.stop.set()

    def check_control(self) -> bool:
        """Has the server asked this attempt to stop? (``control.json``, written atomically)"""
        if not self.stop.is_set() and self.control_file.exists():
            request = layout.read_json(self.control_file) or {}
            action = request.get("action")
            if action == "cancel":
                self.stop_reason = (AttemptOutcome.CANCELLED, "cancelled by user")
                self.stop.set()
            elif action == "preempt":
                self.stop_reason = (AttemptOutcome.PREEMPTED,
                                    request.get("reason") or "preempted by a higher-priority job")
                self.stop.set()
        return self.stop.is_set()

    # ---- steps -------------------------------------------------------------
    def check_storage(self) -> Optional[str]:
        """Can every location be reached (inputs read, everything else written)? Retries
        transient errors for up to storage_check_s; the first lasting problem, in words."""
        st = self.storage
        checks: list[tuple[str, Any, bool]] = []
        for ident, access in st.inputs.items():
            checks.append((f"input '{ident}'", access, False))
        for name, access in [("logs", st.logs), ("checkpoints", st.checkpoints),
                             *((f"output '{i}'", a) for i, a in st.outputs.items())]:
            if access.kind != "local":
                checks.append((name, access, True))
        seen: set[tuple] = set()
        for name, access, write in checks:
            if access.kind == "local" and not write:
                if not Path(access.path).exists():
                    return f"{name}: path {access.path} does not exist on the head node"
                continue
            key = (access.endpoint, access.container, access.credential_kind, access.secret, access.path, write)
            if key in seen:
                continue
            seen.add(key)
            deadline = time.monotonic() + self.storage_check_s
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
                    if not e.transient or time.monotonic() + delay > deadline or self.check_control():
                        return f"{name}: {e}"
                    self.log(f"{name}: {e} (retrying in {delay:.0f} s)")
                    time.sleep(delay)
                    delay = min(8.0, delay * 2)
        return None

    def build_environment(self) -> Optional[str]:
        """With ``packages`` or ``image``: wait until Ray has built the job's environment on
        every node and the rank actors run in it (an env already built on a node is reused).
        A pip list that cannot be installed fails fast (``environment.RequirementsCheck``);
        a failed build's output goes to stdouterr/attempt-<n>/environment/. A problem in
        words, or None."""
        spec = self.spec
        if environment.runtime_env(spec) is None:
            return None
        what = environment.describe(spec)
        self.log(f"building the job's environment ({what}) on {spec.nodes} node(s)")
        marker = environment.ok_marker(self.cache_dir, spec)
        check = None
        if spec.packages and spec.packages.pip and not marker.exists():
            check = environment.RequirementsCheck(spec).start()
        pending = {a.node_info.remote(): i for i, a in enumerate(self.actors)}
        t0 = last_note = time.monotonic()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except RuntimeEnvSetupError as e:
                        return self.environment_failed(i // spec.processes_per_node, str(e))
                if not pending:
                    break
                if self.check_control():
                    return "stopped while building the job's environment"
                if check is not None and (failed := check.poll()) is not None:
                    return self.environment_failed(None, failed)
                if time.monotonic() - last_note > 30:
                    last_note = time.monotonic()
                    self.log(f"still building the job's environment ({time.monotonic() - t0:.0f} s)")
        finally:
            if check is not None:
                check.stop()
            if pending:  # given up: actors still waiting for their env would answer no call
                for a in self.actors:
                    ray.kill(a, no_restart=True)
        self.log(f"environment ready on {spec.nodes} node(s) in {time.monotonic() - t0:.1f} s")
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass
        return None

    def environment_failed(self, node_rank: Optional[int], output: str) -> str:
        """The reason for a failed build (its cause in a few lines) and its full log, both
        without credentials."""
        spec = self.spec
        rel = f"attempt-{self.n}/environment/" + (f"node-{node_rank}.txt" if node_rank is not None
                                                 else "pip-check.txt")
        where = ""
        try:
            where = environment.write_log(self.storage, rel, output)
        except Exception as e:  # noqa: BLE001 - the reason still says what failed
            self.log(f"could not write {rel}: {e}")
        what = environment.describe(spec)
        on = (f" on node {node_rank}" if node_rank is not None
              else ": `pip install --dry-run` of the list on the driver's node fails")
        summary = environment.failure_summary(output, spec)
        self.log(f"the job's environment ({what}) could not be built{on}")
        return (f"the job's environment ({what}) could not be built{on}: {summary}"
                + (f"; the full log is in {where}" if where else ""))

    def prepare_nodes(self) -> Optional[str]:
        """Stage inputs and restore blob checkpoints on every node of the gang, once per
        node (its first rank), reporting progress. A problem in words, or None."""
        st = self.storage
        downloads = [i for i, m in st.input_modes.items() if m == "download"]
        restore = st.checkpoints.kind != "local"
        if not downloads and not restore:
            return None
        P = self.spec.processes_per_node
        firsts = {node_rank: self.actors[node_rank * P] for node_rank in range(self.spec.nodes)}
        refs = {a.prepare.remote(st.to_dict(secrets=True), self.cache_dir,
                                 str(self.node_dir(k) / "checkpoints") if restore else None): k
                for k, a in firsts.items()}
        self.log(f"staging {len(downloads)} input(s){' and checkpoints' if restore else ''} "
                 f"on {len(firsts)} node(s)")
        pending = dict(refs)
        t0 = time.monotonic()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for ref in done:
                k = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError:
                    raise
                except RayError as e:
                    cause = e.cause if hasattr(e, "cause") and e.cause else e
                    # still failing after the stager's retries: a blip outlasted them (the
                    # locations were checked a moment ago), so the infrastructure budget pays
                    self.staging_transient = isinstance(cause, StorageError) and cause.transient
                    return f"staging on node {k}: {cause}"
                self.staged_inputs[k] = result["inputs"]
                for ident, info in result["staged"].items():
                    self.log(f"node {k}: input '{ident}': {info['files']} file(s), {info['bytes']} bytes, "
                             f"{info['downloaded']} downloaded, {info['seconds']:.2f} s")
                if result["checkpoint_files"]:
                    self.log(f"node {k}: restored {result['checkpoint_files']} checkpoint file(s)")
            if pending:
                if self.check_control():
                    return "stopped while staging"
                prog = ray.get([firsts[k].staging_progress.remote() for k in pending.values()])
                self.report("staging", staging={"bytes_done": sum(p[0] for p in prog),
                                                "bytes_total": sum(p[1] for p in prog),
                                                "nodes_left": len(pending),
                                                "seconds": round(time.monotonic() - t0, 1)})
        return None

    def code_on_nodes(self) -> dict[int, str] | str:
        """Node rank -> the job's code directory there (raybatch.runtime.code); a problem in
        words. Nodes whose cache has the package answer at once; only for the others is
        the zip read and put in the object store, and unpacked there."""
        code = self.info.get("code")
        if not code:
            return {}
        sha, P = code["sha"], self.spec.processes_per_node
        firsts = {k: self.actors[k * P] for k in range(self.spec.nodes)}
        dirs = self._code_replies({k: a.ensure_code.remote(sha, None, self.cache_dir) for k, a in firsts.items()})
        if isinstance(dirs, str):
            return dirs
        missing = [k for k, d in dirs.items() if d is None]
        if missing:
            zipped = Path(code["zip"])
            try:
                if zipped.is_file():
                    data = zipped.read_bytes()
                else:  # uploaded before the server kept the zip
                    from raybatch.runtime.code import package_code  # noqa: PLC0415

                    data = package_code(code["dir"])[1]
            except OSError as e:
                return f"the job's code package {sha[:12]} cannot be read on the driver's node: {e}"
            box = [ray.put(data)]  # in a list: Ray passes the reference, the actor gets the bytes
            fetched = self._code_replies({k: firsts[k].ensure_code.remote(sha, box, self.cache_dir)
                                          for k in missing})
            if isinstance(fetched, str):
                return fetched
            dirs.update(fetched)
        self.log(f"code {sha[:12]}: unpacked on {len(missing)} node(s), cached on {len(dirs) - len(missing)}")
        return dirs

    def _code_replies(self, refs: dict[int, Any]) -> dict[int, Optional[str]] | str:
        out = {}
        for k, ref in refs.items():
            try:
                out[k] = ray.get(ref)
            except RayActorError:
                raise
            except RayError as e:
                cause = e.cause if hasattr(e, "cause") and e.cause else e
                return f"could not unpack the job's code on node {k}: {cause}"
        return out

    def node_dir(self, node_rank: int) -> Path:
        return self.mirror / f"node-{node_rank}"

    def reserve(self) -> Optional[str]:
        spec = self.spec
        bundle = spec.resources.as_ray_bundle()
        strategy = "STRICT_SPREAD" if spec.placement.strategy == "spread" else "PACK"
        pinned = self.info.get("nodes") or []
        selector = None
        if len(pinned) == spec.nodes:
            # the scheduler's placement, bundle i on node i: its reservations, preemptions
            # and the nodes it avoids (where an earlier attempt lost a rank) hold exactly
            selector = [{"ray.io/node-id": node_id} for node_id in pinned]
            self.log(f"gang pinned to node(s) {', '.join(n[:12] for n in pinned)}")
        self.pg = placement_group(
            [dict(bundle) for _ in range(spec.nodes)], strategy=strategy,
            name=f"raybatch-{self.job_id}-{self.n}", bundle_label_selector=selector,
        )
        ready = self.pg.ready()
        # Rank actors are created now: their worker processes start the moment the
        # bundles are placed, instead of after we have seen the placement.
        self.create_actors()
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        while not self.check_control():
            done, _ = ray.wait([ready], timeout=0.2)
            if done:
                return None
            if time.monotonic() > deadline:
                return (f"the placement group ({spec.nodes} x {bundle}, {strategy}) was not placed "
                        f"within {PLACEMENT_TIMEOUT_S:.0f} s")
        return "stopped while reserving the placement group"

    def per_rank_resources(self) -> dict[str, float]:
        bundle = self.spec.resources.as_ray_bundle()
        return {k: v / self.spec.processes_per_node for k, v in bundle.items()}

    def create_actors(self) -> None:
        spec = self.spec
        P = spec.processes_per_node
        per_rank = self.per_rank_resources()
        custom = {k: v for k, v in per_rank.items() if k not in ("CPU", "GPU", "memory")}
        renv = environment.runtime_env(spec)
        for node_rank in range(spec.nodes):
            for local_rank in range(P):
                opts: dict[str, Any] = {
                    "num_cpus": per_rank["CPU"],
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=node_rank
                    ),
                }
                if "GPU" in per_rank:
                    opts["num_gpus"] = per_rank["GPU"]
                if "memory" in per_rank:
                    opts["memory"] = per_rank["memory"]
                if custom:
                    opts["resources"] = custom
                if renv:  # packages / image: built by Ray on each node (cached per list)
                    opts["runtime_env"] = renv
                self.actors.append(RankActor.options(**opts).remote())

    def start_ranks(self) -> Optional[str]:
        """Start every rank (after the job's ``prepare`` command on each node, if any).
        A problem in words (prepare failed, stopped meanwhile), or None."""
        spec = self.spec
        P = spec.processes_per_node
        per_rank = self.per_rank_resources()
        infos = ray.get([a.node_info.remote() for a in self.actors])
        self.log(f"{len(self.actors)} rank actor(s) up")
        code_dirs = self.code_on_nodes()
        if isinstance(code_dirs, str):
            return code_dirs
        ports = ray.get([a.free_port.remote() for a in self.actors])
        peers = [f"{info['node_ip']}:{port}" for info, port in zip(infos, ports)]
        master_addr, master_port = infos[0]["node_ip"], ports[0]
        framework = self.framework
        st = self.storage
        # the job dir as the nodes see it: a path (also when it is a datastore on a mount)
        local_job_dir = Path(st.logs.path).parent if st.logs.kind == "local" else None
        shared = str((local_job_dir or self.mirror) / "shared")
        # Batch AI's AZ_BATCHAI_MPI_HOST_FILE: the gang's nodes, one line each, on every node
        hostfile_text = "".join(f"{infos[k * P]['node_ip']} slots={P}\n" for k in range(spec.nodes))
        launches, syncs = [], []
        self.contexts = []
        for rank, (actor, info) in enumerate(zip(self.actors, infos)):
            node_rank, local_rank = divmod(rank, P)
            node_dir = self.node_dir(node_rank)
            ckpt = st.checkpoints.path if st.checkpoints.kind == "local" else str(node_dir / "checkpoints")
            outputs = {i: a.path if a.kind == "local" else str(node_dir / "outputs" / i)
                       for i, a in st.outputs.items()}
            inputs = {}
            for i, a in st.inputs.items():
                if st.input_modes.get(i) == "download":
                    inputs[i] = self.staged_inputs[node_rank][i]
                else:  # direct: the path, or the blob's URL for the script's own credential
                    inputs[i] = a.path if a.kind == "local" else f"{a.endpoint}/{a.container}/{a.path}".rstrip("/")
            rel_logs = f"attempt-{self.n}/rank-{rank}"
            log_dir = str(Path(st.logs.path) / rel_logs if st.logs.kind == "local"
                          else node_dir / "stdouterr" / rel_logs)
            job_temp = str(Path(tempfile.gettempdir()) / "raybatch-jobs" / self.job_id / f"node-{node_rank}")
            cwd = code_dirs[node_rank] if code_dirs else job_temp
            ctx = RankContext(
                job_id=self.job_id, attempt=self.n, rank=rank, local_rank=local_rank,
                node_rank=node_rank, num_nodes=spec.nodes, processes_per_node=P,
                master_addr=master_addr, master_port=master_port, node_ip=info["node_ip"],
                job_dir=str(local_job_dir) if local_job_dir else self.info["job_dir"],
                stdouterr_dir=log_dir, checkpoint_dir=ckpt,
                job_temp=job_temp, shared_job_temp=shared, inputs=inputs, outputs=outputs,
                gpus=per_rank.get("GPU", 0.0), workdir=cwd, peers=peers,
            )
            self.contexts.append(ctx)
            self.job_temps.append(job_temp)
            hostfile = str(Path(job_temp) / "hostfile")
            env = {"AZ_BATCHAI_MPI_HOST_FILE": hostfile, **framework.rank_env(spec, ctx)}
            if code_dirs:  # like Ray's working_dir: the code first on PYTHONPATH
                env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH")) if p)
            make_dirs = [ckpt, shared, job_temp, *outputs.values()]
            files = {**({hostfile: hostfile_text} if local_rank == 0 else {}), **framework.files(spec, ctx)}
            launches.append((actor, framework.command(spec, ctx), env, cwd, log_dir, make_dirs, files))
            # blob destinations: this rank's logs, and (one rank per node) outputs and checkpoints
            logs = ([(str(Path(log_dir) / f"{s_}.txt"), st.logs.to_dict(), f"{rel_logs}/{s_}.txt")
                     for s_ in ("stdout", "stderr")] if st.logs.kind != "local" else [])
            dirs = []
            if local_rank == 0:
                if spec.prepare and st.logs.kind != "local":
                    rel_prep = f"attempt-{self.n}/prepare/node-{node_rank}"
                    logs += [(str(node_dir / "stdouterr" / rel_prep / f"{s_}.txt"), st.logs.to_dict(),
                              f"{rel_prep}/{s_}.txt") for s_ in ("stdout", "stderr")]
                dirs = [(outputs[i], a.to_dict()) for i, a in st.outputs.items() if a.kind != "local"]
                if st.checkpoints.kind != "local":
                    dirs.append((ckpt, st.checkpoints.to_dict()))
            if logs or dirs:
                syncs.append(actor.start_sync.remote(dirs, logs, spec.sync_interval))
            self.ranks.append({
                "rank": rank, "node_rank": node_rank, "local_rank": local_rank,
                "role": framework.role(spec, rank),
                "node_id": info["node_id"], "node_ip": info["node_ip"],
                "hostname": info["hostname"], "pid": None, "exit_code": None,
            })
        ray.get(syncs)
        if spec.prepare:
            problem = self.run_prepare(launches)
            if problem:
                return problem
        if framework.uses_mpirun:
            self.start_mpi_agent(launches, infos)
        starts = {}
        for rank, (actor, argv, env, cwd, log_dir, make_dirs, files) in enumerate(launches):
            if argv is None:  # holds its share of the node; started nothing itself
                starts[rank] = actor.hold.remote(make_dirs, files)
            else:
                starts[rank] = actor.start.remote(argv, env, cwd, log_dir, make_dirs, spec.grace_period, files)
        for rank, pid in zip(starts, ray.get(list(starts.values()))):
            self.ranks[rank]["pid"] = pid
        return None

    def start_mpi_agent(self, launches: list[tuple], infos: list[dict]) -> None:
        """mpirun (in rank 0) reaches the other nodes through rank 0's actor, which starts
        each node's MPI daemon in that node's first rank actor (Open MPI's rsh agent)."""
        spec = self.spec
        P = spec.processes_per_node
        nodes = {}
        for node_rank in range(spec.nodes):
            actor, _argv, env, cwd, log_dir, _dirs, _files = launches[node_rank * P]
            nodes[mpi.host_name(node_rank)] = {"actor": actor, "env": mpi.daemon_env(env), "cwd": cwd,
                                               "log_dir": log_dir}
        hostnames = [infos[k * P]["hostname"] for k in range(spec.nodes)]
        # several Ray nodes of one machine (a laptop, the tests' cluster) report one host name,
        # which Open MPI cannot tell apart: each daemon then gets its own UTS namespace
        own_uts = len(set(hostnames)) < len(hostnames)
        env0 = launches[0][2]
        info = ray.get(self.actors[0].serve_mpi_agent.remote(
            env0[mpi.AGENT_SOCKET_ENV], nodes, own_uts, env0[mpi.HOSTFILE_ENV], spec.world_size))
        self.log(f"mpi: {spec.nodes} node(s) as {', '.join(nodes)}"
                 + (" (one UTS namespace each: the nodes share a host name)" if own_uts else "")
                 + (f"; {info}" if info else ""))

    def run_prepare(self, launches: list[tuple]) -> Optional[str]:
        """The job's ``prepare`` command once on every node (its first rank's actor, with
        that rank's environment), before any rank starts; Batch AI's jobPreparation. Its
        output: stdouterr/attempt-<n>/prepare/node-<k>/. A problem in words, or None."""
        spec, st = self.spec, self.storage
        P = spec.processes_per_node
        firsts = {}
        for node_rank in range(spec.nodes):
            actor, _argv, env, cwd, _log_dir, make_dirs, files = launches[node_rank * P]
            rel = f"attempt-{self.n}/prepare/node-{node_rank}"
            log_dir = str(Path(st.logs.path) / rel if st.logs.kind == "local"
                          else self.node_dir(node_rank) / "stdouterr" / rel)
            ray.get(actor.start.remote(["/bin/bash", "-c", spec.prepare], env, cwd, log_dir, make_dirs,
                                       spec.grace_period, files))
            firsts[actor.wait.remote()] = (node_rank, actor, log_dir)
        self.log(f"prepare: running on {len(firsts)} node(s)")
        self.report("preparing")
        pending = dict(firsts)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for ref in done:
                node_rank, actor, log_dir = pending.pop(ref)
                code = ray.get(ref)
                if code != 0:
                    for _other, other_actor, _d in pending.values():
                        other_actor.terminate.remote(0)
                    tail = ray.get(actor.tail.remote(str(Path(log_dir) / "stderr.txt"), 2000))
                    where = storage_join(st.logs.uri or st.logs.path, f"attempt-{self.n}/prepare/node-{node_rank}")
                    return (f"prepare failed on node {node_rank} with exit code {code}; its output is in "
                            f"{where}/" + (f"; stderr ends with: {tail.strip()}" if tail.strip() else ""))
            if pending and self.check_control():
                for _n, other_actor, _d in pending.values():
                    ray.get(other_actor.terminate.remote(spec.grace_period))
                return "stopped while the prepare command ran"
        self.log("prepare: done on every node")
        return None


    def watch(self) -> tuple[AttemptOutcome, Optional[int], str]:
        """Block until the attempt ends; stop whatever is left running.

        Ranks that run nothing themselves ("idle") are watched only for loss of their node.
        The attempt succeeds when every other rank has exited 0 or, for frameworks whose
        rank 0 decides (a TF chief, mpirun, a first-node command), when rank 0 has."""
        waits = {a.wait.remote(): i for i, a in enumerate(self.actors)}
        idle = {i for i, r in enumerate(self.ranks) if r["pid"] is None}
        running = set(range(len(self.actors))) - idle
        leader_ends = self.framework.ends_with_rank0(self.spec)
        deadline = self.started + self.spec.max_wall_clock
        outcome: Optional[tuple[AttemptOutcome, Optional[int], str]] = None
        grace = self.spec.grace_period
        next_stall_check = time.monotonic() + STALL_CHECK_S
        while waits:
            done, _ = ray.wait(list(waits), num_returns=1, timeout=WAIT_TICK_S)
            for ref in done:
                i = waits.pop(ref)
                try:
                    code = ray.get(ref)
                except RayActorError as e:
                    self.ranks[i]["exit_code"] = None
                    self.lost_nodes.add(self.ranks[i]["node_id"])
                    outcome = outcome or (AttemptOutcome.NODE_LOST, None,
                                          f"rank {i} was lost (node {self.ranks[i]['node_id'][:12]}): "
                                          f"{type(e).__name__}")
                    grace = min(grace, NODE_LOST_GRACE_S)
                    continue
                if i in idle:
                    continue
                running.discard(i)
                self.ranks[i]["exit_code"] = code
                if code != 0 and outcome is None:
                    # a process whose peer's node died usually fails before Ray reports the
                    # node lost (mpirun at once, collectives on a timeout): ask every rank
                    lost = self.find_lost_rank(exclude=i)
                    if lost is not None:
                        outcome = (AttemptOutcome.NODE_LOST, None,
                                   f"rank {lost} was lost (node {self.ranks[lost]['node_id'][:12]}); "
                                   f"rank {i} exited with code {code} after it")
                        grace = min(grace, NODE_LOST_GRACE_S)
                    else:
                        outcome = (AttemptOutcome.USER_ERROR, code, f"rank {i} exited with code {code}")
                        grace = min(grace, FAILURE_STOP_GRACE_S)
                elif i == 0 and leader_ends and outcome is None:
                    outcome = (AttemptOutcome.SUCCEEDED, 0,
                               f"rank 0 ({self.ranks[0]['role']}) exited 0")
                    grace = min(grace, FAILURE_STOP_GRACE_S)
            if outcome is None and not running:
                outcome = (AttemptOutcome.SUCCEEDED, 0, f"all {len(self.actors) - len(idle)} "
                           f"running rank(s) exited 0")
            if outcome is None and self.check_control() and self.stop_reason:
                kind, why = self.stop_reason
                outcome = (kind, None, why)
                if kind == AttemptOutcome.DRIVER_LOST:
                    # `ray job stop` SIGKILLs this driver 3 s after its SIGTERM: be quick, and
                    # leave the rest to the ranks' watchdogs
                    grace = min(grace, EXTERNAL_STOP_GRACE_S)
            if outcome is None and self.spec.stall_timeout and time.monotonic() > next_stall_check:
                next_stall_check = time.monotonic() + STALL_CHECK_S
                outcome = self.check_stall(running)
            if outcome is None and time.monotonic() > deadline:
                outcome = (AttemptOutcome.TIMEOUT, None,
                           f"exceeded max_wall_clock ({self.spec.max_wall_clock:.0f} s)")
            if outcome is not None and waits:
                if running:
                    self.log(f"{outcome[2]}; stopping {len(running)} other rank(s), grace {grace:.0f} s")
                    self.report("stopping", reason=outcome[2])
                self.terminate_all(grace, only=set(waits.values()))
                break
        if outcome is None:  # every rank's wait ended without a verdict: only idle ranks
            outcome = (AttemptOutcome.SUCCEEDED, 0, f"all {len(self.actors)} ranks exited 0")
        return outcome

    def find_lost_rank(self, exclude: int) -> Optional[int]:
        """After a rank failed: is another rank's actor gone (its node lost)? Healthy actors
        answer in milliseconds; a dead one within Ray's node-failure detection, waited for
        up to LOST_RANK_CHECK_S. The first lost rank, with its node recorded, or None."""
        refs = {self.actors[j].node_info.remote(): j for j in range(len(self.actors)) if j != exclude}
        if not refs:
            return None
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=LOST_RANK_CHECK_S)
        lost = []
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                lost.append(refs[ref])
        for j in lost:
            self.lost_nodes.add(self.ranks[j]["node_id"])
        return min(lost) if lost else None

    def check_stall(self, running: set[int]) -> Optional[tuple[AttemptOutcome, Optional[int], str]]:
        """STALLED when every running rank has been silent for ``stall_timeout``."""
        refs = [self.actors[i].idle_seconds.remote() for i in sorted(running)]
        try:
            idle = ray.get(refs, timeout=10)
        except (RayError, TimeoutError):
            return None  # a lost rank is reported by its wait()
        limit = self.spec.stall_timeout or 0
        if idle and min(idle) > limit:
            return (AttemptOutcome.STALLED, None,
                    f"no rank printed anything for {min(idle):.0f} s (stall_timeout {limit:g} s)")
        return None

    def terminate_all(self, grace: float, only: Optional[set[int]] = None) -> None:
        refs = {}
        for i, a in enumerate(self.actors):
            if only is None or i in only:
                refs[a.terminate.remote(grace)] = i
        for ref, i in refs.items():
            try:
                code = ray.get(ref, timeout=grace + 30)
                if only is not None and code is not None:
                    self.ranks[i]["exit_code"] = code
            except (RayError, TimeoutError):
                pass

    def final_sync(self) -> Optional[str]:
        """Every node's last upload, after its processes ended. A message naming what is
        not out (and where the local copies are), or None when everything is."""
        if not self.storage.remote or not self.ranks or self.synced is not None:
            return None
        self.synced = False
        refs = {a.finish_sync.remote(self.final_sync_timeout_s): i for i, a in enumerate(self.actors)}
        self.log(f"uploading the last outputs, checkpoints and logs (up to {self.final_sync_timeout_s:.0f} s)")
        kept: list[str] = []
        errors: list[str] = []
        pending = dict(refs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=5)
            for ref in done:
                i = pending.pop(ref)
                node_rank = self.ranks[i]["node_rank"]
                try:
                    result = ray.get(ref)
                except RayError as e:
                    if self.ranks[i]["node_id"] in self.lost_nodes:
                        continue  # a lost node: what it had not uploaded is gone with it
                    # the actor died on a live node: its files may still be there, not out
                    self.unsynced.append(f"everything node {node_rank} had not uploaded yet")
                    kept.append(f"{self.ranks[i].get('hostname', '?')}:{self.node_dir(node_rank)}")
                    errors.append(f"its final upload did not run: {type(e).__name__}")
                    continue
                if result["unsynced"]:
                    self.unsynced.extend(result["unsynced"])
                    kept.append(f"{result['hostname']}:{self.node_dir(self.ranks[i]['node_rank'])}")
                    if result["error"]:
                        errors.append(result["error"])
            if pending:
                self.report("syncing", nodes_left=len(pending))  # the server waits while we do
        if not self.unsynced:
            self.synced = True
            return None
        shown = ", ".join(self.unsynced[:5]) + (f" and {len(self.unsynced) - 5} more" if len(self.unsynced) > 5 else "")
        return (f"{len(self.unsynced)} file(s) not uploaded: {shown}; cause: {errors[0] if errors else 'unknown'}; "
                f"the local copies are kept at {', '.join(sorted(set(kept)))}")

    def cleanup(self) -> None:
        if self.actors:
            self.terminate_all(0)  # reap stragglers left in the ranks' process groups
            # each node's scratch space of this job: /tmp/raybatch-jobs/<job id>
            dirs = [str(Path(d).parent) for d in self.job_temps]
            if self.synced or not self.storage.remote:  # else the mirrors may be the only copy
                dirs += [str(self.mirror)] * len(self.job_temps)
            refs = [a.remove_dir.remote(d) for a, d in zip(self.actors * 2, dirs)]
            for ref in refs:
                try:
                    ray.get(ref, timeout=30)
                except (RayError, TimeoutError):
                    pass  # a lost rank's node
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass

    # ---- main ----------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.report("placing")
        self.log(f"driver of {self.job_id} attempt {self.n} started")
        ray.init(address=self.info.get("ray_address") or "auto", log_to_driver=True, logging_level="WARNING")
        # ray.init installs its own SIGTERM handler (exit at once): ours must win, so
        # that a stop still ends every rank and reports.
        signal.signal(signal.SIGTERM, self.on_signal)
        self.log("connected to Ray")
        outcome: tuple[AttemptOutcome, Optional[int], str]
        try:
            problem = self.check_storage()
            if problem:
                outcome = (AttemptOutcome.START_FAILED, None, problem)
            elif (problem := self.reserve()) is not None:
                if self.stop_reason:  # set together with self.stop
                    outcome = (self.stop_reason[0], None, self.stop_reason[1])
                else:
                    outcome = (AttemptOutcome.PLACEMENT_TIMEOUT, None, problem)
            else:
                table = placement_group_table(self.pg)
                self.log(f"placement group ready: {table.get('bundles_to_node_id')}")
                self.report("placed")  # the scheduler stops counting the gang as pending
                if (problem := self.build_environment()) is not None:
                    outcome = ((self.stop_reason[0], None, self.stop_reason[1]) if self.stop_reason
                               else (AttemptOutcome.START_FAILED, None, problem))
                elif (problem := self.prepare_nodes()):
                    kind = (AttemptOutcome.STORAGE_UNAVAILABLE if self.staging_transient
                            else AttemptOutcome.START_FAILED)
                    outcome = ((self.stop_reason[0], None, self.stop_reason[1]) if self.stop_reason
                               else (kind, None, problem))
                elif (problem := self.start_ranks()) is not None:
                    outcome = ((self.stop_reason[0], None, self.stop_reason[1]) if self.stop_reason
                               else (AttemptOutcome.START_FAILED, None, problem))
                else:
                    self.report("running")
                    self.log(f"{len(self.actors)} rank(s) running")
                    outcome = self.watch()
        except RayActorError as e:
            traceback.print_exc()
            outcome = (AttemptOutcome.NODE_LOST, None, f"a rank's node was lost while starting: {e}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            outcome = (AttemptOutcome.START_FAILED if not self.ranks else AttemptOutcome.NODE_LOST,
                       None, f"driver error: {type(e).__name__}: {e}")
        finally:
            try:
                if self.ranks and self.synced is None:
                    # whatever ended the attempt, processes that ran may have written outputs
                    self.terminate_all(0)
                    not_out = self.final_sync()
                    if not_out:
                        kind, code, message = outcome
                        outcome = ((AttemptOutcome.UPLOAD_FAILED, None, not_out) if kind == AttemptOutcome.SUCCEEDED
                                   else (kind, code, f"{message}; {not_out}"))
            except Exception:  # noqa: BLE001 - never skip the cleanup below
                traceback.print_exc()
            self.cleanup()
        kind, code, message = outcome
        self.log(f"attempt {self.n} ended: {kind.value}: {message}")
        self.report("done", outcome=kind.value, exit_code=code, message=message,
                    lost_nodes=sorted(self.lost_nodes), unsynced=self.unsynced)
        return 0 if kind == AttemptOutcome.SUCCEEDED else 1


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m raybatch.runtime.driver ATTEMPT_JSON", file=sys.stderr)
        return 2
    return Attempt(argv[0]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
