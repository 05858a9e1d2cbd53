"""The cluster's nodes as the server records them (raybatch.scheduler.nodes), for
``raybatch cluster nodes|status``.

    GET /api/v1/nodes           the nodes, their state since when, reason and jobs (?ended=true: also gone ones)
    GET /api/v1/nodes/status    steady/resizing, worker nodes per state, demand, launch failures
    POST /api/v1/nodes/requeue  preempt (requeue) the jobs on these nodes"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Query
from pydantic import BaseModel

from raybatch.scheduler.launches import launch_failures as read_launch_failures
from raybatch.scheduler.nodes import ClusterStatus, NodeInfo, NodeRecorder, cluster_status, jobs_on_nodes, node_infos
from raybatch.state.states import REQUEUED_BY

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

log = logging.getLogger("raybatch.server")

# A requeue is not a preemption by a job: its preempted_by is the whole reason, and reads
# as one ("requeued by `raybatch cluster scale`: its node is beyond the new max of cpu2").


def requeue_reason(by: str, node_type: Optional[str]) -> str:
    """Why a job is requeued off a node being scaled away (stored as its preempted_by)."""
    return f"{REQUEUED_BY}`{by}`: its node is beyond the new max of {node_type or 'its type'}"


def _recorder(ctx: ServerContext) -> Optional[NodeRecorder]:
    return next((h for h in getattr(ctx.scheduler, "cycle_hooks", []) if isinstance(h, NodeRecorder)), None)


def launch_failures(ctx: ServerContext) -> list[dict[str, Any]]:
    """The autoscaler's recent failed launches (raybatch.scheduler.launches), as dicts."""
    cluster = ctx.scheduler.cluster
    gcs = getattr(cluster, "_gcs", None)  # RayClusterView's GcsClient: no new connection per request
    if gcs is None:
        return []
    try:
        return [asdict(f) for f in read_launch_failures(gcs, cluster.gcs_address)]
    except Exception as e:  # noqa: BLE001 - status must answer while the GCS is away
        log.warning("reading launch failures: %s: %s", type(e).__name__, e)
        return [{"node_type": "?", "at": time.time(), "category": "unknown",
                 "message": f"could not read them: {type(e).__name__}: {e}"}]


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/nodes")
    def nodes(ended: bool = Query(False, description="Also the nodes that are gone.")) -> list[NodeInfo]:
        return node_infos(ctx.store, ended=ended)

    @api.get("/nodes/status")
    def status(preempted_window_s: float = Query(3600.0, ge=0)) -> ClusterStatus:
        demand = ctx.scheduler.autoscaler.info() if ctx.scheduler.autoscaler is not None else None
        status = cluster_status(ctx.store, _recorder(ctx), demand, launch_failures(ctx), preempted_window_s)
        return ClusterStatus.model_validate(ctx.access.redact(status.model_dump()))  # other workspaces' job ids

    @api.post("/nodes/requeue")
    def requeue(body: RequeueRequest) -> list[str]:
        """Preempt the jobs on these nodes (the scheduler's own preemption: SIGTERM, grace
        period, back to the queue at their place, resuming from their checkpoint dir).
        Array jobs' slots are left alone (their tasks rerun elsewhere when a node goes).
        The job's preempted_by is the reason (``requeue_reason``), not a job id."""
        on = jobs_on_nodes(ctx.store)
        types = {r["node_id"]: r.get("node_type") for r in ctx.store.nodes(ended=True)}
        first_node: dict[str, str] = {}
        for n in body.node_ids:
            for j in on.get(n, []):
                first_node.setdefault(j, n)
        out = []
        now = time.time()
        for job_id in sorted(first_node):
            job = ctx.store.get_job(job_id)
            if job is None or job["preempt_requested"] or job["cancel_requested"]:
                continue
            if ctx.scheduler.spec_of(job).slots is not None:
                continue
            reason = body.reason or requeue_reason(body.by, types.get(first_node[job_id]))
            ctx.store.update_job(job_id, preempt_requested=now, preempted_by=reason)
            out.append(job_id)
        ctx.scheduler.wake()
        return out

    return api


class RequeueRequest(BaseModel):
    node_ids: list[str]
    by: str = "raybatch cluster scale"
    reason: Optional[str] = None  # default: requeue_reason(by, the node's type)
