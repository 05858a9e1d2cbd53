"""What the route modules share: finding a job, and reading its files with the
server's datastore credentials (refusing what the server must not serve)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from fastapi import HTTPException, status

from raybatch.spec.job import JobSpec
from raybatch.spec.location import LocationError
from raybatch.spec.location import parse as parse_location
from raybatch.state.store import Store
from raybatch.storage.backends import Backend, LocalBackend, open_backend
from raybatch.storage.datastores import CredentialError

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext


def job_or_404(store: Store, job_id: str) -> dict[str, Any]:
    job = store.get_job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id '{job_id}'")
    return job


def array_spec(job: dict[str, Any], spec: Optional[JobSpec] = None) -> JobSpec:
    """The job's spec (``spec``: already parsed), which must be an array job's (else 400)."""
    spec = spec or JobSpec.model_validate_json(job["spec"])
    if spec.array is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"job {job['id']} is not an array job (no `array:` block)")
    return spec


def sweep_spec(job: dict[str, Any], spec: Optional[JobSpec] = None) -> JobSpec:
    """The job's spec (``spec``: already parsed), which must be a sweep's (else 400)."""
    spec = spec or JobSpec.model_validate_json(job["spec"])
    if spec.sweep is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"job {job['id']} is not a sweep (no search_space)")
    return spec


def check_states(state: Optional[list[str]], allowed: tuple[str, ...]) -> None:
    """A ``?state=`` filter names only states that exist (400 with the allowed ones)."""
    bad = [s for s in state or [] if s not in allowed]
    if bad:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"state: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")


def unservable(ctx: ServerContext, job: dict[str, Any], location: str) -> Optional[str]:
    """Why the server must not read this location for a user, or None. It reads the job's
    own directory, the server's jobs root and datastores: not any path on its machine, nor
    a storage account through its own identity, just because a job file named them."""
    job_dir = job["job_dir"].rstrip("/")
    if location == job_dir or location.startswith(job_dir + "/") or ctx.datastores().covers(location):
        return None
    loc = parse_location(location)
    if loc.is_local:
        root = parse_location(ctx.jobs_root)
        if root.is_local and (Path(loc.path) == Path(root.path) or Path(root.path) in Path(loc.path).parents):
            return None
        return (f"{location} is outside the job's directory and every datastore: the server does not "
                "serve it (define a datastore for it, or read it on a node)")
    return f"{location} is in a storage account no datastore describes: the server does not read it"


def backend_for(ctx: ServerContext, location: str) -> Backend:
    """A backend for one of a job's locations, or a 502 that says why not."""
    try:
        return open_backend(ctx.datastores().resolve(location))
    except (CredentialError, LocationError) as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"storage: {e}") from None


def trusted_anchor(ctx: ServerContext, job: dict[str, Any], path: str) -> str:
    """The trusted directory above a local location's ``path``, from which every part is
    checked for links: the server's jobs root, else the local datastore that holds it,
    else the job's directory (else the location itself)."""
    p = Path(path)
    candidates = []
    root = parse_location(ctx.jobs_root)
    if root.is_local:
        candidates.append(Path(root.path))
    candidates += [Path(ds.location.path) for ds in ctx.datastores().spec.datastores.values()
                   if ds.location.kind == "local"]
    candidates.append(Path(job["job_dir"]))
    for base in candidates:
        if p == base or base in p.parents:
            return str(base)
    return path


def job_backend(ctx: ServerContext, job: dict[str, Any], location: str) -> Backend:
    """A backend for one of the job's locations that never follows a link below the
    trusted anchor (``trusted_anchor``); a plain one for blob storage."""
    backend = backend_for(ctx, location)
    if isinstance(backend, LocalBackend):
        return LocalBackend(backend.access, anchor=trusted_anchor(ctx, job, backend.access.path))
    return backend
