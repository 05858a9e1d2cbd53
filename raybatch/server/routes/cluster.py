"""The cluster and the scheduler's view of it: live nodes, the scheduler's state and
policy, and the queue with why each job waits."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query

from raybatch.models import DeadlineInfo, QueueEntry, SchedulerInfo
from raybatch.server.access import current, visible_workspaces
from raybatch.spec.policy import DEFAULT_GROUP

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

ESTIMATED_JOBS = 100  # the queue view simulates this many jobs ahead for start estimates


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()
    store = ctx.store

    @api.get("/cluster")
    def cluster() -> list[dict[str, Any]]:
        return [n.__dict__ for n in ctx.scheduler.cluster.snapshot()]

    @api.get("/scheduler")
    def scheduler_info() -> SchedulerInfo:
        sched = ctx.scheduler
        res = sched.reservation
        cfg = sched.policy
        # the scheduler's error and the reserved job may name another workspace's job: an
        # admin's (a workspace's reader still sees that there is a reservation, and when)
        who = current()
        admin = who is None or who.is_admin
        return SchedulerInfo(
            **{k: sched.stats[k] for k in ("cycles", "last_cycle_ms", "last_plan_ms", "queued", "active")},
            policy={"backfill": cfg.backfill, "preemption": cfg.preemption, "fair_share": cfg.fair_share,
                    "quotas": {g: q.model_dump() for g, q in cfg.quotas.items() if g != DEFAULT_GROUP},
                    "default_quota": cfg.quota(DEFAULT_GROUP).model_dump()},
            policy_file=str(sched.policy_file) if sched.policy_file else None,
            policy_error=sched.policy_error, last_cycle_error=sched.last_cycle_error if admin else None,
            reservation=({"job_id": res.job_id if admin else None, "at": res.at if res.at != float("inf") else None,
                          "nodes": res.nodes} if res else None),
            autoscaler=ctx.access.redact(sched.autoscaler.info()) if sched.autoscaler is not None else None,
        )

    @api.get("/queue")
    def queue(limit: int = Query(200, ge=1, le=100000),
              estimate: bool = Query(True, description="Estimate start times (first 100 jobs).")
              ) -> list[QueueEntry]:
        queued = [job_id for job_id, _, _ in store.queue_keys()]  # ids only: cheap at 10k
        waiting = dict(ctx.scheduler.waiting)
        slot_counts = dict(ctx.scheduler.slot_counts)  # running array jobs that want more slots
        # the order of the last cycle, then anything queued since, in store order
        in_queue = set(queued) | {j for j, (held, wanted) in slot_counts.items() if wanted > held}
        ids = [i for i in waiting if i in in_queue] + [i for i in queued if i not in waiting]
        shown = visible_workspaces()  # a non-admin sees its workspace's waiting jobs only
        if shown is not None:
            of = store.workspaces_of(ids)
            ids = [i for i in ids if of.get(i) in shown]
        rows = {r["id"]: r for r in store.jobs_by_id(ids[:limit])}  # full rows for those shown
        ids = [i for i in ids[:limit] if i in rows]
        starts = ctx.scheduler.estimate_starts(ids[:ESTIMATED_JOBS]) if estimate else {}
        now = time.time()
        out = []
        for pos, job_id in enumerate(ids, 1):
            row = rows[job_id]
            spec = ctx.scheduler.spec_of(row)
            slots = None
            if spec.slots is not None:
                held, wanted = slot_counts.get(job_id) or (0, spec.slots.wanted_at_start)
                slots = f"{held}/{wanted} slots"
            deadline = ctx.scheduler.deadlines.info(row, spec, now)
            out.append(QueueEntry(
                position=pos, id=job_id, name=row["name"], experiment=row["experiment"],
                priority=row["priority"], nodes=spec.nodes, per_node=spec.resources.as_ray_bundle(),
                attempt=row["attempt"], submitted_at=row["submitted_at"],
                waiting_s=now - row["submitted_at"], reason=ctx.access.redact(waiting.get(job_id, "not considered yet")),
                estimated_start=starts.get(job_id), preemptions=row["preemptions"], slots=slots,
                deadline=DeadlineInfo(**deadline) if deadline else None,
            ))
        return out

    return api
