"""The job state machine.

Every transition is written (with a timestamp and a reason) before it is acted
on; the allowed edges are listed here and nowhere else.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    """The life of a job.

    QUEUED      A row in the store, waiting for its gang to fit. Not a Ray job yet.
    STARTING    Admitted: a Ray Job for the attempt was submitted; its placement
                group is being reserved and rank actors started.
    RUNNING     Every rank's process is running on its node.
    SUCCEEDED   Every rank exited 0 (final).
    FAILED      A rank exited non-zero, or the attempt could not run, with no retry
                left (final).
    CANCELLED   Cancelled by a user; every process was stopped (final).
    PREEMPTED   Stopped to make room for a higher-priority job, or evicted from a
                spot node with notice (EVICTED); goes back to QUEUED at its place.
    RESTARTING  The attempt ended with an infrastructure failure (node or driver
                lost) and a retry is left; goes back to QUEUED.
    """

    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"
    RESTARTING = "RESTARTING"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @property
    def is_active(self) -> bool:
        """An attempt exists in Ray for this job."""
        return self in (JobState.STARTING, JobState.RUNNING)


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
    JobState.STARTING: frozenset(
        {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
         JobState.RESTARTING, JobState.PREEMPTED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RESTARTING,
         JobState.PREEMPTED}
    ),
    JobState.PREEMPTED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.RESTARTING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(src: JobState, dst: JobState) -> None:
    if dst not in ALLOWED[src]:
        raise InvalidTransition(f"{src.value} -> {dst.value} is not an allowed transition")


class AttemptOutcome(str, enum.Enum):
    """How an attempt ended; the scheduler's retry policy maps it to the next job state."""

    SUCCEEDED = "SUCCEEDED"      # every rank exited 0
    USER_ERROR = "USER_ERROR"    # a rank exited non-zero
    NODE_LOST = "NODE_LOST"      # a rank's node or actor died
    DRIVER_LOST = "DRIVER_LOST"  # the attempt's Ray Job died without reporting
    START_FAILED = "START_FAILED"  # inputs missing, placement impossible, ...
    TIMEOUT = "TIMEOUT"          # max_wall_clock exceeded
    STALLED = "STALLED"          # no rank printed anything for stall_timeout
    CANCELLED = "CANCELLED"      # a user cancelled the job
    PREEMPTED = "PREEMPTED"      # room was made for a higher-priority job
    EVICTED = "EVICTED"          # a spot node was taken back with notice (drained for preemption)
    PLACEMENT_TIMEOUT = "PLACEMENT_TIMEOUT"  # the gang's placement group never placed
    UPLOAD_FAILED = "UPLOAD_FAILED"  # the processes succeeded, but outputs could not be uploaded
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"  # staging kept failing on a transient error

    @property
    def keeps_place(self) -> bool:
        """Stopped through no fault of its own, with notice: requeued at its place, and a
        slot's unit reruns free (a higher-priority job, a spot eviction)."""
        return self in (AttemptOutcome.PREEMPTED, AttemptOutcome.EVICTED)

    @property
    def is_infrastructure(self) -> bool:
        return self in (AttemptOutcome.NODE_LOST, AttemptOutcome.DRIVER_LOST,
                        AttemptOutcome.PLACEMENT_TIMEOUT, AttemptOutcome.STORAGE_UNAVAILABLE)


# A job's ``preempted_by`` names the job that preempted it, or, for a requeue an operator
# asked for (``raybatch cluster scale --on-shrink requeue``), a sentence starting with this.
REQUEUED_BY = "requeued by "


def preempted_words(by: str | None) -> str:
    """Why a job was stopped, from its ``preempted_by``."""
    if by and by.startswith(REQUEUED_BY):
        return by
    return f"preempted by {by}, which has a higher priority"
