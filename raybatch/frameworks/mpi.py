"""framework: mpi — Batch AI's customMpiSettings: ``mpirun`` across the gang's nodes.

Rank 0 runs ``mpirun -np <nodes x processes_per_node> … /bin/bash -c <command>``. Its
hostfile names each node of the gang ``rbh-<k> slots=<processes_per_node>``: names that
resolve to nothing, so Open MPI starts every node's daemon through its rsh agent. The
agent is ``python3 -m raybatch.runtime.mpi_agent``: it hands the daemon's command to
rank 0's actor, which starts it in node k's first rank actor (``RankActor.exec_start``),
the way the Kubernetes MPI Operator uses ``kubectl exec``. No ssh between nodes, no keys.

The MPI processes run under their node's daemon with that node's rank environment, less
the per-rank variables (RANK, LOCAL_RANK, …) that MPI's own OMPI_COMM_WORLD_RANK /
OMPI_COMM_WORLD_LOCAL_RANK replace. Each node's daemon output goes to that node's first
rank's log; the processes' output comes back through mpirun to rank 0's log.

``chainer`` (ChainerMN) and ``horovod`` are launched the same way (their modules)."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Optional

from raybatch.frameworks.base import Framework, RankContext
from raybatch.contract import MPI_AGENT_SOCKET_ENV as AGENT_SOCKET_ENV
from raybatch.contract import MPI_AGENT_KEY_ENV as AGENT_KEY_ENV
from raybatch.contract import mpi_agent_key_file as key_file
from raybatch.private_dir import private_path
from raybatch.spec.job import JobSpec

HOSTFILE_ENV = "RAYBATCH_MPI_HOSTFILE"

# Describe one raybatch rank; wrong for MPI processes, which read OMPI_COMM_WORLD_*.
_PER_RANK = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "AZ_BATCHAI_TASK_INDEX")


def host_name(node_rank: int) -> str:
    """The gang's node k in mpirun's hostfile (no dots: Open MPI would strip the rest)."""
    return f"rbh-{node_rank}"


def daemon_env(env: dict[str, str]) -> dict[str, str]:
    """A node's MPI daemon's environment (its processes inherit it): the node's rank
    environment without the per-rank variables, and without the agent's socket and key
    (only mpirun, in rank 0, starts daemons)."""
    return {k: v for k, v in env.items() if k not in _PER_RANK and k not in (AGENT_SOCKET_ENV, AGENT_KEY_ENV)}


def agent_socket(job_id: str, attempt: int) -> str:
    """A Unix socket path on rank 0's node, in this user's 0700 ``<tmp>/raybatch-<uid>/mpi``
    (rank 0's agent server creates and checks it there); short, because sun_path holds
    107 bytes."""
    digest = hashlib.sha1(f"{job_id}/{attempt}".encode()).hexdigest()[:16]
    return str(private_path("mpi") / f"{digest}.sock")


class MpiFramework(Framework):
    name = "mpi"
    uses_mpirun = True

    def role(self, spec: JobSpec, rank: int) -> str:
        if rank == 0:
            return "mpirun"
        return "mpi-node" if rank % spec.processes_per_node == 0 else "idle"

    def ends_with_rank0(self, spec: JobSpec) -> bool:
        return True

    def hostfile(self, spec: JobSpec) -> str:
        return "".join(f"{host_name(k)} slots={spec.processes_per_node}\n" for k in range(spec.nodes))

    def files(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        if ctx.rank != 0:
            return {}
        return {str(Path(ctx.job_temp) / "mpi-hostfile"): self.hostfile(spec)}

    def mpirun_options(self, spec: JobSpec) -> list[str]:
        """Framework-specific mpirun options (horovod's -x variables, …)."""
        return []

    def command(self, spec: JobSpec, ctx: RankContext) -> Optional[list[str]]:
        if ctx.rank != 0:
            return None  # the node's daemon is started through this rank's actor by mpirun
        extra = shlex.split(spec.mpi.mpirun_args) if spec.mpi else []
        return [
            "mpirun", "-np", str(spec.world_size), "--map-by", "slot", "--bind-to", "none",
            *self.mpirun_options(spec), *extra,
            "/bin/bash", "-c", f'cd "${{RAYBATCH_WORKDIR:-.}}" 2>/dev/null; {spec.command}',
        ]

    def environment(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        hostfile = str(Path(ctx.job_temp) / "mpi-hostfile")
        env = {
            HOSTFILE_ENV: hostfile,
            "RAYBATCH_MPI_NP": str(spec.world_size),
            # one thread per process unless the user says otherwise: ranks share nodes' cores
            "OMP_NUM_THREADS": str(max(1, int(spec.resources.cpus // spec.processes_per_node))),
        }
        if ctx.rank == 0:
            env.update({
                AGENT_SOCKET_ENV: agent_socket(ctx.job_id, ctx.attempt),
                AGENT_KEY_ENV: key_file(agent_socket(ctx.job_id, ctx.attempt)),
                "PRTE_MCA_plm_ssh_agent": "python3 -m raybatch.runtime.mpi_agent",
                "PRTE_MCA_prte_default_hostfile": hostfile,
                # mpirun starts every daemon itself (no tree spawn): the agent's socket
                # exists on rank 0's node only. (PRRTE fails with radices near 2^16.)
                "PRTE_MCA_rml_base_radix": str(max(64, spec.nodes)),
                # the job's processes run as the node's user, root included (containers)
                "OMPI_ALLOW_RUN_AS_ROOT": "1",
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            })
        return env
