"""framework: tensorflow — TF_CONFIG for every rank (Batch AI's tensorFlowSettings).

Two layouts, chosen by ``tensorflow.parameter_servers`` (default 0):

- **all-reduce** (0 parameter servers, ``MultiWorkerMirroredStrategy``): every rank is a
  worker, ``TF_CONFIG = {"cluster": {"worker": [every rank]}, "task": {"type": "worker",
  "index": rank}}``; worker 0 acts as the chief. The attempt ends when every rank has
  exited (like pytorch).
- **parameter servers** (P > 0, TF2 ``ParameterServerStrategy``): rank 0 is the
  ``chief`` (the coordinator), ranks 1..P are ``ps``, the rest are ``worker``;
  ``TF_CONFIG``'s cluster has the three jobs and the task its type and index within
  its job. TF2 parameter servers and workers serve until they are stopped, so the
  attempt ends when the chief exits and the other ranks are then stopped.

Rank 0 runs ``command``; workers run ``tensorflow.worker_command`` and parameter servers
``tensorflow.parameter_server_command`` when given (Batch AI's master / worker /
parameter-server command lines), else ``command``. Each rank's address is
``RankContext.peers[rank]``: a free port on its node, which its TF server binds.

Batch AI's variables: AZ_BATCHAI_PS_HOSTS and AZ_BATCHAI_WORKER_HOSTS (comma-separated
host:port) and AZ_BATCHAI_TASK_INDEX. Batch AI had two task kinds: its master was
worker 0, so the chief is listed first in AZ_BATCHAI_WORKER_HOSTS with task index 0 and
worker i has task index i + 1; a parameter server's task index is its index among them.
RAYBATCH_TF_ROLE and RAYBATCH_TF_TASK_INDEX are TF_CONFIG's task type and index.

Uneven layouts (``tensorflow.workers``, Batch AI's workerCount): every node has
processes_per_node slots and the ranks after the chief, the parameter servers and the
workers are ``idle``: they hold their share of the node and run nothing, and TF_CONFIG
leaves them out (1 ps + 2 workers on 2 nodes: chief and ps on node 0, the worker on
node 1, as Batch AI placed them)."""

from __future__ import annotations

import json
from typing import Optional

from raybatch.frameworks.base import Framework, RankContext
from raybatch.spec.job import JobSpec


def parameter_servers(spec: JobSpec) -> int:
    return spec.tensorflow.parameter_servers if spec.tensorflow else 0


def active_ranks(spec: JobSpec) -> int:
    """The ranks that run something: the chief, the parameter servers and the workers."""
    tf = spec.tensorflow
    return spec.world_size if tf is None or tf.workers is None else tf.parameter_servers + tf.workers


def task_of(spec: JobSpec, rank: int) -> tuple[str, int]:
    """(TF_CONFIG task type, index within that type) of a rank; ("idle", -1) for a rank
    of an uneven layout's unused slots."""
    p = parameter_servers(spec)
    if rank >= active_ranks(spec):
        return "idle", -1
    if not p:
        return "worker", rank
    if rank == 0:
        return "chief", 0
    if rank <= p:
        return "ps", rank - 1
    return "worker", rank - 1 - p


def cluster_of(spec: JobSpec, peers: list[str]) -> dict[str, list[str]]:
    """TF_CONFIG's cluster: job name -> the tasks' host:port, in task index order."""
    p = parameter_servers(spec)
    peers = peers[:active_ranks(spec)]
    if not p:
        return {"worker": list(peers)}
    return {"chief": peers[:1], "ps": peers[1:1 + p], "worker": peers[1 + p:]}


def tf_config(spec: JobSpec, ctx: RankContext) -> dict:
    task_type, index = task_of(spec, ctx.rank)
    return {"cluster": cluster_of(spec, ctx.peers), "task": {"type": task_type, "index": index}}


class TensorFlowFramework(Framework):
    name = "tensorflow"

    def role(self, spec: JobSpec, rank: int) -> str:
        return task_of(spec, rank)[0]

    def ends_with_rank0(self, spec: JobSpec) -> bool:
        return parameter_servers(spec) > 0

    def command(self, spec: JobSpec, ctx: RankContext) -> Optional[list[str]]:
        role = task_of(spec, ctx.rank)[0]
        if role == "idle":
            return None  # holds its share of the node
        tf = spec.tensorflow
        line = spec.command
        if ctx.rank != 0 and tf is not None:
            if role == "ps" and tf.parameter_server_command:
                line = tf.parameter_server_command
            elif role == "worker" and tf.worker_command:
                line = tf.worker_command
        return ["/bin/bash", "-c", line]

    def environment(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        if task_of(spec, ctx.rank)[0] == "idle":
            return {}
        config = tf_config(spec, ctx)
        task_type, index = config["task"]["type"], config["task"]["index"]
        cluster = config["cluster"]
        # Batch AI's view: the master (our chief) was worker 0
        batchai_workers = cluster.get("chief", []) + cluster["worker"]
        batchai_index = index + 1 if task_type == "worker" and "chief" in cluster else index
        threads = max(1, int(spec.resources.cpus // spec.processes_per_node))
        return {
            "TF_CONFIG": json.dumps(config, separators=(",", ":")),
            "RAYBATCH_TF_ROLE": task_type,
            "RAYBATCH_TF_TASK_INDEX": str(index),
            "AZ_BATCHAI_PS_HOSTS": ",".join(cluster.get("ps", [])),
            "AZ_BATCHAI_WORKER_HOSTS": ",".join(batchai_workers),
            "AZ_BATCHAI_TASK_INDEX": str(batchai_index),
            # ranks share their node's cores: one intra-op pool of the rank's share, unless
            # the user says otherwise. The inter-op pool keeps at least 2 threads: with 1, a
            # ParameterServerStrategy step on a worker deadlocks waiting on the ps (TF 2.21).
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": str(max(2, threads)),
            "OMP_NUM_THREADS": str(threads),
        }
