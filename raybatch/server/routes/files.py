"""A job's files (its logs, checkpoints and outputs) and the server's datastores.

Files are read where they are stored (a local path or blob storage), with the
server's datastore credentials: clients never need storage keys.

A job writes its own tree, so it can plant symbolic links there (to ``/``, to the
server's ``raybatch.db``, to a datastore's key file). Local trees are therefore read
with ``LocalBackend``'s link-safe walk, anchored at the trusted directory above the
job's location (the server's jobs root, or the datastore's root): every part below it
is opened with ``O_NOFOLLOW``, links are listed as links (``type: link``, size 0) and
never read. A ``?path`` with ``..``, a leading ``/`` or a NUL byte is a 400."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import StreamingResponse

from raybatch.models import FileEntry
from raybatch.server.access import visible_workspaces
from raybatch.server.common import job_backend, job_or_404, unservable
from raybatch.spec.job import JobSpec
from raybatch.state.store import Store
from raybatch.storage import plan as storage_plan
from raybatch.storage.backends import LinkRefused, StorageError

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def check_tree_path(path: str) -> None:
    """A 400 for a ``?path`` that could only mean to leave the job's tree (or crash a
    system call): NUL bytes, an absolute path, ``..`` parts."""
    if "\0" in path:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "path: NUL bytes are not allowed")
    if path.startswith("/"):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"path {path!r}: an absolute path; give a path in the job's tree, e.g. stdouterr/attempt-1")
    if ".." in path.split("/"):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"path {path!r} is not in the job's files: '..' is not allowed")


def job_tree_roots(store: Store, job_id: str, path: str) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The job, and (tree root, location, path below it) for each part of its tree
    that ``path`` touches."""
    check_tree_path(path)
    job = job_or_404(store, job_id)
    spec = JobSpec.model_validate_json(job["spec"])
    try:
        return job, storage_plan.locate(spec, job["job_dir"], path)
    except ValueError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()
    store = ctx.store

    @api.get("/jobs/{job_id}/files")
    def files(job_id: str, path: str = "") -> list[FileEntry]:
        """Every file under ``path`` of the job's tree (stdouterr/, checkpoints/, outputs/<id>/)."""
        out = []
        job, roots = job_tree_roots(store, job_id, path)
        for root, location, below in roots:
            why = unservable(ctx, job, location)
            if why:
                if len(roots) == 1:
                    raise HTTPException(status.HTTP_403_FORBIDDEN, f"{root}: {why}")
                continue  # listing the whole tree: leave out what is not served
            try:
                entries = job_backend(ctx, job, location).list(below)
            except LinkRefused as e:
                if len(roots) == 1:
                    raise HTTPException(status.HTTP_403_FORBIDDEN, f"listing {root}: {e}") from None
                continue  # the whole tree: leave out a part reached through a link
            except StorageError as e:
                raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"listing {root}: {e}") from None
            for e in entries:
                if e.path.rsplit("/", 1)[-1].startswith(".upload-"):
                    continue  # a local upload in progress (LocalBackend.upload's temp file)
                rel = "/".join(p for p in (root, below, e.path) if p)
                out.append(FileEntry(path=rel, size=e.size, modified=e.mtime, type=e.kind,
                                     location=storage_plan.join(location, below, e.path)))
        return sorted(out, key=lambda f: f.path)

    @api.get("/jobs/{job_id}/files/content")
    def file_content(job_id: str, path: str = Query(..., min_length=1)) -> StreamingResponse:
        job, roots = job_tree_roots(store, job_id, path)
        root, location, below = roots[0]
        if len(roots) != 1 or not below:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"'{path}' is a directory; name one file")
        why = unservable(ctx, job, location)
        if why:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"{root}: {why}")
        backend = job_backend(ctx, job, location)
        try:
            entries = backend.list(below)
        except LinkRefused as e:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(e)) from None
        except StorageError as e:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(e)) from None
        if len(entries) != 1 or entries[0].path != "":
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file '{path}' in job {job_id}")
        if entries[0].kind == "link":
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"'{path}' is a symbolic link: links in a job's "
                                "files are listed, never followed")
        try:
            backend.read(below, 0, 1)  # fail before the response starts, not in the middle of it
        except LinkRefused as e:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(e)) from None
        except StorageError as e:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(e)) from None
        size = entries[0].size  # the file as listed: a growing log is served up to here
        return StreamingResponse(backend.stream(below, size), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    @api.get("/datastores")
    def datastores() -> dict[str, Any]:
        current = ctx.datastores()
        shown = visible_workspaces()  # shared ones, and the caller's workspace's
        rows = [d for d in current.describe() if shown is None or d.get("workspace") in (None, *shown)]
        return {"datastores": rows, "default": current.spec.default,
                "error": getattr(ctx.datastores, "error", None)}

    return api
