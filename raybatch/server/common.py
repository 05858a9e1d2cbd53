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
    own directory and the datastores the job's workspace may use: not any path on its
    machine, nor another job's directory, nor a storage account through its own identity,
    just because a job file named them."""
    job_dir = job["job_dir"].rstrip("/")
    if location == job_dir or location.startswith(job_dir + "/"):
        return None
    datastores = ctx.datastores()
    try:
        owner = datastores.owner_of(location)
    except (LocationError, ValueError):
        owner = None
    if owner is not None and owner[1] != (job.get("workspace") or "default"):
        return f"{location} is in datastore '{owner[0]}' of another workspace: the server does not serve it"
    if in_jobs_root(ctx, location):
        return (f"{location} is in the server's jobs directory but not this job's: the server serves a job's "
                "own directory only")
    if datastores.covers(location):
        return None
    if parse_location(location).is_local:
        return (f"{location} is outside the job's directory and every datastore: the server does not "
                "serve it (define a datastore for it, or read it on a node)")
    return f"{location} is in a storage account no datastore describes: the server does not read it"


def _jobs_root_parts(ctx: ServerContext, location: str) -> Optional[tuple[str, ...]]:
    """The parts of the location below the server's jobs root (() for the root itself), or
    None when it is not in the jobs root. Job directories are <root>/<experiment>/<job id>."""
    try:
        loc, root = parse_location(location), parse_location(ctx.jobs_root)
    except (LocationError, ValueError):
        return None
    if loc.is_local and root.is_local:
        p, r = Path(loc.path), Path(root.path)
        return p.relative_to(r).parts if p == r or r in p.parents else None
    if loc.kind == "blob" and root.kind == "blob" and loc.container == root.container \
            and loc.account in (None, root.account):
        base, path = root.path.strip("/"), loc.path.strip("/")
        if not base or path == base or path.startswith(base + "/"):
            return tuple(p for p in path[len(base):].split("/") if p)
    return None


def in_jobs_root(ctx: ServerContext, location: str) -> bool:
    """Is the location the server's jobs root or below it (where every job's directory is)?"""
    return _jobs_root_parts(ctx, location) is not None


def local_location_problems(ctx: ServerContext, spec: JobSpec) -> list[str]:
    """At submit, places in the server's jobs root (every job's directory): a job writes
    only its own directory, which the server assigns (so no output, output_root or
    checkpoint location may point there), and reads another job's files (its inputs,
    array.over: a pipeline's next step) only when that job is of its own workspace."""
    writes = [(f"outputs.{i}.path", o.path) for i, o in spec.outputs.items() if o.path]
    if spec.output_root:
        try:
            same = parse_location(spec.output_root) == parse_location(ctx.jobs_root)
        except (LocationError, ValueError):
            same = False
        if not same:
            writes.append(("output_root", spec.output_root))
    reads = [(f"inputs.{i}.path", inp.path) for i, inp in spec.inputs.items() if inp.mode != "upload"]
    if spec.array is not None and spec.array.over:
        reads.append(("array.over", spec.array.base))
    problems = [f"{name}: {text} is in the server's jobs directory ({ctx.jobs_root}), where other jobs' files "
                "are; a job's own directory is assigned by the server (outputs without a path go there)"
                for name, text in writes if text and in_jobs_root(ctx, text)]
    for name, text in reads:
        parts = _jobs_root_parts(ctx, text) if text else None
        if parts is None:
            continue
        other = ctx.store.get_job(parts[1]) if len(parts) >= 2 else None
        if other is None or Path(other["job_dir"]).name != parts[1]:
            problems.append(f"{name}: {text} is in the server's jobs directory but not in a job's directory: "
                            "name a job's files (<jobs root>/<experiment>/<job id>/...)")
        elif (other.get("workspace") or "default") != spec.workspace:
            problems.append(f"{name}: {text} is a file of job {parts[1]}, of another workspace: a job reads "
                            f"only its own workspace's ('{spec.workspace}') jobs")
    return problems


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
