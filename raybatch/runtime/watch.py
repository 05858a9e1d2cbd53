"""Watching a started gang until its attempt ends, and the last upload after it.

``watch`` returns the attempt's ``Outcome``: the first rank to exit non-zero (or a lost
node behind it), a lost rank, a stop request (cancel, preemption, ``ray job stop``), a
stall or the wall-clock limit ends the attempt, and the other ranks get SIGTERM ->
grace -> SIGKILL. ``final_sync`` is every node's last upload of blob outputs,
checkpoints and logs, after the processes ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import ray
from ray.exceptions import RayActorError, RayError

from raybatch.node_health import NODE_HEALTH, detection_bounds_s
from raybatch.frameworks.base import Framework
from raybatch.runtime.gang import Gang, as_completed
from raybatch.runtime.launch import AttemptDirs
from raybatch.runtime.protocol import Outcome, Phase, RankReport
from raybatch.state.states import AttemptOutcome

FAILURE_STOP_GRACE_S = 10.0  # when one rank failed, the others get at most this
EXTERNAL_STOP_GRACE_S = 1.5  # stopped outside raybatch: Ray kills the driver after 3 s
# the gang is broken: survivors are usually stuck in a collective and never see the SIGTERM;
# one that can (independent ranks) has a second to write its checkpoint. Counted in the
# time to NODE_LOST (docs/node-loss.md)
NODE_LOST_GRACE_S = 1.0
STALL_CHECK_S = 2.0
# how often a running attempt looks at its control file, signals and wall clock; a rank's
# exit wakes it at once. Every wake-up takes CPU from ranks on the driver's node.
WAIT_TICK_S = 0.5
# after a rank failed: how much longer than the cluster's health checks take to declare a
# silent node dead to wait for Ray's verdict on the others (lost_rank_check_s); a GCS slowed
# by load is late, and the wait costs nothing when every rank answers
LOST_RANK_MARGIN_S = 5.0
SYNC_REPORT_S = 5.0          # the final upload reports this often (the server waits while it does)


def watch(gang: Gang, ranks: list[RankReport], framework: Framework, deadline: float,
          stop_request: Callable[[], Optional[Outcome]], lost_nodes: set[str],
          report: Callable[..., None], log: Callable[[str], None], timeout_reason: str = "") -> Outcome:
    """Block until the attempt ends; stop whatever is left running. Records each rank's
    exit code in ``ranks`` and the nodes of lost ranks in ``lost_nodes``.

    Ranks that run nothing themselves ("idle") are watched only for loss of their node.
    The attempt succeeds when every other rank has exited 0 or, for frameworks whose
    rank 0 decides (a TF chief, mpirun, a first-node command), when rank 0 has."""
    spec = gang.spec
    waits = {a.wait.remote(): i for i, a in enumerate(gang.actors)}
    idle = {r.rank for r in ranks if r.pid is None}
    running = set(range(len(gang.actors))) - idle
    waiting = set(range(len(gang.actors)))
    leader_ends = framework.ends_with_rank0(spec)
    outcome: Optional[Outcome] = None
    stopped = False  # the outcome is a stop from outside the ranks: a request, a stall, the clock
    grace = spec.grace_period
    next_stall_check = time.monotonic() + STALL_CHECK_S
    for done in as_completed(waits, WAIT_TICK_S):
        if done is not None:
            i = done.key
            waiting.discard(i)
            if isinstance(done.error, RayActorError):
                ranks[i].exit_code = None
                lost_nodes.add(ranks[i].node_id)
                outcome = outcome or lost_outcome(done.error, f"rank {i}", ranks[i].node_id)
                grace = min(grace, NODE_LOST_GRACE_S)
            elif done.error is not None:
                raise done.error
            elif i not in idle:
                code = done.value
                running.discard(i)
                ranks[i].exit_code = code
                if code != 0 and outcome is None:
                    # a process whose peer's node died usually fails before Ray reports the
                    # node lost (mpirun at once, collectives on a timeout): ask every rank
                    found = find_lost_ranks(gang, ranks, i)
                    lost = sorted(found)
                    for j in lost:
                        lost_nodes.add(ranks[j].node_id)
                    if lost:
                        first = found[lost[0]]
                        outcome = Outcome(first.kind, None, f"{first.message}; rank {i} exited with code {code} "
                                                            "after it")
                        grace = min(grace, NODE_LOST_GRACE_S)
                    else:
                        outcome = Outcome(AttemptOutcome.USER_ERROR, code, f"rank {i} exited with code {code}")
                        grace = min(grace, FAILURE_STOP_GRACE_S)
                elif i == 0 and leader_ends and outcome is None:
                    outcome = Outcome(AttemptOutcome.SUCCEEDED, 0, f"rank 0 ({ranks[0].role}) exited 0")
                    grace = min(grace, FAILURE_STOP_GRACE_S)
        if outcome is None and not running:
            outcome = Outcome(AttemptOutcome.SUCCEEDED, 0, f"all {len(gang.actors) - len(idle)} "
                              f"running rank(s) exited 0")
        if outcome is None and (stop := stop_request()) is not None:
            outcome, stopped = stop, True
            grace = stop.grace(grace)  # an eviction's notice may be shorter than the grace period
            if stop.kind is AttemptOutcome.DRIVER_LOST:
                # `ray job stop` SIGKILLs this driver 3 s after its SIGTERM: be quick, and
                # leave the rest to the ranks' watchdogs
                grace = min(grace, EXTERNAL_STOP_GRACE_S)
        if outcome is None and spec.stall_timeout and time.monotonic() > next_stall_check:
            next_stall_check = time.monotonic() + STALL_CHECK_S
            outcome = check_stall(gang, running, spec.stall_timeout)
            stopped = outcome is not None
        if outcome is None and time.monotonic() > deadline:
            outcome, stopped = Outcome(AttemptOutcome.TIMEOUT, None, timeout_reason or
                                       f"exceeded max_wall_clock ({spec.max_wall_clock:.0f} s)"), True
        if outcome is not None and waiting:
            if running:
                log(f"{outcome.message}; stopping {len(running)} other rank(s), grace {grace:.0f} s")
                report(Phase.STOPPING, reason=outcome.message)
            ended_alone = set()  # ranks that had exited before the signal
            for j, (code, signalled) in gang.terminate(grace, only=waiting).items():
                if code is not None:
                    ranks[j].exit_code = code
                if not signalled:
                    ended_alone.add(j)
            if stopped:
                outcome = finished_first(outcome, running, ended_alone, ranks, leader_ends)
            break
    if outcome is None:  # every rank's wait ended without a verdict: only idle ranks
        outcome = Outcome(AttemptOutcome.SUCCEEDED, 0, f"all {len(gang.actors)} ranks exited 0")
    return outcome


def finished_first(stop: Outcome, running: set[int], ended_alone: set[int], ranks: list[RankReport],
                   leader_ends: bool) -> Outcome:
    """The outcome of an attempt stopped from outside whose ranks had all exited 0 before
    the stop reached them (their exits were not yet seen): it succeeded, it was not stopped.
    Otherwise a task whose work was done and whose outputs are written would run again."""
    def clean(j: int) -> bool:
        return j in ended_alone and ranks[j].exit_code == 0
    if (leader_ends and 0 in running and clean(0)) or (running and all(clean(j) for j in running)):
        return Outcome(AttemptOutcome.SUCCEEDED, 0, f"the ranks had exited 0 before the stop ({stop.message})")
    return stop


def lost_rank_check_s() -> float:
    """How long to wait, after a rank failed, for Ray's verdict on the ranks that do not
    answer: as long as this cluster's node health checks take to declare a silent node
    dead, plus a margin (raybatch's settings: 3 s + 5 s; Ray's defaults: 65 s + 5 s).
    Healthy ranks answer in milliseconds: the wait is this long only while a node is silent.
    A driver's ``ray._raylet.Config`` holds the cluster's settings (its system config, or
    the head's environment the driver inherits)."""
    from ray._raylet import Config

    settings = {name: int(getattr(Config, name)()) for name in NODE_HEALTH}
    return detection_bounds_s(settings)[1] + LOST_RANK_MARGIN_S


def find_lost_ranks(gang: Gang, ranks: list[RankReport], failed: int) -> dict[int, Outcome]:
    """After rank ``failed`` exited non-zero: the ranks that are lost (it too, when the GCS
    has marked its node dead), each with how
    (NODE_LOST, or EVICTED for a node drained for preemption). Lost: its actor died with
    its node (Ray's verdict, ``Gang.find_lost``), or the GCS has marked its node dead (a
    verdict whose notice had not reached the actor's call yet)."""
    errors = gang.find_lost(exclude=failed, timeout_s=lost_rank_check_s())
    found = {j: lost_outcome(e, f"rank {j}", ranks[j].node_id) for j, e in errors.items()}
    # the failed rank's own node too: a process on a node whose raylet died may exit first
    others = {j: r.node_id for j, r in enumerate(ranks) if j not in found and r.node_id}
    dead = dead_nodes(set(others.values()))
    for j, node_id in others.items():
        if node_id in dead:
            found[j] = Outcome(AttemptOutcome.NODE_LOST, None,
                               f"rank {j} was lost (node {node_id[:12]}): the GCS marked its node dead")
    return dict(sorted(found.items()))


def dead_nodes(node_ids: set[str]) -> set[str]:
    """Those of ``node_ids`` the GCS has marked dead; none when it cannot say."""
    if not node_ids:
        return set()
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("NodeID") in node_ids and not n.get("Alive", True)}
    except Exception:  # noqa: BLE001 - the GCS did not answer: no verdict, the rank's exit stands
        return set()


def lost_outcome(error: RayActorError, who: str, node_id: Optional[str]) -> Outcome:
    """A rank's actor died with its node: EVICTED when Ray says the node was preempted
    (drained for preemption, then taken: ``ActorDiedError.preempted``), else NODE_LOST."""
    node = (node_id or "?")[:12]
    if getattr(error, "preempted", False):
        return Outcome(AttemptOutcome.EVICTED, None, f"{who} was lost: its node {node} was evicted "
                                                     "(drained for preemption, then taken)")
    return Outcome(AttemptOutcome.NODE_LOST, None, f"{who} was lost (node {node}): {type(error).__name__}")


def check_stall(gang: Gang, running: set[int], limit: float) -> Optional[Outcome]:
    """STALLED when every running rank has been silent for ``limit`` seconds."""
    refs = [gang.actors[i].idle_seconds.remote() for i in sorted(running)]
    try:
        idle = ray.get(refs, timeout=10)
    except (RayError, TimeoutError):
        return None  # a lost rank is reported by its wait()
    if idle and min(idle) > limit:
        return Outcome(AttemptOutcome.STALLED, None,
                       f"no rank printed anything for {min(idle):.0f} s (stall_timeout {limit:g} s)")
    return None


@dataclass
class SyncResult:
    unsynced: list[str] = field(default_factory=list)  # what is not out (and its size)
    kept: list[str] = field(default_factory=list)      # host:dir of the local copies left behind
    errors: list[str] = field(default_factory=list)

    @property
    def message(self) -> Optional[str]:
        """What is not out, why, and where the copies are; None when everything is."""
        if not self.unsynced:
            return None
        n = len(self.unsynced)
        shown = ", ".join(self.unsynced[:5]) + (f" and {n - 5} more" if n > 5 else "")
        return (f"{n} file(s) not uploaded: {shown}; cause: {self.errors[0] if self.errors else 'unknown'}; "
                f"the local copies are kept at {', '.join(sorted(set(self.kept)))}")


def final_sync(gang: Gang, ranks: list[RankReport], dirs: AttemptDirs, lost_nodes: set[str], timeout_s: float,
               report: Callable[..., None], log: Callable[[str], None]) -> SyncResult:
    """Every node's last upload, after its processes ended."""
    refs = {a.finish_sync.remote(timeout_s): i for i, a in enumerate(gang.actors)}
    log(f"uploading the last outputs, checkpoints and logs (up to {timeout_s:.0f} s)")
    result = SyncResult()
    waiting = set(refs.values())
    for done in as_completed(refs, SYNC_REPORT_S):
        if done is None:
            report(Phase.SYNCING, nodes_left=len(waiting))  # the server waits while we do
            continue
        i = done.key
        waiting.discard(i)
        node_rank = ranks[i].node_rank
        if done.error is not None:
            if ranks[i].node_id in lost_nodes:
                continue  # a lost node: what it had not uploaded is gone with it
            # the actor died on a live node: its files may still be there, not out
            result.unsynced.append(f"everything node {node_rank} had not uploaded yet")
            result.kept.append(f"{ranks[i].hostname or '?'}:{dirs.node_mirror(node_rank)}")
            result.errors.append(f"its final upload did not run: {type(done.error).__name__}")
            continue
        if done.value["unsynced"]:
            result.unsynced.extend(done.value["unsynced"])
            result.kept.append(f"{done.value['hostname']}:{dirs.node_mirror(node_rank)}")
            if done.value["error"]:
                result.errors.append(done.value["error"])
    return result
