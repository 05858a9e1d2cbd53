"""Jobs: submit (one, or a batch of up to 1000), list, show, cancel, and read a rank's logs."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool

from raybatch.models import (
    AttemptInfo, BatchSubmitRequest, DeadlineInfo, JobDetail, JobSummary, LogChunk, RankInfo, SlotInfo, SubmitRequest,
    Transition,
)
from raybatch.runtime.code import has_package
from raybatch.runtime.environment import pip_problems
from raybatch.runtime.protocol import Phase
from raybatch.runtime.secrets import SecretBox, split_for_store
from raybatch.runtime.items import ItemStore
from raybatch.server.access import require, visible_workspaces
from raybatch.server.common import array_spec, job_backend, job_or_404, local_location_problems, sweep_spec
from raybatch.server.identity import Role
from raybatch.server.routes.dashboard import job_page, ray_of
from raybatch.server.submit_warnings import SubmitWarnings
from raybatch.spec.job import JobSpec, split_package
from raybatch.spec.secrets import SecretRef, vault_name
from raybatch.state.states import InvalidTransition, JobState
from raybatch.state.store import StoreBusy
from raybatch.storage import plan as storage_plan
from raybatch.storage.backends import LinkRefused, StorageError
from raybatch.sweep.trials import FINAL_STATES, TrialJournal

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

MAX_LOG_CHUNK = 1 << 20
# A log offset past any log (1 TiB) and below any file system's largest file (ext4: 16 TiB):
# a larger one made the read's seek fail (2^63: OverflowError; 2^53 on ext4: EINVAL), a 500
MAX_LOG_OFFSET = 1 << 40
STORE_WAIT_S = 0.8  # a submit waits this long for a busy store, then answers 503
log = logging.getLogger("raybatch.server")


def job_detail(ctx: ServerContext, job: dict[str, Any]) -> JobDetail:
    spec = JobSpec.model_validate_json(job["spec"])
    store = ctx.store
    tree = storage_plan.job_locations(spec, job["job_dir"])
    ranks_by_attempt: dict[int, list[RankInfo]] = {}
    for r in store.ranks(job["id"]):
        logs = storage_plan.join(tree["stdouterr"], storage_plan.rank_logs(r["attempt"], r["rank"]))
        ranks_by_attempt.setdefault(r["attempt"], []).append(RankInfo(
            **{k: r[k] for k in RankInfo.model_fields if k in r},
            stdout=storage_plan.join(logs, "stdout.txt"), stderr=storage_plan.join(logs, "stderr.txt"),
        ))
    attempts = [
        AttemptInfo(**{k: a[k] for k in AttemptInfo.model_fields if k in a},
                    ranks=ranks_by_attempt.get(a["n"], []))
        for a in store.attempts(job["id"])
    ]
    report = None
    if JobState(job["state"]).is_active and job["attempt"]:
        report = ctx.scheduler.report(job["id"], job["attempt"])
    slots = []
    if spec.slots is not None and job["attempt"]:
        activity = {s.slot: s for s in (report.slots if report else [])}
        for r in store.slots(job["id"], job["attempt"]):
            a = activity.get(r["slot"])
            slots.append(SlotInfo(attempt=r["attempt"], slot=r["slot"], nodes=r["nodes"], state=r["state"],
                                  activity=a.state if a else None, task=a.task if a else None,
                                  granted_at=r["granted_at"], released_at=r["released_at"], reason=r["reason"]))
    deadline = ctx.scheduler.deadlines.info(job, spec)
    return JobDetail(
        **JobSummary.from_row(job).model_dump(),
        deadline=DeadlineInfo(**deadline) if deadline else None,
        phase=report.phase if report else None,
        staging=report.staging if report and report.phase is Phase.STAGING else None,
        items=report.items if report else None, slots=slots,
        trials=report.trials if report else None, best=report.best if report else None,
        spec=spec,
        waiting_reason=(ctx.scheduler.waiting.get(job["id"])
                        if job["state"] == "QUEUED" or (spec.slots is not None and JobState(job["state"]).is_active)
                        else None),
        cancel_requested=bool(job["cancel_requested"]),
        preempt_requested=bool(job["preempt_requested"]),
        outputs={i: tree[f"outputs/{i}"] for i in spec.outputs},
        checkpoint_dir=tree["checkpoints"],
        logs_dir=tree["stdouterr"],
        transitions=[Transition(**t) for t in store.transitions(job["id"])],
        attempts=attempts,
        dashboard_url=job_page(ray_of(ctx)[1], max(attempts, key=lambda a: a.n).ray_job_id) if attempts else None,
    )


def admission(ctx: ServerContext, req: SubmitRequest, where: str = "") -> dict[str, Any]:
    """Check a submission; the store's keyword arguments for it."""
    spec = req.spec
    # the access rule read the workspace from the raw body; this is the spec that is queued
    require(Role.contributor, spec.workspace)
    if req.code_package and not has_package(ctx.code_root, req.code_package):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"{where}code package {req.code_package} was not uploaded")
    if spec.code and not req.code_package:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"{where}code: the job names a code directory but no code package was uploaded")
    for ident, inp in spec.inputs.items():  # mode upload: the client uploaded it (PUT /inputs/{sha})
        if inp.mode == "upload" and not inp.package:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"{where}inputs.{ident}: mode upload, but no package was uploaded for it (submit "
                                "with `raybatch submit` or raybatch.Client, which upload it)")
        if inp.mode == "upload" and not has_package(ctx.code_root, split_package(inp.package)[0]):
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"{where}inputs.{ident}.package: {inp.package} was not uploaded (PUT /inputs/<sha>)")
    never = ctx.scheduler.never_runs(spec)
    if never:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{where}this job can never run: {never}")
    problems = storage_plan.check_locations(spec, spec.output_root, ctx.datastores())
    problems += ctx.datastores().workspace_problems(spec)
    problems += local_location_problems(ctx, spec)
    # paths/URLs/VCS/options only if the policy allows them; index credentials never
    problems += pip_problems(spec, ctx.scheduler.policy.allow_pip_sources)
    if spec.array is not None and spec.array.resume_from:
        problems += resume_problems(ctx, spec.array.resume_from, spec.workspace)
    try:  # a deadline already past, or too close for runtime_estimate
        deadline_at = spec.deadline_at(time.time())
    except ValueError as e:
        problems.append(str(e))
    for name, ref in spec.secrets.items():  # the server reads Key Vault with its own identity
        why = (ctx.scheduler.policy.vault_problem(spec.workspace, vault_name(ref.keyvault))
               if isinstance(ref, SecretRef) and ref.keyvault is not None else None)
        if why:
            problems.append(f"secrets.{name}: {why}")
    secret_values, problem = split_for_store(spec, {k: v.get_secret_value() for k, v in req.secrets.items()})
    if problem:
        problems.append(problem)
    if problems:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{where}" + "; ".join(problems))
    root = spec.output_root or ctx.jobs_root
    return dict(name=spec.name, experiment=spec.experiment, workspace=spec.workspace, priority=spec.priority_value,
                spec=spec.model_dump(mode="json"), code_package=req.code_package, deadline_at=deadline_at,
                job_dir_for=lambda job_id: storage_plan.job_dir_for(root, spec.experiment, job_id),
                # sealed with the server's key; the spec above shows their names only
                secrets=secret_box(ctx).seal(secret_values) if secret_values else None)


def secret_box(ctx: ServerContext) -> SecretBox:
    """The server's key for job secrets, beside its store (``<state dir>/secrets.key``)."""
    box = getattr(ctx, "_secret_box", None)
    if box is None:
        box = SecretBox(ctx.store.path.parent)
        setattr(ctx, "_secret_box", box)
    return box


def resume_problems(ctx: ServerContext, job_id: str, workspace: str) -> list[str]:
    """Can an array job resume this one? It must be an array job of the same workspace
    (its items and results are that workspace's) that is not running: an item never runs
    twice at once."""
    old = ctx.store.get_job(job_id)
    if old is None:
        return [f"array.resume_from: no job with id '{job_id}'"]
    if (old.get("workspace") or "default") != workspace:
        return [f"array.resume_from: {job_id} is a job of another workspace; a job resumes only one of its own "
                f"workspace ('{workspace}')"]
    if JobSpec.model_validate_json(old["spec"]).array is None:
        return [f"array.resume_from: {job_id} is not an array job"]
    state = JobState(old["state"])
    if not state.is_final:
        return [f"array.resume_from: {job_id} is {state.value}; cancel it first (`raybatch cancel {job_id}`), "
                "an item must never run in two jobs at once"]
    return []


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()
    store = ctx.store
    submit_warnings = SubmitWarnings()

    # async, unlike the other routes: one short SQLite transaction, so it runs on the event
    # loop; the thread pool's hop cost more CPU than the insert itself (benchmarks/bench_admission.py)
    @api.post("/jobs", status_code=201)
    async def submit(req: SubmitRequest, request: Request) -> JobSummary:
        fields = admission(ctx, req)
        try:  # never wait on the event loop: a busy store is waited for in the thread pool
            row = store.create_job(**fields, wait=0)
        except StoreBusy:  # up to STORE_WAIT_S, then 503 (app.py), nothing written
            row = await run_in_threadpool(lambda: store.create_job(**fields, wait=STORE_WAIT_S))
        ctx.scheduler.wake()
        request.state.target = row["id"]  # the audit log's record of this request names the job
        summary = JobSummary.from_row(row)
        try:  # a job no live node can hold is queued all the same, with a warning
            warnings = await submit_warnings.for_spec_async(ctx.scheduler, req.spec, run_in_threadpool)
        except Exception:  # noqa: BLE001 - a warning that cannot be worked out must not fail the submit
            log.warning("could not check %s against the live nodes", row["id"], exc_info=True)
            warnings = []
        if warnings:
            summary.warnings = warnings
        return summary

    @api.post("/jobs/batch", status_code=201)
    def submit_batch(req: BatchSubmitRequest, request: Request) -> list[JobSummary]:
        """Many jobs (an array, a sweep) in one request: all queued or none."""
        items = [admission(ctx, r, f"jobs[{i}]: ") for i, r in enumerate(req.jobs)]
        rows = store.create_jobs(items, wait=STORE_WAIT_S)
        request.state.target = ",".join(r["id"] for r in rows)  # the audit log's
        ctx.scheduler.wake()
        try:
            warnings = submit_warnings.for_specs(ctx.scheduler, [r.spec for r in req.jobs])
        except Exception:  # noqa: BLE001 - as in submit
            log.warning("could not check a batch against the live nodes", exc_info=True)
            warnings = [[] for _ in rows]
        return [JobSummary.from_row(r).model_copy(update={"warnings": w or None}) for r, w in zip(rows, warnings)]

    @api.get("/jobs")
    def list_jobs(
        state: Optional[list[JobState]] = Query(None), experiment: Optional[str] = None,
        limit: int = Query(200, ge=1, le=100000),
        workspace: Optional[str] = Query(None, max_length=64, description="Only this workspace's jobs."),
    ) -> list[JobSummary]:
        shown = visible_workspaces()  # a non-admin lists its workspace's jobs only
        if workspace is not None:
            shown = frozenset({workspace}) if shown is None else shown & {workspace}
        rows = store.list_jobs(states=state, experiment=experiment, limit=limit, workspaces=shown)
        return [JobSummary.from_row(r) for r in rows]

    @api.get("/jobs/{job_id}")
    def show(job_id: str) -> JobDetail:
        return job_detail(ctx, job_or_404(store, job_id))

    @api.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> JobSummary:
        job = job_or_404(store, job_id)
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

    @api.get("/jobs/{job_id}/logs")
    def logs(
        job_id: str, rank: int = Query(0, ge=0), stream: str = Query("stdout", pattern="^(stdout|stderr)$"),
        attempt: Optional[int] = Query(None, ge=1),
        offset: int = Query(0, ge=0, le=MAX_LOG_OFFSET, description="Byte offset to read from (at most 2^40)."),
        max_bytes: int = Query(MAX_LOG_CHUNK, ge=1, le=MAX_LOG_CHUNK),
        item: Optional[int] = Query(None, ge=0, description="An array job's task: its log (``attempt``: its run)."),
        trial: Optional[int] = Query(None, ge=0, description="A sweep's trial: its log (``attempt``: its run)."),
    ) -> LogChunk:
        job = job_or_404(store, job_id)
        spec = JobSpec.model_validate_json(job["spec"])
        if rank >= spec.world_size:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"rank {rank} does not exist: the job has ranks 0-{spec.world_size - 1}")
        tree = storage_plan.job_locations(spec, job["job_dir"])
        state = JobState(job["state"])
        if item is not None or trial is not None:  # an array task's or a sweep trial's own runs
            return unit_log(ctx, job, spec, tree["stdouterr"], item, trial, rank, stream, attempt, offset, max_bytes)
        n = attempt or job["attempt"]
        if n > job["attempt"] or n < 1:
            if job["attempt"] == 0:
                n = 1
            else:
                raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                    f"attempt {n} does not exist: the job has attempts 1-{job['attempt']}")
        over = state.is_final or n < job["attempt"] or (job["attempt"] >= 1 and not state.is_active)
        return log_chunk(ctx, job, tree["stdouterr"], f"{storage_plan.rank_logs(n, rank)}/{stream}.txt", offset,
                         max_bytes, over, state, attempt=n, rank=rank, stream=stream, latest_attempt=job["attempt"])

    return api


def log_chunk(ctx: ServerContext, job: dict[str, Any], location: str, rel: str, offset: int, max_bytes: int, over: bool,
              state: JobState, final: Optional[bool] = None, **fields: Any) -> LogChunk:
    """A chunk of one log file from ``offset``; ``eof`` once the file will not grow (``over``)
    and is read to its end; ``final`` (default: the job's) once no later attempt will come."""
    try:
        data, size = job_backend(ctx, job, location).read(rel, offset, max_bytes)
    except LinkRefused as e:  # a job replaced its log (or its log directory) with a link
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"reading the log: {e}") from None
    except StorageError as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading the log: {e}") from None
    next_offset = offset + len(data)
    return LogChunk(path=storage_plan.join(location, rel), offset=offset, next_offset=next_offset,
                    data=data.decode("utf-8", errors="replace"), eof=over and next_offset >= size,
                    job_final=state.is_final if final is None else final, **fields)


def unit_log(ctx: ServerContext, job: dict[str, Any], spec: JobSpec, logs: str, item: Optional[int],
             trial: Optional[int], rank: int, stream: str, run: Optional[int], offset: int,
             max_bytes: int) -> LogChunk:
    """A chunk of one run (default: the latest) of an array task's or a sweep trial's log.
    ``latest_attempt`` is the unit's latest run, and ``job_final`` says the unit has ended
    (its record or the journal says so, after its latest run): a follower moves on to each
    new run and stops when the unit is over, not when the whole job is."""
    state = JobState(job["state"])
    if item is not None:
        array_spec(job, spec)
        known = spec.array.known_tasks()
        if known is not None and item >= known:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"item {item} does not exist: the job has items 0-{known - 1}")
        n, kind, rel_of = item, "items", storage_plan.item_logs
    else:
        sweep_spec(job, spec)
        n, kind, rel_of = trial, "trials", storage_plan.trial_logs
    assert n is not None
    try:
        latest = storage_plan.past_runs(job_backend(ctx, job, logs), kind, n).get(n, 1)
        if item is not None:
            rec = ItemStore(job_backend(ctx, job, storage_plan.join(job["job_dir"], "items"))).record(n)
            ended_run = rec.runs if rec is not None else None
        else:
            r = TrialJournal(job_backend(ctx, job, storage_plan.join(job["job_dir"], "trials"))).records().get(n)
            ended_run = r.runs if r is not None and r.state in FINAL_STATES else None
    except StorageError as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading the log: {e}") from None
    unit_over = state.is_final or (ended_run is not None and ended_run >= latest)
    run = run or latest
    return log_chunk(ctx, job, logs, f"{rel_of(n, run, rank)}/{stream}.txt", offset, max_bytes,
                     unit_over or run < latest, state, final=unit_over,
                     attempt=run, item=item, trial=trial, rank=rank, stream=stream, latest_attempt=latest)
