"""What each rank of an attempt runs, and with what: a pure function of the job, the
gang's nodes and the resolved storage (no Ray calls), so it is tested without a
cluster. The driver hands each ``RankLaunch`` to its rank's actor.

Node-local directories of an attempt (``AttemptDirs``), below this user's private 0700
``<tmp>/raybatch-<uid>/`` (``raybatch.private_dir``: a fixed name in the shared
``/tmp`` could be created first by another user, who would then read or swap what the
job writes there)::

    <tmp>/raybatch-<uid>/mirror/<job id>/attempt-<n>/node-<k>/   local copies of blob outputs,
                                                                 checkpoints and logs (uploaded by the sync)
    <tmp>/raybatch-<uid>/jobs/<job id>/node-<k>/                 AZ_BATCHAI_JOB_TEMP, removed at the end
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from raybatch.frameworks.base import Framework, RankContext
from raybatch.private_dir import PrivateDirError, private_path, private_tmp
from raybatch.runtime.protocol import RankReport
from raybatch.spec.job import JobSpec
from raybatch.storage.plan import AttemptStorage, prepare_logs, rank_logs

HOSTFILE_ALIAS = "AZ_BATCHAI_MPI_HOST_FILE"


@dataclass(frozen=True)
class AttemptDirs:
    job_id: str
    attempt: int
    slot: Optional[int] = None  # an array job's slot: its gang's own directories

    @property
    def mirror(self) -> Path:
        root = private_path(MIRROR) / self.job_id / f"attempt-{self.attempt}"
        return root if self.slot is None else root / f"slot-{self.slot}"

    def node_mirror(self, node_rank: int) -> Path:
        return self.mirror / f"node-{node_rank}"

    def job_temp(self, node_rank: int) -> str:
        node = f"node-{node_rank}" if self.slot is None else f"slot-{self.slot}-node-{node_rank}"
        return str(private_path(JOBS) / self.job_id / node)


MIRROR, JOBS = "mirror", "jobs"  # the attempt directories' names below <tmp>/raybatch-<uid>/


def check_private_dirs() -> Optional[str]:
    """Create (0700) or check this node's private scratch roots of ``AttemptDirs``; why
    they cannot be used, or None. Run where a node first needs them (the driver's node
    at the start of an attempt; a node before it makes a directory there)."""
    try:
        for name in (MIRROR, JOBS):
            private_tmp(name)
    except PrivateDirError as e:
        return f"this node's scratch directory is unsafe: {e}"
    return None


@dataclass
class UnitPlan:
    """One run of a unit (an array task, a sweep trial) in a warm slot: where its logs,
    checkpoints (and outputs) go, and what its processes get on top of the job's contract."""

    logs_rel: Callable[[int], str]      # rank -> its log directory below stdouterr/
    checkpoint_rel: str                 # the unit's checkpoints below checkpoints/
    output_rel: str = ""                # its outputs below each output ("": the output itself)
    env: dict[str, str] = field(default_factory=dict)
    node_files: Callable[[int, str], dict[str, str]] = lambda node_rank, job_temp: {}  # written on each node


@dataclass
class RankLaunch:
    """One rank: its place, what it runs (None: it holds its share of the node and runs
    nothing itself), and what its node copies out while it runs."""

    rank: int
    node_rank: int
    local_rank: int
    role: str
    argv: Optional[list[str]]
    env: dict[str, str]
    cwd: str
    log_dir: str
    make_dirs: list[str]
    files: dict[str, str]
    job_temp: str
    metrics: Optional[dict[str, Any]] = None  # what the actor collects (runtime.metrics), if anything
    # blob destinations: (local dir, access) of outputs/checkpoints, one rank per node ...
    sync_dirs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # ... and (local file, access, path below the logs location) of logs
    sync_logs: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)

    def report(self, info: dict[str, Any]) -> RankReport:
        return RankReport(rank=self.rank, node_rank=self.node_rank, local_rank=self.local_rank,
                          role=self.role, node_id=info["node_id"], node_ip=info["node_ip"],
                          hostname=info["hostname"])


def plan_ranks(spec: JobSpec, framework: Framework, storage: AttemptStorage, dirs: AttemptDirs, *,
               job_dir: str, infos: list[dict[str, Any]], ports: list[int], code_dirs: dict[int, str],
               staged_inputs: dict[int, dict[str, str]], gpus_per_rank: float = 0.0,
               unit: Optional[UnitPlan] = None) -> list[RankLaunch]:
    """Every rank's launch. ``infos``/``ports``: each rank's node and a free port there
    (rank 0's is MASTER_PORT); ``code_dirs``: the code on each node (empty: no code);
    ``staged_inputs``: each node's local copies of ``download`` inputs; ``unit``: one run
    of an array task (its own logs, checkpoints and variables)."""
    P, st, n = spec.processes_per_node, storage, dirs.attempt
    peers = [f"{info['node_ip']}:{port}" for info, port in zip(infos, ports)]
    master_addr, master_port = infos[0]["node_ip"], ports[0]
    # the job dir as the nodes see it: a path (also when it is a datastore on a mount)
    local_job_dir = Path(st.logs.path).parent if st.logs.kind == "local" else None
    shared = str((local_job_dir or dirs.mirror) / "shared")
    # Batch AI's AZ_BATCHAI_MPI_HOST_FILE: the gang's nodes, one line each, on every node
    hostfile_text = "".join(f"{infos[k * P]['node_ip']} slots={P}\n" for k in range(spec.nodes))
    out = []
    for rank, info in enumerate(infos):
        node_rank, local_rank = divmod(rank, P)
        node_dir = dirs.node_mirror(node_rank)
        ckpt = st.checkpoints.path if st.checkpoints.kind == "local" else str(node_dir / "checkpoints")
        if unit is not None:
            ckpt = str(Path(ckpt) / unit.checkpoint_rel)
        out_rel = unit.output_rel if unit is not None else ""
        outputs = {i: str(Path(a.path if a.kind == "local" else node_dir / "outputs" / i, out_rel))
                   for i, a in st.outputs.items()}
        inputs = {}
        for i, a in st.inputs.items():
            if st.input_modes.get(i) in ("download", "upload"):
                inputs[i] = staged_inputs[node_rank][i]
            else:  # direct: the path, or the blob's URL for the script's own credential
                inputs[i] = a.path if a.kind == "local" else f"{a.endpoint}/{a.container}/{a.path}".rstrip("/")
        rel_logs = unit.logs_rel(rank) if unit is not None else rank_logs(n, rank)
        log_dir = str(Path(st.logs.path) / rel_logs if st.logs.kind == "local" else node_dir / "stdouterr" / rel_logs)
        job_temp = dirs.job_temp(node_rank)
        cwd = code_dirs[node_rank] if code_dirs else job_temp
        ctx = RankContext(
            job_id=dirs.job_id, attempt=n, rank=rank, local_rank=local_rank,
            node_rank=node_rank, num_nodes=spec.nodes, processes_per_node=P,
            master_addr=master_addr, master_port=master_port, node_ip=info["node_ip"],
            job_dir=str(local_job_dir) if local_job_dir else job_dir,
            stdouterr_dir=log_dir, checkpoint_dir=ckpt,
            job_temp=job_temp, shared_job_temp=shared, inputs=inputs, outputs=outputs,
            gpus=gpus_per_rank, workdir=cwd, peers=peers,
        )
        hostfile = str(Path(job_temp) / "hostfile")
        env = {HOSTFILE_ALIAS: hostfile, **framework.rank_env(spec, ctx), **(unit.env if unit else {})}
        if code_dirs:  # like Ray's working_dir: the code first on PYTHONPATH
            env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH")) if p)
        files = {**({hostfile: hostfile_text} if local_rank == 0 else {}), **framework.files(spec, ctx)}
        if unit is not None and local_rank == 0:
            files.update(unit.node_files(node_rank, job_temp))
        launch = RankLaunch(
            rank=rank, node_rank=node_rank, local_rank=local_rank, role=framework.role(spec, rank),
            argv=framework.command(spec, ctx), env=env, cwd=cwd, log_dir=log_dir,
            make_dirs=[ckpt, shared, job_temp, *outputs.values()], files=files, job_temp=job_temp,
        )
        if rank == 0 or spec.metrics.from_ == "all":
            launch.metrics = metrics_plan(spec, env, log_dir, str(Path(job_temp) / "metrics" / rel_logs))
            launch.make_dirs += [str(Path(launch.metrics["file"]).parent)]
            if launch.metrics["mlflow_db"]:
                launch.make_dirs.append(str(Path(launch.metrics["mlflow_db"]).parent))
        if st.logs.kind != "local":
            launch.sync_logs = [(str(Path(log_dir) / f"{s}.txt"), st.logs.to_dict(), f"{rel_logs}/{s}.txt")
                                for s in ("stdout", "stderr")]
            if launch.metrics is not None:
                launch.sync_logs.append((launch.metrics["store"], st.logs.to_dict(), f"{rel_logs}/{METRICS_STORE}"))
                if launch.metrics.get("mlflow_db"):
                    launch.sync_dirs.append((str(Path(log_dir) / "mlflow"), st.logs.child(rel_logs, "mlflow").to_dict()))
        if local_rank == 0:
            if spec.prepare and st.logs.kind != "local":
                rel_prep = prepare_logs(n, node_rank)
                launch.sync_logs += [(str(node_dir / "stdouterr" / rel_prep / f"{s}.txt"), st.logs.to_dict(),
                                      f"{rel_prep}/{s}.txt") for s in ("stdout", "stderr")]
            launch.sync_dirs += [(outputs[i], a.child(out_rel).to_dict()) for i, a in st.outputs.items()
                                 if a.kind != "local"]
            if st.checkpoints.kind != "local":
                remote = st.checkpoints.child(unit.checkpoint_rel) if unit is not None else st.checkpoints
                launch.sync_dirs.append((ckpt, remote.to_dict()))
        out.append(launch)
    return out


METRICS_STORE = "metrics.jsonl"  # a rank's metrics, next to its stdout


def metrics_plan(spec: JobSpec, env: dict[str, str], log_dir: str, scratch: str) -> dict[str, Any]:
    """What a rank whose metrics are collected gets: RAYBATCH_METRICS_FILE (in ``scratch``,
    node-local) and, unless the job names its own, an MLflow tracking store (a SQLite file
    in the rank's log directory); and what its actor reads."""
    plan: dict[str, Any] = {"store": str(Path(log_dir) / METRICS_STORE), "file": str(Path(scratch) / "log_metric.jsonl"),
                            "regex": spec.metrics.stdout_regex, "mlflow_db": None}
    env["RAYBATCH_METRICS_FILE"] = plan["file"]
    if "MLFLOW_TRACKING_URI" not in spec.environment:
        plan["mlflow_db"] = str(Path(log_dir) / "mlflow" / "mlflow.db")
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{plan['mlflow_db']}"
    return plan


def prepare_log_dir(storage: AttemptStorage, dirs: AttemptDirs, node_rank: int) -> str:
    """Where a node's prepare command writes its output (synced like a rank's log)."""
    rel = prepare_logs(dirs.attempt, node_rank)
    if storage.logs.kind == "local":
        return str(Path(storage.logs.path) / rel)
    return str(dirs.node_mirror(node_rank) / "stdouterr" / rel)
