"""The launcher -> driver -> server protocol of one attempt, typed once.

The server and the attempt's driver share a control directory on the head node::

    <state>/attempts/<job id>/<n>/attempt.json   AttemptFile: what the driver must run (launcher writes)
    <state>/attempts/<job id>/<n>/secrets.json   {storage: credentials, env: the job's secrets}, 0600,
                                                 removed by the driver on reading
    <state>/attempts/<job id>/<n>/control.json   Control: stop requests (scheduler writes, driver polls)
    <state>/attempts/<job id>/<n>/status.json    Report: the driver's latest phase (driver writes)

Every file is written atomically (temp file + rename), so a reader never sees half of one.
The job's own tree (logs, checkpoints, outputs) is ``raybatch.storage.plan``'s."""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, Field

from raybatch.config import ServerSettings
from raybatch.spec.job import JobSpec
from raybatch.state.states import AttemptOutcome


def ray_job_id(job_id: str, attempt: int) -> str:
    """The attempt's Ray Job (submission id), also its placement group's name."""
    return f"raybatch-{job_id}-{attempt}"


class Phase(str, enum.Enum):
    """Where a running attempt is; the driver reports each step as it reaches it."""

    PLACING = "placing"      # reserving the gang's placement group
    PLACED = "placed"        # the placement group is placed; rank actors and environments start
    STAGING = "staging"      # inputs and blob checkpoints are staged on the nodes (``staging`` progress)
    PREPARING = "preparing"  # the job's ``prepare`` command runs once on every node
    RUNNING = "running"      # every rank's process has started (``ranks``)
    STOPPING = "stopping"    # the attempt is ending; the other ranks get SIGTERM (``reason``)
    SYNCING = "syncing"      # the last upload of outputs, checkpoints and logs (``nodes_left``)
    DONE = "done"            # every process stopped, the gang released; ``outcome`` is final

    @property
    def gang_placed(self) -> bool:
        """Does the gang hold its Ray resources (the placement group is placed)? PLACED is
        reported the moment it is: Ray's resource view may lag (``Report.shows_placed``)."""
        return self is not Phase.PLACING

    @property
    def ranks_started(self) -> bool:
        """Have the ranks been started (the job is RUNNING once the report lists them)?"""
        return self in (Phase.RUNNING, Phase.STOPPING, Phase.DONE)


class CodeRef(BaseModel):
    sha: str = Field(description="sha256 of the code package's zip")
    dir: str = Field(description="an unpacked copy on the server (packages from before the zip was kept)")
    zip: str = Field(description="the zip as uploaded, on the server's machine")


class AttemptFile(BaseModel):
    """What the launcher hands the driver: the job, where it runs, and the server's settings."""

    job_id: str
    attempt: int = Field(ge=1)
    spec: JobSpec
    job_dir: str
    control_dir: str
    nodes: list[str] = Field(default_factory=list, description="node id of each bundle (the scheduler's choice)")
    storage: dict[str, Any] = Field(description="AttemptStorage.to_dict(secrets=False)")
    cache_dir: str
    ray_address: Optional[str] = None
    code: Optional[CodeRef] = None
    # the server's settings, not the Ray cluster's environment
    storage_check_s: float = ServerSettings.storage_check_s
    final_sync_timeout_s: float = ServerSettings.final_sync_timeout_s
    placement_timeout_s: float = ServerSettings.placement_timeout_s

    @property
    def files(self) -> "ControlDir":
        return ControlDir(Path(self.control_dir))


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: what kind of end (the retry policy's input), the exit code
    that decided it (when a process did), and why, in words."""

    kind: AttemptOutcome
    exit_code: Optional[int] = None
    message: str = ""
    deadline: Optional[float] = None  # a stop: the ranks' grace ends by then (epoch s), e.g. an eviction's

    @property
    def succeeded(self) -> bool:
        return self.kind is AttemptOutcome.SUCCEEDED

    def grace(self, grace_period: float) -> float:
        """The grace period the ranks get when this stops them: the job's, cut to the deadline."""
        if self.deadline is None:
            return grace_period
        return max(0.0, min(grace_period, self.deadline - time.time()))


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
REASON_MAX = 1000


def plain_reason(text: str) -> str:
    """A reason as the job's history shows it: one plain line (no terminal colours, no
    traceback lines), at most ``REASON_MAX`` characters. Tracebacks go to the driver log."""
    text = _ANSI.sub("", text or "")
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 1] + "…"


class SpawnError(RuntimeError):
    """A rank's process could not be started (the kernel refused the exec: an argument or
    environment past its limit, a missing interpreter, no permission): the job's own error,
    not its node's. Raised in the rank actor, re-raised by ``Gang.start`` unwrapped."""


class SlotGrant(BaseModel):
    """One slot of an array job's attempt, as the scheduler granted it."""

    nodes: list[str] = Field(description="node id of each bundle of the slot's gang")
    state: Literal["granted", "revoked"] = "granted"
    reason: str = ""
    preempt: bool = Field(False, description="revoked for a higher-priority job: stop its task now "
                          "(SIGTERM, grace); otherwise the slot drains: its task finishes, no new one starts")
    evict_by: Optional[float] = Field(None, description="revoked because a node of the slot is being evicted "
                                      "(preempt is set too): its task's grace ends by then at the latest "
                                      "(epoch s), and the task reruns free (EVICTED)")


class Control(BaseModel):
    """The scheduler's requests to the attempt's driver: stop the attempt, and (array
    jobs) the slots granted to it and those taken back."""

    action: Optional[Literal["cancel", "preempt", "evict"]] = None
    reason: str = ""
    at: float = Field(default_factory=time.time)
    deadline: Optional[float] = Field(None, description="evict: when the node goes (epoch s); the ranks' "
                                      "grace period ends by then at the latest")
    slots: dict[int, SlotGrant] = Field(default_factory=dict)

    def requested_stop(self) -> Optional[Outcome]:
        """How the attempt ends when it stops for this request (None: no stop asked)."""
        if self.action == "cancel":
            return Outcome(AttemptOutcome.CANCELLED, None, "cancelled by user")
        if self.action == "preempt":
            return Outcome(AttemptOutcome.PREEMPTED, None, self.reason or "preempted by a higher-priority job")
        if self.action == "evict":
            return Outcome(AttemptOutcome.EVICTED, None, self.reason or "a spot node of the job is being evicted",
                           deadline=self.deadline)
        return None


class RankReport(BaseModel):
    """Where one rank runs, and how its process ended."""

    rank: int
    node_rank: int
    local_rank: int
    role: Optional[str] = None
    node_id: Optional[str] = None
    node_ip: Optional[str] = None
    hostname: Optional[str] = None
    pid: Optional[int] = None
    exit_code: Optional[int] = None


class Staging(BaseModel):
    bytes_done: int = 0
    bytes_total: int = 0
    nodes_left: int = 0
    seconds: float = 0.0


class SlotReport(BaseModel):
    """One slot of an array job, as its driver sees it."""

    slot: int
    nodes: list[str] = Field(default_factory=list)
    state: Literal["reserving", "starting", "ready", "busy", "draining", "released", "lost"]
    task: Optional[int] = Field(None, description="the task it runs now")
    since: float = Field(0.0, description="when it entered this state")
    placed_at: Optional[float] = Field(None, description="when its placement group was placed (it holds "
                                       "its Ray resources from then until it is released)")

    @property
    def placed(self) -> bool:
        return self.placed_at is not None

    @property
    def gone(self) -> bool:
        """Its gang is released: its resources are back."""
        return self.state in ("released", "lost")


class ItemCounts(BaseModel):
    """An array job's progress, in tasks (one task = ``items_per_task`` items)."""

    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    skipped: int = Field(0, description="done by the job this one resumes (``resume_from``)")
    rate: float = Field(0.0, description="tasks finished per second, over the last minute")
    eta_s: Optional[float] = None

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed - self.running - self.skipped)


class Report(BaseModel):
    """The driver's latest word on the attempt (``status.json``)."""

    phase: Phase
    at: float = Field(0.0, description="when it was written (epoch seconds)")
    pid: Optional[int] = None
    ranks: list[RankReport] = Field(default_factory=list)
    staging: Optional[Staging] = None       # STAGING
    reason: Optional[str] = None            # STOPPING
    nodes_left: Optional[int] = None        # SYNCING
    # DONE
    outcome: Optional[AttemptOutcome] = None
    exit_code: Optional[int] = None
    message: str = ""
    lost_nodes: list[str] = Field(default_factory=list)
    unsynced: list[str] = Field(default_factory=list)
    # array jobs
    slots: list[SlotReport] = Field(default_factory=list)
    items: Optional[ItemCounts] = None
    trials: Optional[ItemCounts] = Field(None, description="a sweep's trials (one unit = one trial)")
    best: Optional[dict[str, Any]] = Field(None, description="a sweep's best trial so far: n, value, params")
    running_trials: list[dict[str, Any]] = Field(default_factory=list, description="a sweep's running trials")
    slots_wanted: Optional[int] = Field(None, description="slots the driver can still use (the tail frees nodes)")

    def shows_placed(self, view_lag_s: float) -> bool:
        """Does Ray's resource view already show the gang? Placed, and long enough ago for
        the raylets to have reported it."""
        if self.phase is Phase.PLACED:
            return time.time() - self.at > view_lag_s
        return self.phase.gang_placed


class ControlDir:
    """The files of one attempt's control directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.attempt = self.path / "attempt.json"
        self.secrets = self.path / "secrets.json"
        self.control = self.path / "control.json"
        self.status = self.path / "status.json"

    @classmethod
    def of(cls, state_dir: str | Path, job_id: str, attempt: int) -> "ControlDir":
        return cls(Path(state_dir) / "attempts" / job_id / str(attempt))

    def read_attempt(self) -> AttemptFile:
        return AttemptFile.model_validate_json(self.attempt.read_text())

    def read_report(self) -> Optional[Report]:
        data = read_json(self.status)
        return Report.model_validate(data) if data is not None else None

    def write_report(self, report: Report) -> None:
        write_json_atomic(self.status, report.model_dump(mode="json", exclude_none=True))

    def read_control(self) -> Optional[Control]:
        data = read_json(self.control)
        return Control.model_validate(data) if data is not None else None

    def write_control(self, control: Control) -> None:
        write_json_atomic(self.control, control.model_dump(mode="json"))

    def update_control(self, change: Callable[[Control], None]) -> Control:
        """Read, change and write the control file (only the scheduler writes it)."""
        control = self.read_control() or Control()
        change(control)
        control.at = time.time()
        self.write_control(control)
        return control


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temp file and a rename (mode 0600 from the first byte)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
