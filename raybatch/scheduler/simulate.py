"""Run the real policy (``policy.plan``) against a simulated clock.

Used twice: the queue view's estimated start times (every job runs for its full
``max_wall_clock``, so an estimate is a "start by" bound under the current
queue) and the utilization benchmark (jobs run for their actual durations).
Preemption is not simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from raybatch.scheduler import fit
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.policy import Job, plan, release
from raybatch.spec.policy import SchedulerPolicy


@dataclass
class SimJob:
    job: Job
    duration: float          # how long it really runs (<= job.limit in practice)
    submit_at: float = 0.0


@dataclass
class SimResult:
    starts: dict[str, float] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)
    never: list[str] = field(default_factory=list)   # could not start on these nodes
    cycles: int = 0

    def makespan(self, t0: float = 0.0) -> float:
        return max(self.ends.values(), default=t0) - t0


def simulate(nodes: list[NodeView], jobs: list[SimJob], config: SchedulerPolicy | None = None,
             now: float = 0.0, running: list[tuple[Job, float]] = (), stop_when_started: set[str] | None = None,
             max_cycles: int = 100_000) -> SimResult:
    """Event-driven: at each arrival or end, ask the policy what starts.
    ``running`` are jobs already holding resources on ``nodes``, with their end times."""
    config = (config or SchedulerPolicy()).model_copy(update={"preemption": False})
    free = [n.copy() for n in nodes]
    active: dict[str, tuple[Job, float]] = {j.id: (j, end) for j, end in running}
    arrivals = sorted(jobs, key=lambda s: (s.submit_at, s.job.seq))
    durations = {s.job.id: s.duration for s in jobs}
    queued: list[Job] = []
    result = SimResult()
    t, i = now, 0
    while result.cycles < max_cycles:
        while i < len(arrivals) and arrivals[i].submit_at <= t:
            queued.append(arrivals[i].job)
            i += 1
        for job_id in [k for k, (_, end) in active.items() if end <= t]:
            job, end = active.pop(job_id)
            release(free, job)
            if job_id in durations:
                result.ends[job_id] = end
        result.cycles += 1
        p = plan(t, free, [j for j, _ in active.values()], queued, config)
        started = {job.id for job, _ in p.start}
        for job, placed in p.start:
            fit.reserve(free, placed, job.bundle)
            active[job.id] = (replace(job, started_at=t, nodes=tuple(placed)), t + durations[job.id])
            result.starts[job.id] = t
        queued = [j for j in queued if j.id not in started]
        if stop_when_started is not None and stop_when_started <= result.starts.keys():
            break
        next_t = min([end for _, end in active.values()] + [a.submit_at for a in arrivals[i:i + 1]],
                     default=math.inf)
        if next_t == math.inf:
            result.never = [j.id for j in queued]
            break
        t = max(next_t, t)
    return result
