"""Spot evictions with notice: stop the gangs on a node before the cloud takes it.

On Azure a Spot VM gets a ``Preempt`` scheduled event at least 30 s before it is
evicted; ``raybatch spot-watch`` on the node turns it into a Ray drain
(``GcsClient.drain_node(node, DRAIN_NODE_REASON_PREEMPTION, msg, deadline)``). Any other
tool that drains nodes for preemption (``ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION``, a cloud integration) works the same way.

Each scheduler cycle (a hook of ``loop.Scheduler``):

1. the draining nodes and their deadlines (``GcsClient.get_draining_nodes``);
2. every running attempt with a bundle on one gets the control action ``evict`` with
   the deadline: its driver SIGTERMs the ranks with grace = min(grace_period, time
   left), syncs outputs and checkpoints as after a preemption, and the attempt ends
   EVICTED; the job goes back to the queue at its place (``retries.evictions``);
3. an array job's or a sweep's slot on such a node is revoked at once (its unit gets the
   same SIGTERM and grace, and reruns free elsewhere, like a preempted one).

Each attempt (each slot) is told once per node; an eviction that failed (the store or the
driver's control file could not be written) is tried again next cycle, and does not keep
the cycle's other evictions from being made. Ray 2.60 does not say why a live node
drains (``get_draining_nodes`` gives node -> deadline only; the reason is recorded in the
node's ``death_info`` once it is dead). A drain for idle termination (the v2
autoscaler's) is refused for a node that holds work, so a draining node under a running
gang was drained for preemption (or by an operator): its gangs are evicted.

A node can also die before a cycle saw it drain. An attempt that ended NODE_LOST is an
eviction too when one of its lost nodes was seen draining, or died with the death reason
``AUTOSCALER_DRAIN_PREEMPTED`` (Ray's verdict for a node drained for preemption and gone
after its deadline); the driver itself reports EVICTED when a rank's actor died with
``ActorDiedError.preempted``. Loss without notice stays NODE_LOST."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

if TYPE_CHECKING:
    from raybatch.scheduler.loop import Scheduler

log = logging.getLogger("raybatch.evictions")

PREEMPTED_DEATH = "AUTOSCALER_DRAIN_PREEMPTED"  # NodeDeathInfo.Reason: drained for preemption, then gone
SEEN_FOR_S = 3600.0  # how long a node seen draining is remembered (to label a later loss)


@dataclass(frozen=True)
class Running:
    """A gang of a running attempt: the whole attempt (``slot`` None) or one slot."""

    job_id: str
    attempt: int
    nodes: tuple[str, ...]
    grace: float                 # the job's grace_period
    slot: Optional[int] = None


@dataclass(frozen=True)
class Eviction:
    """Stop this gang now: ``node`` is draining and goes at ``deadline`` (None: unknown)."""

    gang: Running
    node: str
    deadline: Optional[float]

    @property
    def key(self) -> tuple:
        return self.gang.job_id, self.gang.attempt, self.gang.slot, self.node

    def reason(self, now: float) -> str:
        left = f"; it goes in {max(0.0, self.deadline - now):.0f} s" if self.deadline is not None else ""
        return f"evicted: spot node {self.node[:12]} is being taken back (drained for preemption{left})"


def decide(gangs: Iterable[Running], draining: dict[str, Optional[float]], told: set[tuple]) -> list[Eviction]:
    """The gangs to evict now: those with a bundle on a draining node that were not told
    yet (one eviction per gang, for its first draining node)."""
    out = []
    for gang in gangs:
        for node in gang.nodes:
            if node in draining:
                ev = Eviction(gang, node, draining[node])
                if not any(k[:3] == ev.key[:3] for k in told):
                    out.append(ev)
                break
    return out


def gangs_of(active: list[dict[str, Any]], spec_of: Callable[[dict[str, Any]], Any]) -> list[Running]:
    """The running gangs of the scheduler's active jobs (rows with ``_attempt`` and, for
    jobs on slots, ``_slots``, as ``Scheduler.reconcile`` leaves them)."""
    out = []
    for job in active:
        if job.get("cancel_requested") or job.get("preempt_requested"):
            continue  # already being stopped
        spec = spec_of(job)
        if spec.slots is not None:  # a slot already preempted is stopping: the others run
            out += [Running(job["id"], job["attempt"], tuple(s["nodes"]), spec.grace_period, s["slot"])
                    for s in job.get("_slots", []) if not s.get("preempted_by")]
        elif (job.get("_attempt") or {}).get("nodes"):
            out.append(Running(job["id"], job["attempt"], tuple(job["_attempt"]["nodes"]), spec.grace_period))
    return out


class Evictions:
    """The scheduler's eviction hook; ``cluster`` has ``draining()`` and ``death_reasons()``
    (``RayClusterView``)."""

    def __init__(self, cluster: Any):
        self.cluster = cluster
        self.told: set[tuple] = set()          # Eviction.key of every gang told to stop
        self.seen: dict[str, float] = {}       # node -> when it was first seen draining
        self.error: Optional[str] = None

    def __call__(self, sched: "Scheduler") -> None:
        if not sched._active:
            self.error = None  # nothing to evict: an earlier failure no longer matters
            return
        try:
            draining = self.cluster.draining()
        except Exception as e:  # noqa: BLE001 - the GCS may be briefly unreachable: next cycle
            self.error = f"{type(e).__name__}: {e}"
            log.warning("reading the draining nodes failed: %s", self.error)
            return
        self.error = None
        now = time.time()
        for node in draining:
            self.seen.setdefault(node, now)
        self.seen = {n: t for n, t in self.seen.items() if now - t < SEEN_FOR_S}
        if not draining:
            return
        failed = []
        for ev in decide(gangs_of(sched._active, sched.spec_of), draining, self.told):
            try:
                self.evict(sched, ev, now)
            except Exception as e:  # noqa: BLE001 - the others are still evicted; this one next cycle
                failed.append(f"{ev.gang.job_id}: {type(e).__name__}: {e}")
                log.warning("evicting %s attempt %d%s failed (retried next cycle): %s: %s", ev.gang.job_id,
                            ev.gang.attempt, "" if ev.gang.slot is None else f" slot {ev.gang.slot}",
                            type(e).__name__, e)
                continue
            self.told.add(ev.key)  # told once it was told: a failed eviction is tried again
        if failed:
            self.error = "evicting failed: " + "; ".join(failed)

    def evict(self, sched: "Scheduler", ev: Eviction, now: float) -> None:
        g, reason = ev.gang, ev.reason(now)
        log.info("%s attempt %d%s: %s", g.job_id, g.attempt, "" if g.slot is None else f" slot {g.slot}", reason)
        if g.slot is None:
            sched.launcher.request_stop(g.job_id, g.attempt, "evict", reason, deadline=ev.deadline)
        else:
            sched.store.revoke_slot(g.job_id, g.attempt, g.slot, reason, preempted_by="eviction")
            try:
                sched.launcher.revoke_slot(g.job_id, g.attempt, g.slot, reason, preempt=True,
                                           evict_by=ev.deadline or now + g.grace)
            except Exception:
                # the store has it revoked, so this slot is not evicted again: the loop's slot
                # sync writes the revocation to the driver's control file next cycle instead
                sched._control_synced.discard((g.job_id, g.attempt))
                raise

    def forget(self, job_id: str, attempt: int) -> None:
        self.told = {k for k in self.told if k[:2] != (job_id, attempt)}

    def with_notice(self, lost_nodes: list[str]) -> Optional[str]:
        """Was a lost node evicted with notice? Why, in words; None for a loss without one."""
        noticed = [n for n in lost_nodes if n in self.seen]
        if noticed:
            return f"node {noticed[0][:12]} was drained for preemption before it was lost"
        try:
            reasons = self.cluster.death_reasons(list(lost_nodes)) if lost_nodes else {}
        except Exception as e:  # noqa: BLE001
            log.warning("reading the lost nodes' death reasons failed: %s", e)
            return None
        preempted = [n for n, r in reasons.items() if r == PREEMPTED_DEATH]
        if preempted:
            return f"node {preempted[0][:12]} died {PREEMPTED_DEATH}"
        return None
