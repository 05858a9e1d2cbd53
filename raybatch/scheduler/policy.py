"""The scheduling policy: which queued jobs start now, which running jobs are
preempted, and why every other job waits.

A pure function of one snapshot (``plan``), so the whole policy is unit-tested
on simulated clusters and driven by a simulated clock in the benchmarks; the
loop (``loop.py``) only gathers the snapshot and applies the plan.

Order. Jobs are taken by priority (high first). Within a priority, each group
(experiment) keeps its submission order, and when several groups have jobs
waiting the group using the least of its fair share goes first (dominant
resource share over the cluster's CPUs, GPUs and memory, divided by the group's
``share`` weight). A requeued job keeps its original submission number, so its
place.

Admission. A job starts when its whole gang fits free resources node by node
(``fit.gang_fit``), its group stays within its quota, and it does not delay the
reservation described next.

EASY backfill. The first job in order that does not fit is the *head*. It gets a
reservation: the earliest time its gang fits if running jobs end at their
``max_wall_clock`` (or their stop deadline when they are being stopped), and the
nodes it would use then. A later job may still start now if it ends before that
time or leaves the head's reserved gang intact. So the queue is never blocked by
one big job, and the big job never starves.

Preemption. If the head could run by stopping strictly lower-priority,
preemptible running jobs, the smallest such set is chosen (fewest jobs, then
lowest priority, then least work lost); they are stopped with their grace period
and requeued, and the head waits for them.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Optional

from raybatch.scheduler import fit
from raybatch.scheduler.fit import NodeView
from raybatch.spec.policy import DEFAULT_GROUP, DEFAULT_WORKSPACE, QuotaSpec, SchedulerPolicy, group_label, group_of

# Exact search for the minimal victim set is combinatorial: bound its cost, then
# fall back to greedy with pruning (still a minimal set, not always the minimum).
VICTIM_SEARCH_BUDGET = 4000
RESOURCES_FOR_SHARE = ("CPU", "GPU", "memory")


_SHAPES: dict[tuple, int] = {}
_shape_counter = itertools.count()


def _shape_id(key: tuple) -> int:
    """A small int per distinct shape: hashing the nested tuple once per job instead
    of on every lookup, for every job, every cycle."""
    sid = _SHAPES.get(key)
    if sid is None:
        if len(_SHAPES) > 100_000:  # ids stay unique (a counter): a cleared table only costs memos
            _SHAPES.clear()
        sid = _SHAPES[key] = next(_shape_counter)
    return sid


@dataclass
class Job:
    """A job as the policy sees it: queued, or running (``nodes`` set)."""

    id: str
    priority: int
    seq: int
    bundle: dict[str, float]
    count: int = 1
    strategy: str = "spread"
    group: str = "default"
    limit: float = math.inf            # max_wall_clock, seconds
    grace: float = 30.0                # SIGTERM -> SIGKILL when stopped
    preemptible: bool = True
    low_priority_nodes: str = "allow"  # allow | require | avoid
    prefer_low_priority: bool = False  # allow: new nodes for it are spot ones (autoscale.Demand)
    avoid: frozenset[str] = frozenset()  # nodes where it lost a rank (soft)
    # running jobs only
    started_at: Optional[float] = None
    nodes: tuple[str, ...] = ()        # node of each bundle
    stopping_until: Optional[float] = None  # being stopped: resources back by then
    # a slot of an array job (raybatch.runtime.slots): one of its gangs, admitted, counted and
    # preempted like a job of its own; ``id`` is "<parent>/s<slot>"
    parent: Optional[str] = None
    slot: int = 0

    @property
    def gpus(self) -> float:
        return self.bundle.get("GPU", 0.0) * self.count

    # derived once (the policy reads them for every queued job, every cycle)
    shape: int = field(init=False, repr=False, compare=False)  # jobs of one shape fit alike
    order_key: tuple = field(init=False, repr=False, compare=False)  # (-priority, seq, slot)

    def __post_init__(self) -> None:
        self.shape = _shape_id((tuple(sorted(self.bundle.items())), self.count, self.strategy,
                                self.low_priority_nodes, self.avoid))
        self.order_key = (-self.priority, self.seq, self.slot)

    def set_node_class(self, low_priority_nodes: str) -> None:
        """Set the effective ``low_priority_nodes`` in place, its shape with it: a queued job
        with a deadline gets it from the deadline policy each cycle (deadline_jobs)."""
        if low_priority_nodes not in ("allow", "require", "avoid"):
            raise ValueError(f"low_priority_nodes: {low_priority_nodes!r}; allowed: allow, require, avoid")
        if low_priority_nodes != self.low_priority_nodes:
            self.low_priority_nodes = low_priority_nodes
            self.__post_init__()

    @property
    def hold(self) -> float:
        """How long it may hold its nodes: max_wall_clock, then SIGTERM and the grace period."""
        return self.limit + self.grace

    def expected_end(self, now: float) -> float:
        """When its resources come back, at the latest (never in the past)."""
        if self.stopping_until is not None:
            return max(now, self.stopping_until)
        if self.started_at is None:
            return math.inf
        return max(now, self.started_at + self.hold)


@dataclass
class Reservation:
    job_id: str
    at: float                  # earliest start under max_wall_clock limits (inf: unknown)
    nodes: list[str]


@dataclass
class Plan:
    start: list[tuple[Job, list[str]]] = field(default_factory=list)
    preempt: list[tuple[Job, Job]] = field(default_factory=list)  # (victim, for whom)
    waiting: dict[str, str] = field(default_factory=dict)  # in the order they were considered
    reservation: Optional[Reservation] = None
    unfit: list[Job] = field(default_factory=list)   # waiting for resources (autoscaling demand)


# ---- node eligibility and placement ---------------------------------------------

def node_class_ok(node: NodeView, job: Job) -> bool:
    if job.low_priority_nodes == "allow":
        return True
    low = fit.is_low_priority(node)
    return low if job.low_priority_nodes == "require" else not low


def place(nodes: list[NodeView], job: Job) -> Optional[list[str]]:
    """Where the job's gang fits now (node per bundle), or None. Nodes where it
    lost a rank are used only if the gang could never fit without them: if it could,
    it waits for room elsewhere (other nodes may just be busy for a moment)."""
    eligible = [n for n in nodes if n.alive and node_class_ok(n, job)]
    if job.avoid:
        others = [n for n in eligible if n.node_id not in job.avoid]
        placed = fit.gang_fit(others, job.bundle, job.count, job.strategy)
        if placed is not None or fit.could_ever_fit(others, job.bundle, job.count, job.strategy):
            return placed
    return fit.gang_fit(eligible, job.bundle, job.count, job.strategy)


def release(nodes: list[NodeView], job: Job) -> None:
    """Give a running job's bundles back to its nodes (in place)."""
    by_id = {n.node_id: n for n in nodes}
    for node_id in job.nodes:
        node = by_id.get(node_id)
        if node is None:
            continue
        for k, v in job.bundle.items():
            node.available[k] = min(node.available.get(k, 0.0) + v, node.total.get(k, math.inf))


def why_not(nodes: list[NodeView], job: Job) -> str:
    eligible = [n for n in nodes if node_class_ok(n, job)]
    msg = fit.why_not(eligible, job.bundle, job.count, job.strategy)
    if job.avoid:
        msg += f"; keeping off {len(job.avoid)} node(s) where it lost a rank"
    if job.low_priority_nodes != "allow":
        msg += f" (low-priority nodes: {job.low_priority_nodes})"
    return msg


def shadow(now: float, nodes: list[NodeView], running: Iterable[Job], job: Job
           ) -> Optional[tuple[float, list[str], list[NodeView]]]:
    """Earliest time ``job`` fits if running jobs end by their expected end: the
    time, its placement then, and the free resources at that time. None when it
    does not fit even with every running job gone."""
    snap = [n.copy() for n in nodes]
    placed = place(snap, job)
    if placed is not None:
        return now, placed, snap
    ends = sorted(running, key=lambda r: r.expected_end(now))
    for end, group in itertools.groupby(ends, key=lambda r: r.expected_end(now)):
        for r in group:
            release(snap, r)
        placed = place(snap, job)
        if placed is not None:
            return end, placed, snap
    return None


# ---- the order of the queue ---------------------------------------------------------

def dominant_share(usage: dict[str, float], totals: dict[str, float]) -> float:
    return max((usage.get(r, 0.0) / totals[r] for r in RESOURCES_FOR_SHARE if totals.get(r)), default=0.0)


_ORDER = operator.attrgetter("order_key")
_PRIORITY = operator.attrgetter("priority")


class Queue:
    """Queued jobs sorted once: priority level -> group -> jobs in submission order.
    A caller that keeps one between cycles while the queue does not change spares
    the policy a sort and a grouping pass over every job (``plan`` takes either)."""

    def __init__(self, jobs: Iterable[Job]):
        self.levels: dict[int, dict[str, list[Job]]] = {}
        ordered = sorted(jobs, key=_ORDER)
        self.size = len(ordered)
        for priority, level in itertools.groupby(ordered, key=_PRIORITY):
            members = list(level)
            if len({j.group for j in members}) == 1:
                self.levels[priority] = {members[0].group: members}
                continue
            groups: dict[str, list[Job]] = {}
            for j in members:
                groups.setdefault(j.group, []).append(j)
            self.levels[priority] = groups

    def __len__(self) -> int:
        return self.size

    def extend(self, jobs: list[Job]) -> bool:
        """Add jobs that go after every job of their (priority, group) already here, as
        new submissions do: no re-sort. False (nothing added) if one does not."""
        jobs = sorted(jobs, key=_ORDER)
        last: dict[tuple[int, str], tuple] = {}
        for j in jobs:
            members = self.levels.get(j.priority, {}).get(j.group)
            tail = last.get((j.priority, j.group)) or (members[-1].order_key if members else None)
            if tail is not None and j.order_key <= tail:
                return False
            last[(j.priority, j.group)] = j.order_key
        for j in jobs:
            self.levels.setdefault(j.priority, {}).setdefault(j.group, []).append(j)
        self.size += len(jobs)
        return True


class QueueOrder:
    """Iterates queued jobs: priority first; within a priority, groups by least
    share used (if fair share is on), each group in submission order. Call
    ``started(job)`` when a job is admitted so its group's usage grows."""

    def __init__(self, queued: "list[Job] | Queue", running: list[Job], totals: dict[str, float],
                 config: SchedulerPolicy):
        self.config = config
        self.totals = totals
        self.usage: dict[str, dict[str, float]] = {}
        for r in running:
            self._add(r)
        self.levels = (queued if isinstance(queued, Queue) else Queue(queued)).levels

    def _add(self, job: Job) -> None:
        u = self.usage.setdefault(job.group, {})
        for k, v in job.bundle.items():
            u[k] = u.get(k, 0.0) + v * job.count

    def share_used(self, group: str) -> float:
        if not self.config.fair_share:
            return 0.0
        weight = self.config.quota(group).share or 1.0
        return dominant_share(self.usage.get(group, {}), self.totals) / weight

    def started(self, job: Job) -> None:
        self._add(job)

    def __iter__(self) -> Iterator[Job]:
        for priority in sorted(self.levels, reverse=True):
            groups = self.levels[priority]
            heads = {g: 0 for g in groups}
            if len(groups) == 1:  # one group: plain submission order
                yield from next(iter(groups.values()))
                continue
            heap = [(self.share_used(g), jobs[0].seq, g) for g, jobs in groups.items()]
            heapq.heapify(heap)
            while heap:
                _, _, g = heapq.heappop(heap)
                jobs = groups[g]
                yield jobs[heads[g]]
                heads[g] += 1
                if heads[g] < len(jobs):
                    heapq.heappush(heap, (self.share_used(g), jobs[heads[g]].seq, g))


# ---- quotas ----------------------------------------------------------------------------

def quota_problem(job: Job, used_nodes: int, used_gpus: float, quota: QuotaSpec) -> Optional[str]:
    if quota.max_nodes is not None and used_nodes + job.count > quota.max_nodes:
        return (f"{group_label(job.group)} is at its quota: {used_nodes} of {quota.max_nodes} node(s) "
                f"in use, this job needs {job.count}")
    if quota.max_gpus is not None and job.gpus and used_gpus + job.gpus > quota.max_gpus + fit.EPS:
        return (f"{group_label(job.group)} is at its quota: {used_gpus:g} of {quota.max_gpus:g} GPU(s) "
                f"in use, this job needs {job.gpus:g}")
    return None


def never_admissible(job: Job, config: SchedulerPolicy) -> Optional[str]:
    """A job its group's quota can never allow (checked at submit)."""
    q = config.quota(job.group)
    if q.max_nodes is not None and job.count > q.max_nodes:
        return f"nodes: {job.count} is more than {group_label(job.group)}'s quota of {q.max_nodes} node(s)"
    if q.max_gpus is not None and job.gpus > q.max_gpus + fit.EPS:
        return f"resources.gpus: {job.gpus:g} GPUs in all is more than {group_label(job.group)}'s quota of {q.max_gpus:g}"
    return None


# ---- preemption ------------------------------------------------------------------------

def victims_for(head: Job, base: list[NodeView], candidates: list[Job],
                budget: int = VICTIM_SEARCH_BUDGET) -> Optional[list[Job]]:
    """The smallest set of ``candidates`` whose resources let ``head`` fit on
    ``base``: fewest jobs first; among equal sizes, lowest priority, then the most
    recently started (least work lost). None if no set helps."""
    cands = sorted(candidates, key=lambda r: (r.priority, -(r.started_at or 0.0), r.seq))

    def fits_without(victims: Iterable[Job]) -> bool:
        snap = [n.copy() for n in base]
        for v in victims:
            release(snap, v)
        return place(snap, head) is not None

    if not cands or not fits_without(cands):
        return None
    tried = 0
    for k in range(1, len(cands) + 1):
        for combo in itertools.combinations(cands, k):
            tried += 1
            if tried > budget:
                return _greedy_victims(cands, fits_without)
            if fits_without(combo):
                return list(combo)
    return None  # unreachable: the full set fits


def _greedy_victims(cands: list[Job], fits_without) -> list[Job]:
    chosen: list[Job] = []
    for c in cands:
        chosen.append(c)
        if fits_without(chosen):
            break
    for c in reversed(list(chosen)):  # drop any that turned out not to be needed
        rest = [x for x in chosen if x is not c]
        if rest and fits_without(rest):
            chosen = rest
    return chosen


# ---- the plan ------------------------------------------------------------------------------

def _fmt_time(t: float, now: float) -> str:
    d = t - now
    if d == math.inf:
        return "at an unknown time"
    if d < 90:
        return f"in {max(d, 0):.0f} s"
    if d < 5400:
        return f"in {d / 60:.0f} min"
    return f"in {d / 3600:.1f} h"


def plan(now: float, nodes: list[NodeView], running: list[Job], queued: "list[Job] | Queue",
         config: Optional[SchedulerPolicy] = None, settling: frozenset[str] = frozenset()) -> Plan:
    """Decide this cycle. ``nodes`` is the free/total snapshot with running jobs
    already subtracted; ``running`` are the admitted jobs (with ``nodes`` set).
    ``settling``: jobs whose preemption victims ended a moment ago, whose nodes the
    snapshot may not show free yet; they preempt no one else meanwhile."""
    config = config or SchedulerPolicy()
    out = Plan()
    free = [n.copy() for n in nodes if n.alive]
    running = list(running)
    totals: dict[str, float] = {}
    for n in free:
        for k, v in n.total.items():
            totals[k] = totals.get(k, 0.0) + v
    used_nodes: dict[str, int] = {}
    used_gpus: dict[str, float] = {}
    for r in running:
        used_nodes[r.group] = used_nodes.get(r.group, 0) + r.count
        used_gpus[r.group] = used_gpus.get(r.group, 0.0) + r.gpus

    order = QueueOrder(queued, running, totals, config)
    head: Optional[Job] = None
    reserved_at = math.inf
    reserved_free: Optional[list[NodeView]] = None  # free resources at the reservation
    reserved_nodes: set[str] = set()  # where the head's gang goes at its reservation
    failed: dict[int, str] = {}  # shapes that did not fit this cycle (free only shrinks)
    delays: dict[int, str] = {}  # shapes that would delay the head (until the next start)

    limited = config.limited_groups
    any_limited = DEFAULT_GROUP in limited  # the 'default' quota applies to every other experiment
    for job in order:
        if any_limited or job.group in limited:
            problem = quota_problem(job, used_nodes.get(job.group, 0), used_gpus.get(job.group, 0.0),
                                    config.quota(job.group))
            if problem:
                out.waiting[job.id] = problem
                continue
        if head is not None and not config.backfill:  # strict order: everything waits behind the head
            out.waiting[job.id] = f"behind {head.id} in the queue (backfill is off)"
            continue
        shape = job.shape
        ends_in_time = now + job.hold <= reserved_at < math.inf  # done before the head starts
        if head is not None and shape in delays and reserved_free is not None and not ends_in_time:
            out.waiting[job.id] = delays[shape]
            out.unfit.append(job)
            continue
        placed = None if shape in failed else place(free, job)
        if placed is None:
            if shape not in failed:
                failed[shape] = why_not(free, job)
            reason = failed[shape]
            out.unfit.append(job)
            if head is None:
                head = job
                reason, from_victims = _head(now, job, free, running, config, out, reason,
                                             job.id in settling)
                reserved_nodes = set(out.reservation.nodes)
                if from_victims:
                    out.unfit.remove(job)  # it gets its nodes from its victims: no new ones for it
                if out.reservation.at < math.inf:
                    reserved_at = out.reservation.at
                    reserved_free = _free_at(now, free, running, reserved_at)
                else:
                    # Its gang fits the live nodes only once resources we do not track are
                    # back (a job that just ended and whose placement group Ray has not
                    # removed yet, or other Ray work): no time is known, but a backfilled
                    # job still must not take the nodes it needs.
                    idle = [n.idle() for n in free]
                    if place(idle, job) is not None:
                        reserved_free = idle
            out.waiting[job.id] = reason
            continue
        if head is not None and reserved_free is not None and not ends_in_time:
            placed, later = _without_delaying(free, reserved_free, job, head, placed, reserved_nodes)
            if placed is None:  # wherever it fits now, it would still hold nodes the head needs then
                when = _fmt_time(reserved_at, now) if reserved_at < math.inf else "when they free up"
                delays[shape] = f"fits now, but would delay {head.id}, which has nodes reserved {when}"
                out.waiting[job.id] = delays[shape]
                out.unfit.append(job)
                continue
            reserved_free = later
        delays.clear()  # the free resources change: every shape must be checked again
        fit.reserve(free, placed, job.bundle)
        running.append(replace(job, started_at=now, nodes=tuple(placed)))
        order.started(job)
        used_nodes[job.group] = used_nodes.get(job.group, 0) + job.count
        used_gpus[job.group] = used_gpus.get(job.group, 0.0) + job.gpus
        out.start.append((job, placed))
    return out


def _without_delaying(free: list[NodeView], reserved_free: list[NodeView], job: Job, head: Job,
                      placed: list[str], reserved_nodes: set[str]
                      ) -> tuple[Optional[list[str]], Optional[list[NodeView]]]:
    """A placement for ``job`` now that still leaves the head its gang at its
    reservation (the job still running then): the best-fit one, else one that keeps
    off the nodes the head is to get. With the free resources at the reservation."""
    for candidate in (placed, _place_avoiding(free, job, reserved_nodes)):
        if candidate is None:
            continue
        later = [n.copy() for n in reserved_free]
        fit.reserve(later, candidate, job.bundle)
        if place(later, head) is not None:
            return candidate, later
    return None, None


def _place_avoiding(free: list[NodeView], job: Job, nodes: set[str]) -> Optional[list[str]]:
    if not nodes:
        return None
    return place([n for n in free if n.node_id not in nodes], job)


def _free_at(now: float, free: list[NodeView], running: list[Job], at: float) -> list[NodeView]:
    """Free resources at time ``at`` (every running job expected to end by then released)."""
    snap = [n.copy() for n in free]
    for r in running:
        if r.expected_end(now) <= at:
            release(snap, r)
    return snap


def _head(now: float, head: Job, free: list[NodeView], running: list[Job], config: SchedulerPolicy,
          out: Plan, reason: str, settling: bool = False) -> tuple[str, bool]:
    """The first job that does not fit: preempt for it, or reserve for it. Returns why
    it waits, and whether it is to get its nodes from preempted jobs."""
    from_victims = False
    if settling:
        reason = "waiting for the nodes of the jobs it preempted to show free"
        from_victims = True
    elif config.preemption:
        stopping = [r for r in running if r.stopping_until is not None]
        base = [n.copy() for n in free]
        for r in stopping:
            release(base, r)
        if stopping and place(base, head) is not None:
            ids = ", ".join(sorted(r.id for r in stopping))
            reason = f"waiting for {ids} to stop"
            from_victims = True
        else:
            cands = [r for r in running if r.stopping_until is None and r.preemptible
                     and r.priority < head.priority]
            victims = victims_for(head, base, cands)
            if victims:
                for v in victims:
                    v.stopping_until = now + v.grace
                    out.preempt.append((v, head))
                reason = (f"preempting {', '.join(v.id for v in victims)} (lower priority) to make room; "
                          f"starts when they have stopped")
                from_victims = True
    found = shadow(now, free, running, head)
    if found is None:
        out.reservation = Reservation(head.id, math.inf, [])
        return reason, from_victims
    at, nodes, _ = found
    out.reservation = Reservation(head.id, at, nodes)
    if at < math.inf and not from_victims:
        reason += f"; next in line, nodes reserved to start {_fmt_time(at, now)} at the latest"
    return reason, from_victims


def job_from_spec(job_id: str, seq: int, spec, **running) -> Job:
    """The policy's view of a ``JobSpec`` (``running``: started_at, nodes, stopping_until, avoid)."""
    return Job(
        id=job_id, priority=spec.priority_value, seq=seq, bundle=spec.resources.as_ray_bundle(),
        count=spec.nodes, strategy=spec.placement.strategy,
        group=group_of(spec.experiment, getattr(spec, "workspace", DEFAULT_WORKSPACE)),
        limit=spec.max_wall_clock, grace=spec.grace_period, preemptible=spec.preemptible,
        low_priority_nodes=spec.low_priority_nodes, prefer_low_priority=spec.prefer_low_priority, **running,
    )


def renews(slot: Job, reservation: Optional[Reservation], head: Optional[Job]) -> bool:
    """May a running slot's lease be renewed for another ``item_timeout``? Not when the
    head's reservation needs its nodes and the head comes first in the queue's order
    (then the slot drains: its task ends, no new one starts, and the head starts on time);
    a slot of the head's own array job always renews."""
    if reservation is None or head is None or not reservation.nodes or head.parent == slot.parent:
        return True
    if not set(reservation.nodes) & set(slot.nodes):
        return True
    return slot.order_key < head.order_key


def slot_id(parent: str, slot: int) -> str:
    return f"{parent}/s{slot}"


def slot_from_spec(parent: str, slot: int, seq: int, spec, **running) -> Job:
    """One slot of an array job or a sweep: a job of the unit's gang shape with the parent's
    priority, seq, experiment and preemptible flag, leased one unit timeout (``item_timeout``,
    ``trial_timeout``) at a time."""
    return replace(job_from_spec(slot_id(parent, slot), seq, spec, **running),
                   limit=spec.slots.unit_timeout, parent=parent, slot=slot)
