"""``GET /health``: liveness, the one route without auth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from raybatch import __version__

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__,
                "scheduler_error": ctx.scheduler.last_cycle_error}

    return api
