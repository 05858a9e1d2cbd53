"""Request body size limits: a pure ASGI middleware, so that nothing reads a body past
its limit (FastAPI parses a JSON body whole, into memory, before a route runs).

Limits (far above what a real user sends; a job file itself is limited much lower by
``raybatch.spec.loader``):

======================================  ==============================================
``POST /api/v1/jobs``                   ``MAX_JOB_BODY`` (4 MiB): one job
``POST /api/v1/jobs/batch``             ``MAX_BATCH_BODY`` (64 MiB): up to 1000 jobs
``PUT /api/v1/code/{sha}``,             their own limits, enforced by the route while it
``PUT /api/v1/inputs/{sha}``            streams the body to disk (``routes/code.py``)
any other request                       ``MAX_OTHER_BODY`` (1 MiB)
======================================  ==============================================

A declared ``Content-Length`` over the limit is refused before a byte is read; a body
without one (chunked) is counted as it arrives and refused at the limit. Either way the
answer is 413 with a message naming the limit."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional

from fastapi import HTTPException

from raybatch.config import API_PREFIX

MAX_JOB_BODY = 4 * 2**20      # POST /jobs
MAX_BATCH_BODY = 64 * 2**20   # POST /jobs/batch
MAX_OTHER_BODY = 1 * 2**20    # every other request but the streamed uploads

# PUT routes that stream their body to disk and enforce their own limit
_STREAMED = (f"{API_PREFIX}/code/", f"{API_PREFIX}/inputs/")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def body_limit(method: str, path: str) -> Optional[int]:
    """The body limit of a request (bytes), or None when its route enforces its own."""
    path = path.rstrip("/")
    if method == "POST" and path == f"{API_PREFIX}/jobs":
        return MAX_JOB_BODY
    if method == "POST" and path == f"{API_PREFIX}/jobs/batch":
        return MAX_BATCH_BODY
    if method == "PUT" and path.startswith(_STREAMED):
        return None
    return MAX_OTHER_BODY


def _mib(n: int) -> str:
    return f"{n / 2**20:.4g} MiB"


def too_large_detail(method: str, path: str, limit: int) -> str:
    return (f"request body too large: {method} {path} takes at most {_mib(limit)} "
            f"({limit} bytes); see raybatch/server/limits.py")


class BodyLimitMiddleware:
    """Refuse bodies over ``body_limit`` with 413, reading at most the limit."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        limit = body_limit(method, path)
        if limit is None:
            await self.app(scope, receive, send)
            return
        detail = too_large_detail(method, path, limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, detail)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises an HTTPException from reading the body as it is
                    raise HTTPException(413, detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPException as e:  # read by something outside FastAPI's exception handling
            if e.status_code != 413 or started:
                raise
            await _send_413(send, detail)


def _content_length(scope: Scope) -> Optional[int]:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
