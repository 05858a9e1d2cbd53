"""An array job's items: each task's state, read from the job's ``items/`` directory
(the frozen listing and the finished tasks' records, wherever the job's files are) and,
while the job runs, from its driver's report.

    GET /api/v1/jobs/{id}/items   ?state=pending|running|done|failed|skipped  &offset= &limit="""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, HTTPException, Query, status

from raybatch.models import ItemInfo
from raybatch.runtime.items import ItemStore, Record, tasks_of
from raybatch.server.common import array_spec, check_states, job_backend, job_or_404
from raybatch.state.states import JobState
from raybatch.storage import plan as storage_plan
from raybatch.storage.backends import StorageError

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

ITEM_STATES = ("pending", "running", "done", "failed", "skipped")


def item_records(ctx: ServerContext, job: dict[str, Any]) -> tuple[Optional[list], dict[int, Record]]:
    """The job's frozen listing (None before its driver froze it) and its tasks' records."""
    store = ItemStore(job_backend(ctx, job, storage_plan.join(job["job_dir"], "items")))
    try:
        return store.read_manifest(), store.records()
    except StorageError as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading the job's items: {e}") from None


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/jobs/{job_id}/items")
    def items(job_id: str, state: Optional[list[str]] = Query(None, description=f"Only these: {', '.join(ITEM_STATES)}."),
              offset: int = Query(0, ge=0), limit: int = Query(100_000, ge=1, le=1_000_000)) -> list[ItemInfo]:
        job = job_or_404(ctx.store, job_id)
        spec = array_spec(job)
        check_states(state, ITEM_STATES)
        manifest, records = item_records(ctx, job)
        if manifest is None:
            return []  # not started yet: nothing is listed
        resumed: dict[int, Record] = {}
        if spec.array.resume_from:
            old = ctx.store.get_job(spec.array.resume_from)
            if old is not None:
                resumed = {t: r for t, r in item_records(ctx, old)[1].items() if r.state == "done"}
        running: dict[int, Any] = {}
        if JobState(job["state"]).is_active and job["attempt"]:
            report = ctx.scheduler.report(job["id"], job["attempt"])
            running = {s.task: s for s in (report.slots if report else []) if s.task is not None}
        out = []
        for task in tasks_of(manifest, spec.array.items_per_task):
            rec = records.get(task.index)
            keys = [i.key for i in task.items]
            if rec is not None and (rec.state == "done" or task.index not in running):
                info = ItemInfo(task=task.index, keys=keys, state=rec.state, runs=rec.runs, exit_code=rec.exit_code,
                                slot=rec.slot, nodes=rec.nodes, seconds=rec.seconds, message=rec.message or None,
                                job_id=rec.job_id or job["id"])
            elif task.index in resumed:
                r = resumed[task.index]
                info = ItemInfo(task=task.index, keys=keys, state="skipped", runs=r.runs, exit_code=r.exit_code,
                                seconds=r.seconds, job_id=r.job_id)
            elif task.index in running:
                s = running[task.index]
                info = ItemInfo(task=task.index, keys=keys, state="running", slot=s.slot, nodes=s.nodes,
                                job_id=job["id"])
            else:
                info = ItemInfo(task=task.index, keys=keys, state="pending")
            if not state or info.state in state:
                out.append(info)
        return out[offset:offset + limit]

    return api
