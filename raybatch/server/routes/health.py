"""``GET /health``: liveness, the one API route without auth. The scheduler's last error
(which may name any workspace's job) only with the cluster admin's token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from raybatch import __version__
from raybatch.server.access import current

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health() -> dict[str, Any]:
        who = current()
        return {"ok": True, "version": __version__,
                "scheduler_error": ctx.scheduler.last_cycle_error if who is not None and who.is_admin else None}

    return api
