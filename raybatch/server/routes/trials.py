"""A sweep's trials and any job's metrics.

    GET /api/v1/jobs/{id}/trials           a sweep's trials, best first (?state=)
    GET /api/v1/jobs/{id}/trials/{n}       one trial (the CLI's `show <id>.t<n>`)
    GET /api/v1/jobs/{id}/metrics          metric events (?trial= a sweep's trial; ?rank=, ?attempt=)

Ended trials come from the sweep's journal (``trials/trials.jsonl`` in its job directory),
running ones from its driver's report. Metrics come from each rank's metric store
(``metrics.jsonl`` next to its stdout)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, HTTPException, Query, status

from raybatch.models import MetricEvent, TrialInfo
from raybatch.runtime.launch import METRICS_STORE
from raybatch.server.common import check_states, job_backend, job_or_404, sweep_spec
from raybatch.spec.job import JobSpec
from raybatch.state.states import JobState
from raybatch.storage import plan as storage_plan
from raybatch.storage.backends import StorageError
from raybatch.sweep.trials import TRIAL_STATES, TrialJournal, TrialRecord, ranked, trial_id

if TYPE_CHECKING:
    from raybatch.server.app import ServerContext

def trial_records(ctx: ServerContext, job: dict[str, Any]) -> list[TrialRecord]:
    """Every trial known: ended ones from the journal, running ones from the report."""
    journal = TrialJournal(job_backend(ctx, job, storage_plan.join(job["job_dir"], "trials")))
    try:
        records = journal.records()
    except StorageError as e:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading the sweep's trials: {e}") from None
    if JobState(job["state"]).is_active and job["attempt"]:
        report = ctx.scheduler.report(job["id"], job["attempt"])
        for d in (report.running_trials if report else []):
            if d["n"] not in records:
                records[d["n"]] = TrialRecord.from_dict(d)
    return list(records.values())


def trial_infos(job: dict[str, Any], spec: JobSpec, records: list[TrialRecord]) -> list[TrialInfo]:
    maximize = spec.sweep.objective.goal == "maximize"
    out, place = [], 0
    for r in ranked(records, maximize):
        if r.best is not None:
            place += 1
        out.append(TrialInfo(id=trial_id(job["id"], r.n), n=r.n, params=r.params, state=r.state,
                             rank=place if r.best is not None else None, metric=spec.sweep.objective.primary_metric,
                             best=r.best, last=r.last, reports=r.reports,
                             runs=r.runs, exit_code=r.exit_code, message=r.message or None,
                             started_at=r.started_at, ended_at=r.ended_at, attempt=r.attempt))
    return out


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter()

    @api.get("/jobs/{job_id}/trials")
    def trials(job_id: str, state: Optional[list[str]] = Query(None, description=f"Only these: {', '.join(TRIAL_STATES)}.")
               ) -> list[TrialInfo]:
        job = job_or_404(ctx.store, job_id)
        spec = sweep_spec(job)
        check_states(state, TRIAL_STATES)
        out = trial_infos(job, spec, trial_records(ctx, job))
        return [t for t in out if not state or t.state in state]

    @api.get("/jobs/{job_id}/trials/{n}")
    def trial(job_id: str, n: int) -> TrialInfo:
        job = job_or_404(ctx.store, job_id)
        spec = sweep_spec(job)
        for t in trial_infos(job, spec, trial_records(ctx, job)):
            if t.n == n:
                return t
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"sweep {job_id} has no trial {n} (yet)")

    @api.get("/jobs/{job_id}/metrics")
    def metrics(job_id: str, trial: Optional[int] = Query(None, ge=0, description="A sweep's trial."),
                rank: int = Query(0, ge=0), attempt: Optional[int] = Query(None, ge=1,
                description="The job's attempt (a trial's run); default: every one, in order."),
                name: Optional[str] = Query(None, description="Only this metric.")) -> list[MetricEvent]:
        job = job_or_404(ctx.store, job_id)
        spec = JobSpec.model_validate_json(job["spec"])
        if rank >= spec.world_size:
            raise HTTPException(status.HTTP_400_BAD_REQUEST,
                                f"rank {rank} does not exist: the job has ranks 0-{spec.world_size - 1}")
        logs = storage_plan.job_locations(spec, job["job_dir"])["stdouterr"]
        backend = job_backend(ctx, job, logs)
        if trial is not None:
            sweep_spec(job, spec)
            try:  # every run of the trial, in order (a run without metrics reads as empty)
                runs = storage_plan.past_runs(backend, "trials", trial).get(trial, 0)
            except StorageError as e:
                raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading metrics: {e}") from None
            rels = [(r, storage_plan.trial_logs(trial, r, rank)) for r in range(1, runs + 1) if attempt in (None, r)]
        else:
            rels = [(n, storage_plan.rank_logs(n, rank)) for n in range(1, max(job["attempt"], 1) + 1)
                    if attempt in (None, n)]
        out: list[MetricEvent] = []
        for run, rel in rels:
            try:
                data, _size = backend.read(f"{rel}/{METRICS_STORE}", 0, 64 << 20)
            except StorageError as e:
                raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"reading metrics: {e}") from None
            for raw in data.decode("utf-8", errors="replace").splitlines():
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue
                if name is None or e.get("name") == name:
                    out.append(MetricEvent(**{k: e[k] for k in ("name", "value", "step", "t") if k in e},
                                           source=e.get("source"), run=run))
        return out

    return api
