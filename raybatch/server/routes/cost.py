"""What the cluster cost, for ``raybatch cost`` (raybatch.scheduler.cost has the definitions).

    GET /api/v1/cost?by=type|experiment|job&since=<epoch s>   node-hours, idle hours, hours
                                                             lost to evictions, per group

Hours only: prices live with whoever reads the report (``prices.yaml`` on the user's
machine, written by ``raybatch cluster prices``); the client multiplies."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter, HTTPException, Query

from raybatch.scheduler import cost
from raybatch.scheduler.cost import CostReport, GroupBy

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/cost")
    def cost_report(
        by: GroupBy = Query(GroupBy.type, description="Group by node type, experiment or job."),
        since: Optional[float] = Query(None, allow_inf_nan=False,
                                       description="The window's start (Unix time, s); default: all."),
    ) -> CostReport:
        now = time.time()
        if since is not None and since > now:
            raise HTTPException(400, f"since: {since} is in the future")
        store = ctx.store
        return cost.report(store.nodes(ended=True), store.cost_attempts(since), store.cost_slots(since),
                           by=by.value, now=now, since=since)

    return api
