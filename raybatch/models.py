"""API models: the REST API's request and response bodies, which are also what
the SDK returns and what ``-o json`` prints. Defined once, here."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from raybatch.runtime.protocol import ItemCounts, Phase, Staging
from raybatch.spec.job import JobSpec
from raybatch.state.states import JobState


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the server does not know is a mistake, not ignored

    spec: JobSpec
    code_package: Optional[str] = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="sha256 (64 lowercase hex digits) of a code package uploaded with PUT /code/{sha}."
    )
    secrets: dict[str, SecretStr] = Field(
        default_factory=dict, description="Write-only: the values of the spec's secrets (shown there as '***'), "
        "sealed by the server and never returned.",
    )

    def wire(self) -> dict[str, Any]:
        """The JSON body the SDK sends: the one dump with the secrets' values in it (every
        other shows them as '***')."""
        body = self.model_dump(mode="json")
        body["secrets"] = {k: v.get_secret_value() for k, v in self.secrets.items()}
        return body


class BatchSubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[SubmitRequest] = Field(min_length=1, max_length=1000,
                                      description="Queued whole or not at all, in this order.")


class JobSummary(BaseModel):
    id: str
    name: str
    experiment: str
    workspace: str = Field("default", description="The workspace the job belongs to (its roles, quotas, datastores).")
    priority: int
    state: JobState
    attempt: int
    submitted_at: float
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    exit_code: Optional[int] = None
    reason: Optional[str] = None
    nodes: int
    job_dir: str
    preemptions: int = Field(0, description="How many times a higher-priority job preempted it.")
    preempted_by: Optional[str] = Field(None, description="The job that preempted it last.")
    evictions: int = Field(0, description="How many of its attempts ended by a spot eviction with notice "
                           "(retries.evictions).")
    warnings: Optional[list[str]] = Field(None, description="Submit only: what the user should know although "
                                          "the job was queued (no live node can ever hold it: the queue's words).")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "JobSummary":
        spec = json.loads(row["spec"])
        return cls(**{k: row[k] for k in (
            "id", "name", "experiment", "priority", "state", "attempt", "submitted_at",
            "started_at", "ended_at", "exit_code", "reason", "job_dir", "preemptions",
            "preempted_by")}, evictions=row.get("evictions") or 0, nodes=spec["nodes"],
                   workspace=row.get("workspace") or "default")


class Transition(BaseModel):
    at: float
    from_state: Optional[JobState]
    to_state: JobState
    reason: str


class RankInfo(BaseModel):
    rank: int
    node_rank: int
    local_rank: int
    node_id: Optional[str] = None
    node_ip: Optional[str] = None
    hostname: Optional[str] = None
    pid: Optional[int] = None
    exit_code: Optional[int] = None
    role: Optional[str] = None  # rank, chief, worker, ps, mpirun, mpi-node, launcher, idle
    stdout: str
    stderr: str


class AttemptInfo(BaseModel):
    n: int
    ray_job_id: str
    started_at: float
    running_at: Optional[float] = None
    ended_at: Optional[float] = None
    outcome: Optional[str] = None
    exit_code: Optional[int] = None
    reason: Optional[str] = None
    lost_nodes: list[str] = Field(default_factory=list, description="Nodes where a rank was lost.")
    deadline_rule: Optional[int] = Field(None, description="A job with a deadline: the rule that chose spot or "
                                         "dedicated nodes for this attempt (see DeadlineInfo).")
    ranks: list[RankInfo] = []


class DeadlineInfo(BaseModel):
    """A job with a deadline: its numbers and the scheduler's choice of node class
    (docs/scheduling.md, "Deadlines on spot nodes")."""

    deadline_at: float = Field(description="The deadline (epoch seconds).")
    runtime_estimate_s: float = Field(description="C: the compute time the job needs on one gang.")
    progress_s: float = Field(description="p: compute time up to its newest checkpoint.")
    restart_overhead_s: float = Field(description="d: mean start-up plus work lost per restart (a default "
                                      "until it has restarted once).")
    restarts_measured: int = Field(0, description="How many restarts d was measured on (0: the default).")
    slack_s: Optional[float] = Field(None, description="D - t - (C - p): time to spare if it ran from now "
                                     "without a stop (not over yet).")
    rule: Optional[int] = Field(None, description="The rule in force: 4 deadline close (dedicated to the end), "
                                "3 on dedicated until ahead of the uniform-progress line, 2 spot available "
                                "(spot until evicted), 1 behind the line and no spot (dedicated), 0 ahead of "
                                "the line (waiting for spot).")
    words: Optional[str] = Field(None, description="The rule in words.")
    nodes: Optional[str] = Field(None, description="spot | dedicated: the class it chooses.")
    low_priority_nodes: Optional[str] = Field(None, description="The job's effective low_priority_nodes: "
                                              "require (spot) or avoid (dedicated); for a running job, at its "
                                              "next start (a running job is not moved).")
    where: Optional[str] = Field(None, description="queued | spot | dedicated: where the job is.")
    spot_available: Optional[bool] = Field(None, description="A free spot node fits its gang, or a spot node "
                                           "type can still launch (not at max_workers, not in back-off).")
    decided_at: Optional[float] = None
    met: Optional[bool] = Field(None, description="Succeeded: whether it ended by its deadline.")


class SlotInfo(BaseModel):
    """One slot of an array job: a gang the scheduler granted to an attempt."""

    attempt: int
    slot: int
    nodes: list[str] = Field(description="The node of each bundle of the slot's gang.")
    state: str = Field(description="granted | revoked | released (the scheduler's view).")
    activity: Optional[str] = Field(None, description="reserving | starting | ready | busy | draining | released | lost "
                                    "(the driver's view, while the attempt runs).")
    task: Optional[int] = Field(None, description="The task it runs now.")
    granted_at: float
    released_at: Optional[float] = None
    reason: Optional[str] = Field(None, description="Why it was taken back.")


class ItemInfo(BaseModel):
    """One task of an array job (``items_per_task`` items; one item by default)."""

    task: int
    keys: list[str] = Field(description="Its items: file paths below array.over, or indices.")
    state: str = Field(description="pending | running | done | failed | skipped (done by the resumed job).")
    runs: int = Field(0, description="How many times its command ran.")
    exit_code: Optional[int] = None
    slot: Optional[int] = None
    nodes: list[str] = Field(default_factory=list)
    seconds: Optional[float] = None
    message: Optional[str] = None
    job_id: Optional[str] = Field(None, description="The job that ran it (the resumed job's, when skipped).")


class TrialInfo(BaseModel):
    """One trial of a sweep: its parameters, how it ended and its primary metric."""

    id: str = Field(description="<sweep id>.t<n>")
    n: int
    params: dict[str, Any]
    state: str = Field(description="pending | running | done | failed | early_terminated | cancelled "
                       "(limits.timeout ended the sweep while it waited or ran)")
    rank: Optional[int] = Field(None, description="1 = best so far (trials with a metric only).")
    metric: str = Field("", description="The sweep's primary metric.")
    best: Optional[float] = Field(None, description="Its best value of the primary metric.")
    last: Optional[float] = None
    reports: int = Field(0, description="How many times it reported the primary metric.")
    runs: int = Field(0, description="How many times its command ran (a preempted trial runs again).")
    exit_code: Optional[int] = None
    message: Optional[str] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    attempt: int = Field(0, description="The sweep's attempt that ran it.")


class MetricEvent(BaseModel):
    name: str
    value: float
    step: int
    t: float = Field(description="When it was reported (epoch seconds).")
    source: Optional[str] = Field(None, description="log_metric | stdout | mlflow")
    run: Optional[int] = Field(None, description="The attempt (or the trial's run) that reported it.")


class JobDetail(JobSummary):
    spec: JobSpec
    waiting_reason: Optional[str] = None
    cancel_requested: bool = False
    preempt_requested: bool = Field(False, description="Being stopped for a higher-priority job.")
    deadline: Optional[DeadlineInfo] = Field(None, description="Its deadline and the node class chosen for it.")
    outputs: dict[str, str] = Field(default_factory=dict, description="Output id -> its location.")
    checkpoint_dir: str
    logs_dir: str
    phase: Optional[Phase] = Field(None, description="The running attempt's step (raybatch.runtime.protocol.Phase).")
    staging: Optional[Staging] = Field(None, description="While staging: bytes done and in all.")
    transitions: list[Transition] = []
    attempts: list[AttemptInfo] = []
    items: Optional[ItemCounts] = Field(None, description="An array job's progress (while it runs).")
    trials: Optional[ItemCounts] = Field(None, description="A sweep's trials (while it runs).")
    best: Optional[dict[str, Any]] = Field(None, description="A sweep's best trial so far: trial, value, params.")
    slots: list[SlotInfo] = Field(default_factory=list, description="An array job's slots, latest attempt.")
    dashboard_url: Optional[str] = Field(None, description="The latest attempt's Ray job page in the Ray dashboard "
                                         "(`raybatch dashboard ID` opens it logged in).")


class FileEntry(BaseModel):
    """One file of a job, as `raybatch files` lists it (like `az batchai job file list`)."""

    path: str = Field(description="Path in the job's tree: stdouterr/..., checkpoints/..., outputs/<id>/...")
    size: int
    modified: float = Field(description="Last modified, seconds since the epoch.")
    location: str = Field(description="Where it is stored (a path or a blob URI).")
    type: Literal["file", "link"] = Field("file", description="'link': a symbolic link in the job's tree, "
                                          "listed (size 0) but never followed or served.")


class LogChunk(BaseModel):
    attempt: int = Field(description="The job's attempt, or with ``item`` the task's run.")
    item: Optional[int] = Field(None, description="An array job's task.")
    trial: Optional[int] = Field(None, description="A sweep's trial.")
    rank: int
    stream: str
    path: str
    offset: int
    next_offset: int
    data: str
    eof: bool = Field(description="True when this attempt's log is read to its end and will not grow.")
    job_final: bool = Field(False, description="The job is SUCCEEDED, FAILED or CANCELLED (an item's or "
                            "trial's log: that task or trial has ended).")
    latest_attempt: int = Field(0, description="The job's latest attempt number (an item's or trial's log: "
                                "its latest run).")


class QueueEntry(BaseModel):
    """A waiting job, in the order the scheduler considers the queue."""

    position: int = Field(description="1 = considered first.")
    id: str
    name: str
    experiment: str
    priority: int
    nodes: int
    per_node: dict[str, float] = Field(description="Resources each node of the gang needs (Ray names).")
    attempt: int
    submitted_at: float
    waiting_s: float = Field(description="Seconds since it was submitted.")
    reason: Optional[str] = Field(None, description="Why it is still waiting, in words.")
    estimated_start: Optional[float] = Field(
        None, description="Starts by this time (epoch seconds) if every job runs to its max_wall_clock "
        "on the current nodes; None when that gives no bound (e.g. the nodes are too few).")
    preemptions: int = 0
    slots: Optional[str] = Field(None, description="An array job's slots held and wanted, e.g. '2/4 slots'.")
    deadline: Optional[DeadlineInfo] = Field(None, description="Its deadline and the node class chosen for it.")


class SchedulerInfo(BaseModel):
    """The scheduler's own state: timings, policy, the head's reservation, autoscaling demand."""

    cycles: int
    last_cycle_ms: float
    last_plan_ms: float
    queued: int
    active: int
    policy: dict[str, Any]
    policy_file: Optional[str] = None
    policy_error: Optional[str] = None
    last_cycle_error: Optional[str] = None
    reservation: Optional[dict[str, Any]] = None
    autoscaler: Optional[dict[str, Any]] = None
