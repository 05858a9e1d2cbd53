"""REST API (FastAPI). Every route but /health needs the bearer token.

    GET  /api/v1/health                    liveness, no auth
    GET  /api/v1/cluster                   live nodes and their free resources
    GET  /api/v1/scheduler                 cycle timings, policy, reservation, autoscaling demand
    GET  /api/v1/queue                     waiting jobs in order, why they wait, estimated starts
    GET  /api/v1/code/{sha}                is this code package stored?
    PUT  /api/v1/code/{sha}                upload a code package (zip, sha256 of the bytes)
    POST /api/v1/jobs                      submit (SubmitRequest) -> JobSummary
    POST /api/v1/jobs/batch                submit up to 1000 jobs at once, all or none
    GET  /api/v1/jobs                      list, newest first (?state=&experiment=&limit=)
    GET  /api/v1/jobs/{id}                 JobDetail: history, attempts, ranks, paths
    POST /api/v1/jobs/{id}/cancel          cancel (SIGTERM, grace, SIGKILL)
    GET  /api/v1/jobs/{id}/logs            a chunk of a rank's stdout/stderr from an offset
    GET  /api/v1/jobs/{id}/files           the job's files (?path=): logs, checkpoints, outputs
    GET  /api/v1/jobs/{id}/files/content   one file's bytes (?path=), streamed
    GET  /api/v1/datastores                the server's datastores (never a secret)

Files are read where they are stored (a local path or blob storage), with the
server's datastore credentials: clients never need storage keys.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse

from raybatch import __version__
from raybatch.config import API_PREFIX
from raybatch.models import (
    AttemptInfo, BatchSubmitRequest, FileEntry, JobDetail, JobSummary, LogChunk, QueueEntry, RankInfo,
    SchedulerInfo, SubmitRequest, Transition,
)
from raybatch.runtime.code import (
    MAX_CODE_BYTES, CodePackageError, CodePackageTooLarge, check_package, has_package, package_zip,
)
from raybatch.scheduler.loop import Scheduler
from raybatch.server.auth import bearer_dependency
from raybatch.spec.job import JobSpec
from raybatch.spec.location import LocationError
from raybatch.spec.policy import DEFAULT_GROUP
from raybatch.spec.location import parse as parse_location
from raybatch.state.states import InvalidTransition, JobState
from raybatch.state.store import Store
from raybatch.storage import plan as storage_plan
from raybatch.storage.backends import StorageError, open_backend
from raybatch.storage.datastores import CredentialError, Datastores

MAX_LOG_CHUNK = 1 << 20
ESTIMATED_JOBS = 100  # the queue view simulates this many jobs ahead for start estimates


@dataclass
class ServerContext:
    store: Store
    scheduler: Scheduler
    jobs_root: str              # a path or a blob location
    code_root: Path
    datastores: Any = Datastores  # () -> the current Datastores (re-read when its file changes)


def _unservable(ctx: ServerContext, job: dict[str, Any], location: str) -> Optional[str]:
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


def _backend(ctx: ServerContext, location: str):
    """A backend for one of a job's locations, or a 502/400 that says why not."""
    try:
        return open_backend(ctx.datastores().resolve(location))
    except (CredentialError, LocationError) as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"storage: {e}") from None


def _job_or_404(store: Store, job_id: str) -> dict[str, Any]:
    job = store.get_job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id '{job_id}'")
    return job


def job_detail(ctx: ServerContext, job: dict[str, Any]) -> JobDetail:
    spec = JobSpec.model_validate_json(job["spec"])
    store = ctx.store
    tree = storage_plan.job_locations(spec, job["job_dir"])
    ranks_by_attempt: dict[int, list[RankInfo]] = {}
    for r in store.ranks(job["id"]):
        logs = storage_plan.join(tree["stdouterr"], f"attempt-{r['attempt']}", f"rank-{r['rank']}")
        ranks_by_attempt.setdefault(r["attempt"], []).append(RankInfo(
            **{k: r[k] for k in RankInfo.model_fields if k in r},
            stdout=storage_plan.join(logs, "stdout.txt"), stderr=storage_plan.join(logs, "stderr.txt"),
        ))
    attempts = [
        AttemptInfo(**{k: a[k] for k in AttemptInfo.model_fields if k in a},
                    ranks=ranks_by_attempt.get(a["n"], []))
        for a in store.attempts(job["id"])
    ]
    report = {}
    if JobState(job["state"]).is_active and job["attempt"]:
        launcher_report = getattr(ctx.scheduler.launcher, "report", None)
        report = (launcher_report(job["id"], job["attempt"]) if launcher_report else None) or {}
    return JobDetail(
        **JobSummary.from_row(job).model_dump(),
        phase=report.get("phase"), staging=report.get("staging") if report.get("phase") == "staging" else None,
        spec=spec,
        waiting_reason=ctx.scheduler.waiting.get(job["id"]) if job["state"] == "QUEUED" else None,
        cancel_requested=bool(job["cancel_requested"]),
        preempt_requested=bool(job["preempt_requested"]),
        outputs={i: tree[f"outputs/{i}"] for i in spec.outputs},
        checkpoint_dir=tree["checkpoints"],
        logs_dir=tree["stdouterr"],
        transitions=[Transition(**t) for t in store.transitions(job["id"])],
        attempts=attempts,
    )


def create_app(ctx: ServerContext, token: str) -> FastAPI:
    app = FastAPI(title="raybatch", version=__version__)
    auth = [Depends(bearer_dependency(token))]
    store = ctx.store

    @app.get(f"{API_PREFIX}/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__,
                "scheduler_error": ctx.scheduler.last_cycle_error}

    @app.get(f"{API_PREFIX}/cluster", dependencies=auth)
    def cluster() -> list[dict[str, Any]]:
        return [n.__dict__ for n in ctx.scheduler.cluster.snapshot()]

    @app.get(f"{API_PREFIX}/scheduler", dependencies=auth)
    def scheduler_info() -> SchedulerInfo:
        sched = ctx.scheduler
        res = sched.reservation
        cfg = sched.policy
        return SchedulerInfo(
            **{k: sched.stats[k] for k in ("cycles", "last_cycle_ms", "last_plan_ms", "queued", "active")},
            policy={"backfill": cfg.backfill, "preemption": cfg.preemption, "fair_share": cfg.fair_share,
                    "quotas": {g: q.model_dump() for g, q in cfg.quotas.items() if g != DEFAULT_GROUP},
                    "default_quota": cfg.quota(DEFAULT_GROUP).model_dump()},
            policy_file=str(sched.policy_file) if sched.policy_file else None,
            policy_error=sched.policy_error, last_cycle_error=sched.last_cycle_error,
            reservation=({"job_id": res.job_id, "at": res.at if res.at != float("inf") else None,
                          "nodes": res.nodes} if res else None),
            autoscaler=sched.autoscaler.info() if sched.autoscaler is not None else None,
        )

    @app.get(f"{API_PREFIX}/queue", dependencies=auth)
    def queue(limit: int = Query(200, ge=1, le=100000),
              estimate: bool = Query(True, description="Estimate start times (first 100 jobs).")
              ) -> list[QueueEntry]:
        queued = [job_id for job_id, _, _ in store.queue_keys()]  # ids only: cheap at 10k
        waiting = dict(ctx.scheduler.waiting)
        # the order of the last cycle, then anything queued since, in store order
        in_queue = set(queued)
        ids = [i for i in waiting if i in in_queue] + [i for i in queued if i not in waiting]
        rows = {r["id"]: r for r in store.jobs_by_id(ids[:limit])}  # full rows for those shown
        ids = [i for i in ids[:limit] if i in rows]
        starts = ctx.scheduler.estimate_starts(ids[:ESTIMATED_JOBS]) if estimate else {}
        now = time.time()
        out = []
        for pos, job_id in enumerate(ids, 1):
            row = rows[job_id]
            spec = ctx.scheduler.spec_of(row)
            out.append(QueueEntry(
                position=pos, id=job_id, name=row["name"], experiment=row["experiment"],
                priority=row["priority"], nodes=spec.nodes, per_node=spec.resources.as_ray_bundle(),
                attempt=row["attempt"], submitted_at=row["submitted_at"],
                waiting_s=now - row["submitted_at"], reason=waiting.get(job_id, "not considered yet"),
                estimated_start=starts.get(job_id), preemptions=row["preemptions"],
            ))
        return out

    @app.get(f"{API_PREFIX}/code/{{sha}}", dependencies=auth)
    def code_exists(sha: str) -> dict[str, Any]:
        if not has_package(ctx.code_root, sha):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such code package")
        return {"sha": sha}

    @app.put(f"{API_PREFIX}/code/{{sha}}", dependencies=auth, status_code=201)
    async def code_upload(sha: str, request: Request) -> dict[str, Any]:
        data = await request.body()
        if len(data) > MAX_CODE_BYTES:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "code package over 500 MiB")
        if hashlib.sha256(data).hexdigest() != sha:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "sha256 of the body does not match the URL")
        zipped = package_zip(ctx.code_root, sha)
        if not zipped.is_file():
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    check_package(zf)
            except zipfile.BadZipFile:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not a zip file") from None
            except CodePackageTooLarge as e:
                raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(e)) from None
            except CodePackageError as e:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None
            # kept as sent: the driver ships it to the nodes, which unpack it
            tmp = zipped.with_name(f"{zipped.name}.partial-{secrets.token_hex(4)}")
            tmp.write_bytes(data)
            os.replace(tmp, zipped)
        return {"sha": sha}

    def admission(req: SubmitRequest, where: str = "") -> dict[str, Any]:
        """Check a submission; the store's keyword arguments for it."""
        spec = req.spec
        if req.code_package and not has_package(ctx.code_root, req.code_package):
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"{where}code package {req.code_package} was not uploaded")
        if spec.code and not req.code_package:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"{where}code: the job names a code directory but no code package was uploaded")
        never = ctx.scheduler.never_runs(spec)
        if never:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{where}this job can never run: {never}")
        problems = storage_plan.check_locations(spec, spec.output_root, ctx.datastores())
        if problems:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{where}" + "; ".join(problems))
        root = spec.output_root or ctx.jobs_root
        return dict(name=spec.name, experiment=spec.experiment, priority=spec.priority_value,
                    spec=spec.model_dump(mode="json"), code_package=req.code_package,
                    job_dir_for=lambda job_id: storage_plan.job_dir_for(root, spec.experiment, job_id))

    # async, unlike the other routes: one short SQLite transaction, so it runs on the event
    # loop; the thread pool's hop cost more CPU than the insert itself (benchmarks/bench_admission.py)
    @app.post(f"{API_PREFIX}/jobs", dependencies=auth, status_code=201)
    async def submit(req: SubmitRequest) -> JobSummary:
        row = store.create_job(**admission(req))
        ctx.scheduler.wake()
        return JobSummary.from_row(row)

    @app.post(f"{API_PREFIX}/jobs/batch", dependencies=auth, status_code=201)
    def submit_batch(req: BatchSubmitRequest) -> list[JobSummary]:
        """Many jobs (an array, a sweep) in one request: all queued or none."""
        items = [admission(r, f"jobs[{i}]: ") for i, r in enumerate(req.jobs)]
        rows = store.create_jobs(items)
        ctx.scheduler.wake()
        return [JobSummary.from_row(r) for r in rows]

    @app.get(f"{API_PREFIX}/jobs", dependencies=auth)
    def list_jobs(
        state: Optional[list[JobState]] = Query(None), experiment: Optional[str] = None,
        limit: int = Query(200, ge=1, le=100000),
    ) -> list[JobSummary]:
        rows = store.list_jobs(states=state, experiment=experiment, limit=limit)
        return [JobSummary.from_row(r) for r in rows]

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}", dependencies=auth)
    def show(job_id: str) -> JobDetail:
        return job_detail(ctx, _job_or_404(store, job_id))

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/cancel", dependencies=auth)
    def cancel(job_id: str) -> JobSummary:
        job = _job_or_404(store, job_id)
        state = JobState(job["state"])
        if state.is_final:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is already {state.value}")
        if state in (JobState.QUEUED, JobState.PREEMPTED, JobState.RESTARTING):
            try:
                job = store.transition(job_id, JobState.CANCELLED, "cancelled by user while queued",
                                       expect=state)
                return JobSummary.from_row(job)
            except InvalidTransition:
                pass  # admitted meanwhile: cancel it as a running job
        store.update_job(job_id, cancel_requested=time.time())
        ctx.scheduler.wake()
        return JobSummary.from_row(store.get_job(job_id))  # type: ignore[arg-type]

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/logs", dependencies=auth)
    def logs(
        job_id: str, rank: int = Query(0, ge=0), stream: str = Query("stdout", pattern="^(stdout|stderr)$"),
        attempt: Optional[int] = Query(None, ge=1), offset: int = Query(0, ge=0),
        max_bytes: int = Query(MAX_LOG_CHUNK, ge=1, le=MAX_LOG_CHUNK),
    ) -> LogChunk:
        job = _job_or_404(store, job_id)
        spec = JobSpec.model_validate_json(job["spec"])
        if rank >= spec.world_size:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"rank {rank} does not exist: the job has ranks 0-{spec.world_size - 1}")
        n = attempt or job["attempt"]
        if n > job["attempt"] or n < 1:
            if job["attempt"] == 0:
                n = 1
            else:
                raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                    f"attempt {n} does not exist: the job has attempts 1-{job['attempt']}")
        tree = storage_plan.job_locations(spec, job["job_dir"])
        rel = f"attempt-{n}/rank-{rank}/{stream}.txt"
        path = storage_plan.join(tree["stdouterr"], rel)
        try:
            data, size = _backend(ctx, tree["stdouterr"]).read(rel, offset, max_bytes)
        except StorageError as e:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading the log: {e}") from None
        next_offset = offset + len(data)
        state = JobState(job["state"])
        attempt_over = state.is_final or n < job["attempt"] or (job["attempt"] >= 1 and not state.is_active)
        return LogChunk(attempt=n, rank=rank, stream=stream, path=path, offset=offset,
                        next_offset=next_offset, data=data.decode("utf-8", errors="replace"),
                        eof=attempt_over and next_offset >= size, job_final=state.is_final,
                        latest_attempt=job["attempt"])

    def job_tree_roots(job_id: str, path: str) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        """The job, and (tree root, location, path below it) for each part of its tree
        that ``path`` touches."""
        job = _job_or_404(store, job_id)
        spec = JobSpec.model_validate_json(job["spec"])
        try:
            return job, storage_plan.locate(spec, job["job_dir"], path)
        except ValueError as e:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(e)) from None

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/files", dependencies=auth)
    def files(job_id: str, path: str = "") -> list[FileEntry]:
        """Every file under ``path`` of the job's tree (stdouterr/, checkpoints/, outputs/<id>/)."""
        out = []
        job, roots = job_tree_roots(job_id, path)
        for root, location, below in roots:
            why = _unservable(ctx, job, location)
            if why:
                if len(roots) == 1:
                    raise HTTPException(status.HTTP_403_FORBIDDEN, f"{root}: {why}")
                continue  # listing the whole tree: leave out what is not served
            try:
                entries = _backend(ctx, location).list(below)
            except StorageError as e:
                raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"listing {root}: {e}") from None
            for e in entries:
                if e.path.rsplit("/", 1)[-1].startswith(".upload-"):
                    continue  # a local upload in progress (LocalBackend.upload's temp file)
                rel = "/".join(p for p in (root, below, e.path) if p)
                out.append(FileEntry(path=rel, size=e.size, modified=e.mtime,
                                     location=storage_plan.join(location, below, e.path)))
        return sorted(out, key=lambda f: f.path)

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/files/content", dependencies=auth)
    def file_content(job_id: str, path: str = Query(..., min_length=1)) -> StreamingResponse:
        job, roots = job_tree_roots(job_id, path)
        root, location, below = roots[0]
        if len(roots) != 1 or not below:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"'{path}' is a directory; name one file")
        why = _unservable(ctx, job, location)
        if why:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"{root}: {why}")
        backend = _backend(ctx, location)
        try:
            entries = backend.list(below)
        except StorageError as e:
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(e)) from None
        if len(entries) != 1 or entries[0].path != "":
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file '{path}' in job {job_id}")
        try:
            backend.read(below, 0, 1)  # fail before the response starts, not in the middle of it
        except StorageError as e:
            code = status.HTTP_403_FORBIDDEN if "outside the location" in e.cause else status.HTTP_502_BAD_GATEWAY
            raise HTTPException(code, str(e)) from None
        size = entries[0].size  # the file as listed: a growing log is served up to here
        return StreamingResponse(backend.stream(below, size), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    @app.get(f"{API_PREFIX}/datastores", dependencies=auth)
    def datastores() -> dict[str, Any]:
        current = ctx.datastores()
        return {"datastores": current.describe(), "default": current.spec.default,
                "error": getattr(ctx.datastores, "error", None)}

    return app

