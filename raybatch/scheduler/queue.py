"""The queue as the policy sees it, followed incrementally from the store.

At 10,000 queued jobs, reading the whole queue, parsing every spec and sorting it
each cycle cost more than the policy itself. The store says which jobs changed
state since the last look; only those rows are read again (a spec never changes,
and the nodes to avoid change only with a new attempt), new submissions are
appended to the sorted queue, and the whole queue is re-read at start and every
``resync_s`` as a safety net.

A queued array job is as many policy jobs as it wants slots (``policy.slot_from_spec``).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from raybatch.scheduler import policy
from raybatch.spec.job import JobSpec
from raybatch.state.states import JobState
from raybatch.state.store import Store


class QueueFollower:
    def __init__(self, store: Store, cached_spec: Callable[[str], Optional[JobSpec]],
                 resync_s: float = 60.0):
        self.store = store
        self.cached_spec = cached_spec          # a spec the scheduler already parsed, if any
        self.resync_s = resync_s
        # job id -> (attempt, policy views: one, or one per wanted slot of an array job)
        self.jobs: dict[str, tuple[int, list[policy.Job]]] = {}
        self._order: Optional[policy.Queue] = None          # self.jobs, sorted and grouped
        self._read_at: Optional[float] = None               # last full read (monotonic)

    def resync(self) -> None:
        """Read the whole queue again at the next ``refresh``."""
        self._read_at = None

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.jobs

    def views(self) -> list[policy.Job]:
        # list() copies in one step: the API thread calls this while refresh() changes the dict
        return [pj for _, pjs in list(self.jobs.values()) for pj in pjs]

    def refresh(self) -> policy.Queue:
        if self._read_at is None or time.monotonic() - self._read_at > self.resync_s:
            self.store.take_changed()  # before the read: nothing written after it is missed
            rows = self.store.queue_keys()
            self._read_at = time.monotonic()
            old, self.jobs = self.jobs, {}
            self._add(rows, old)
            self._order = None
        else:
            changed = self.store.take_changed()
            if changed:
                add, removed = [], False
                for job_id, state, seq, attempt in self.store.queue_rows(sorted(changed)):
                    if state == JobState.QUEUED.value:
                        removed |= job_id in self.jobs  # requeued with a new attempt: re-sorted
                        add.append((job_id, seq, attempt))
                    elif self.jobs.pop(job_id, None) is not None:
                        removed = True
                new = self._add(add, {})
                # new submissions go at the end of their group: no re-sort of the whole queue
                if removed or self._order is None or not self._order.extend(new):
                    self._order = None
        if self._order is None:
            self._order = policy.Queue(self.views())
        return self._order

    def _add(self, rows: list[tuple[str, int, int]], old: dict[str, tuple[int, list[policy.Job]]]
             ) -> list[policy.Job]:
        """Put these (id, seq, attempt) in ``self.jobs``, reusing ``old``'s views; the
        views built anew."""
        missing = []
        for job_id, seq, attempt in rows:
            kept = old.get(job_id)
            if kept is not None and kept[0] == attempt:
                self.jobs[job_id] = kept
            else:
                missing.append((job_id, seq, attempt))
        specs = self.store.specs([m[0] for m in missing]) if missing else {}
        built = []
        for job_id, seq, attempt in missing:
            spec = self.cached_spec(job_id) or JobSpec.model_validate_json(specs[job_id])
            avoid = frozenset(self.store.lost_nodes(job_id)) if attempt else frozenset()
            if spec.slots is not None:
                wanted = spec.slots.wanted_at_start
                pjs = [policy.slot_from_spec(job_id, k, seq, spec, avoid=avoid) for k in range(wanted)]
            else:
                pjs = [policy.job_from_spec(job_id, seq, spec, avoid=avoid)]
            self.jobs[job_id] = (attempt, pjs)
            built.extend(pjs)
        return built
