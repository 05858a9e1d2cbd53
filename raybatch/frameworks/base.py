"""The env contract every rank gets (DESIGN.md), and the adapter interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from raybatch.spec.job import JobSpec


@dataclass
class RankContext:
    """Where one rank stands in the gang, and the local paths it uses."""

    job_id: str
    attempt: int
    rank: int
    local_rank: int
    node_rank: int
    num_nodes: int
    processes_per_node: int
    master_addr: str
    master_port: int
    node_ip: str
    job_dir: str
    stdouterr_dir: str
    checkpoint_dir: str
    job_temp: str
    shared_job_temp: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    gpus: float = 0.0
    workdir: str = ""  # where the rank's process starts: the code dir, else the job temp
    # "ip:port" of every rank of the gang, in rank order: a free port on each rank's node
    # (TF_CONFIG's cluster; rank 0's is MASTER_PORT)
    peers: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.processes_per_node


def contract_env(spec: JobSpec, ctx: RankContext) -> dict[str, str]:
    """RAYBATCH_* variables, the torchrun-style placement variables, and the
    AZ_BATCHAI_* aliases Batch AI era scripts read."""
    env = {
        "RAYBATCH_JOB_ID": ctx.job_id,
        "RAYBATCH_JOB_NAME": spec.name,
        "RAYBATCH_EXPERIMENT": spec.experiment,
        "RAYBATCH_ATTEMPT": str(ctx.attempt),
        "RAYBATCH_NODE_RANK": str(ctx.node_rank),
        "RAYBATCH_NUM_NODES": str(ctx.num_nodes),
        "RAYBATCH_JOB_DIR": ctx.job_dir,
        "RAYBATCH_CHECKPOINT_DIR": ctx.checkpoint_dir,
        "RAYBATCH_STDOUTERR_DIR": ctx.stdouterr_dir,
        "RAYBATCH_JOB_TEMP": ctx.job_temp,
        "RAYBATCH_SHARED_JOB_TEMP": ctx.shared_job_temp,
        "RAYBATCH_WORKDIR": ctx.workdir,
        "RANK": str(ctx.rank),
        "WORLD_SIZE": str(ctx.world_size),
        "LOCAL_RANK": str(ctx.local_rank),
        "LOCAL_WORLD_SIZE": str(ctx.processes_per_node),
        "NODE_RANK": str(ctx.node_rank),
        "GROUP_RANK": str(ctx.node_rank),
        "MASTER_ADDR": ctx.master_addr,
        "MASTER_PORT": str(ctx.master_port),
        # Batch AI aliases
        "AZ_BATCHAI_JOB_NAME": spec.name,
        "AZ_BATCHAI_TASK_INDEX": str(ctx.rank),
        "AZ_BATCHAI_NUM_GPUS": str(int(ctx.gpus)),
        "AZ_BATCHAI_STDOUTERR_DIR": ctx.stdouterr_dir,
        "AZ_BATCHAI_JOB_TEMP": ctx.job_temp,
        "AZ_BATCHAI_SHARED_JOB_TEMP": ctx.shared_job_temp,
    }
    for ident, path in ctx.inputs.items():
        env[f"RAYBATCH_INPUT_{ident.upper()}"] = path
        env[f"AZ_BATCHAI_INPUT_{ident}"] = path
    for ident, path in ctx.outputs.items():
        env[f"RAYBATCH_OUTPUT_{ident.upper()}"] = path
        env[f"AZ_BATCHAI_OUTPUT_{ident}"] = path
    return env


class Framework:
    """Adapter interface: spec + rank context -> argv and extra environment.

    Every rank of the gang holds its share of the node; ``command`` may return None for a
    rank that runs nothing itself (an MPI node whose daemon mpirun starts through the
    rank's actor, the other nodes of a first-node-only custom job)."""

    name = "base"
    uses_mpirun = False  # rank 0 runs mpirun; other nodes' daemons start through their actors

    def role(self, spec: JobSpec, rank: int) -> str:
        """What the rank is, shown by ``raybatch show``: rank, chief, worker, ps, launcher, idle."""
        return "rank"

    def ends_with_rank0(self, spec: JobSpec) -> bool:
        """Does the attempt end when rank 0 exits (the other ranks are then stopped)?
        Otherwise it ends when every rank that runs something has exited 0."""
        return False

    def command(self, spec: JobSpec, ctx: RankContext) -> Optional[list[str]]:
        return ["/bin/bash", "-c", spec.command]

    def files(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        """Files written on the rank's node before it starts (path -> text)."""
        return {}

    def environment(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        return {}

    def rank_env(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        """Everything the rank's process gets on top of the node's environment;
        the job file's own variables win over the framework's."""
        return {**contract_env(spec, ctx), **self.environment(spec, ctx), **spec.environment}
