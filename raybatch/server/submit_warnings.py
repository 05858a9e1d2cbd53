"""Warnings at submit: a job queued although no live node can ever hold it.

On a cluster of fixed size (no autoscaler) such a job is still accepted - nodes may be
added by hand, or the job file asked for the wrong machine - but the user should hear
at once, not find it waiting hours later. The words are the queue's own
(``policy.why_not``), so ``submit`` and ``raybatch queue`` say the same thing.

With an autoscaler the question is the largest cluster its node types allow, and a job
even that cannot hold is refused outright (``Scheduler.never_runs``): a job that passes
that check can be held once the autoscaler adds nodes, so it is not warned about.

The nodes are the scheduler's last cycle's view (at most a tick old while anything is
queued): a burst of submissions costs no GCS round trip per job, and the answer for
one job shape is computed once per view."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from raybatch.scheduler import fit, policy
from raybatch.scheduler.fit import NodeView
from raybatch.spec.job import JobSpec

VIEW_FRESH_S = 5.0  # the scheduler's cached view is used when it is at most this old


def never_on_live_nodes(spec: JobSpec, nodes: list[NodeView], job: Optional[policy.Job] = None) -> Optional[str]:
    """Why no live node (set of nodes) can ever hold this job's gang, even all idle, in
    the queue's words; None when the live nodes could. ``job``: the policy's view of
    ``spec``, when the caller has it already."""
    job = job or policy.job_from_spec("new", 0, spec)
    eligible = [n for n in nodes if n.alive and policy.node_class_ok(n, job)]
    if fit.could_ever_fit(eligible, job.bundle, job.count, job.strategy):
        return None
    return policy.why_not(nodes, job)


def warning_text(reason: str) -> str:
    return (f"no live node can ever hold this job, so it stays queued until nodes that can join "
            f"the cluster: {reason}")


class SubmitWarnings:
    """The warnings for submitted jobs against one scheduler, memoized per job shape for
    as long as the scheduler's view is the same list of nodes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: Optional[list[NodeView]] = None
        self._memo: dict[int, Optional[str]] = {}

    def cached_nodes(self, scheduler: Any, now: Optional[float] = None) -> Optional[list[NodeView]]:
        """The scheduler's last cycle's nodes if fresh enough, else None (the caller reads
        the cluster itself, off the event loop)."""
        last = getattr(scheduler, "last_inputs", None)
        now = time.time() if now is None else now
        if last is not None and now - last[0] <= VIEW_FRESH_S:
            return last[1]
        return None

    def for_specs(self, scheduler: Any, specs: list[JobSpec],
                  nodes: Optional[list[NodeView]] = None) -> list[list[str]]:
        """Each job's warnings (a list per spec, most empty)."""
        if getattr(scheduler, "autoscaler", None) is not None:
            return [[] for _ in specs]  # the largest cluster was checked by never_runs
        if nodes is None:
            nodes = self.cached_nodes(scheduler) or scheduler.cluster.snapshot()
        out = []
        with self._lock:
            if nodes is not self._nodes:
                self._nodes, self._memo = nodes, {}
            for spec in specs:
                job = policy.job_from_spec("new", 0, spec)
                if job.shape not in self._memo:
                    self._memo[job.shape] = never_on_live_nodes(spec, nodes, job)
                reason = self._memo[job.shape]
                out.append([warning_text(reason)] if reason else [])
        return out

    async def for_spec_async(self, scheduler: Any, spec: JobSpec,
                             run_in_thread: Callable[..., Any]) -> list[str]:
        """One job's warnings from an async route: from the scheduler's view when it is fresh
        (no thread hop, nothing awaited), else the cluster is read in a thread."""
        if getattr(scheduler, "autoscaler", None) is not None:
            return []
        nodes = self.cached_nodes(scheduler)
        if nodes is None:
            nodes = await run_in_thread(scheduler.cluster.snapshot)
        return self.for_specs(scheduler, [spec], nodes)[0]
