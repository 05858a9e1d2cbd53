"""One gang on Ray: a placement group of one bundle per node and one ``RankActor`` per
process, and the few calls every user of a gang makes (who is on which node, stop
them all, is one of them lost?). Also ``as_completed``, the one way the runtime waits
on a set of Ray calls.

Bundle k is node rank k; rank r runs in bundle ``r // processes_per_node``. With the
scheduler's placement (``pinned``), bundle k goes on exactly that node."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Optional, TypeVar

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raybatch.runtime import environment
from raybatch.runtime.protocol import SpawnError
from raybatch.runtime.rank import RankActor
from raybatch.spec.job import JobSpec

if TYPE_CHECKING:
    from raybatch.runtime.launch import RankLaunch

K = TypeVar("K")


@dataclass
class Done(Generic[K]):
    """One finished call: its key, and its value or the error ``ray.get`` raised."""

    key: K
    value: Any = None
    error: Optional[RayError] = None


def as_completed(refs: dict[Any, K], tick: float) -> Iterator[Optional[Done[K]]]:
    """Each call's result as soon as it is ready (every call that is ready then, at
    once), and None after each round while calls are still pending: at least every
    ``tick`` seconds, the caller's moment to check for a stop or report progress. The
    caller may stop iterating at any time."""
    pending = dict(refs)
    while pending:
        ready, rest = ray.wait(list(pending), num_returns=1, timeout=tick)
        if ready and rest:  # whatever else is ready too, without waiting
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready = [*ready, *more]
        for ref in ready:
            key = pending.pop(ref)
            try:
                yield Done(key, ray.get(ref))
            except RayError as e:
                yield Done(key, error=e)
        if pending:
            yield None


def cause_of(error: RayError) -> BaseException:
    """The exception raised inside an actor call, not Ray's wrapper of it."""
    return getattr(error, "cause", None) or error


class Gang:
    def __init__(self, spec: JobSpec, name: str, pinned: Optional[list[str]] = None,
                 log: Callable[[str], None] = print, secrets: Optional[dict[str, str]] = None):
        self.spec = spec
        # the job's secrets: each process's environment gets them from its actor (never a runtime_env)
        self.secrets = dict(secrets or {})
        self.name = name
        self.pinned = list(pinned or [])
        self.log = log
        self.P = spec.processes_per_node
        self.pg = None
        self.actors: list[Any] = []

    # ---- shape ------------------------------------------------------------------------
    def node_rank(self, rank: int) -> int:
        return rank // self.P

    def first_actors(self) -> dict[int, Any]:
        """Node rank -> its first rank's actor: the one that does a node's work once."""
        return {k: self.actors[k * self.P] for k in range(self.spec.nodes)}

    def per_rank_resources(self) -> dict[str, float]:
        bundle = self.spec.resources.as_ray_bundle()
        return {k: v / self.P for k, v in bundle.items()}

    # ---- life ---------------------------------------------------------------------------
    def reserve(self, timeout_s: float, stopped: Callable[[], bool]) -> Optional[str]:
        """Create the placement group (pinned bundles when the scheduler chose the nodes)
        and the rank actors, and wait until the group is placed. A problem in words, or
        None; "stopped" when ``stopped()`` turned true first."""
        spec = self.spec
        bundle = spec.resources.as_ray_bundle()
        strategy = "STRICT_SPREAD" if spec.placement.strategy == "spread" else "PACK"
        selector = None
        if len(self.pinned) == spec.nodes:
            # the scheduler's placement, bundle i on node i: its reservations, preemptions
            # and the nodes it avoids (where an earlier attempt lost a rank) hold exactly
            selector = [{"ray.io/node-id": node_id} for node_id in self.pinned]
            self.log(f"gang pinned to node(s) {', '.join(n[:12] for n in self.pinned)}")
        self.pg = placement_group([dict(bundle) for _ in range(spec.nodes)], strategy=strategy,
                                  name=self.name, bundle_label_selector=selector)
        ready = self.pg.ready()
        # Rank actors are created now: their worker processes start the moment the
        # bundles are placed, instead of after we have seen the placement.
        self._create_actors()
        deadline = time.monotonic() + timeout_s
        while not stopped():
            done, _ = ray.wait([ready], timeout=0.2)
            if done:
                return None
            if time.monotonic() > deadline:
                return (f"the placement group ({spec.nodes} x {bundle}, {strategy}) was not placed "
                        f"within {timeout_s:.0f} s")
        return "stopped while reserving the placement group"

    def placement(self) -> Any:
        return placement_group_table(self.pg).get("bundles_to_node_id")

    def _create_actors(self) -> None:
        per_rank = self.per_rank_resources()
        custom = {k: v for k, v in per_rank.items() if k not in ("CPU", "GPU", "memory")}
        renv = environment.runtime_env(self.spec)
        for node_rank in range(self.spec.nodes):
            for _local_rank in range(self.P):
                opts: dict[str, Any] = {
                    "num_cpus": per_rank["CPU"],
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=node_rank),
                }
                if "GPU" in per_rank:
                    opts["num_gpus"] = per_rank["GPU"]
                if "memory" in per_rank:
                    opts["memory"] = per_rank["memory"]
                if custom:
                    opts["resources"] = custom
                if renv:  # packages / image: built by Ray on each node (cached per list)
                    opts["runtime_env"] = renv
                self.actors.append(RankActor.options(**opts).remote())

    def node_infos(self) -> list[dict[str, Any]]:
        """Each rank's node id, ip and host name (the actors are up once this returns)."""
        return ray.get([a.node_info.remote() for a in self.actors])

    def start_syncs(self, launches: list["RankLaunch"], interval: float) -> None:
        """Each rank's upload of its logs (and its node's outputs and checkpoints) while it runs."""
        ray.get([self.actors[x.rank].start_sync.remote(x.sync_dirs, x.sync_logs, interval)
                 for x in launches if x.sync_dirs or x.sync_logs])

    def start(self, launches: list["RankLaunch"]) -> dict[int, Optional[int]]:
        """Every rank's process (a rank with nothing to run holds its share of the node);
        rank -> its pid."""
        starts, spawn = {}, None
        for x in launches:
            actor = self.actors[x.rank]
            if x.argv is None:
                starts[x.rank] = actor.hold.remote(x.make_dirs, x.files)
            else:
                starts[x.rank] = actor.start.remote(x.argv, x.env, x.cwd, x.log_dir, x.make_dirs,
                                                    self.spec.grace_period, x.files, x.metrics,
                                                    self.secrets or None)
        pids = {}
        for rank, ref in starts.items():  # every start answers, so none is left half done
            try:
                pids[rank] = ray.get(ref)
            except RayTaskError as e:
                if not isinstance(cause_of(e), SpawnError):
                    raise
                spawn = spawn or SpawnError(f"rank {rank}: {cause_of(e)}")
        if spawn is not None:
            raise spawn
        return pids

    def terminate(self, grace: float, only: Optional[set[int]] = None) -> dict[int, tuple[Optional[int], bool]]:
        """SIGTERM -> ``grace`` -> SIGKILL to the ranks' process groups (``only`` these
        ranks); rank -> (the exit code of what it stopped, whether it still ran when
        signalled), for those that answered."""
        refs = {a.terminate.remote(grace): i for i, a in enumerate(self.actors) if only is None or i in only}
        codes = {}
        for ref, i in refs.items():
            try:
                codes[i] = ray.get(ref, timeout=grace + 30)
            except (RayError, TimeoutError):
                pass
        return codes

    def find_lost(self, exclude: int, timeout_s: float) -> dict[int, RayActorError]:
        """Ranks whose actor is gone (its node lost), and Ray's error for each (its
        ``preempted`` tells an eviction). Healthy actors answer in milliseconds; a dead one
        within Ray's node-failure detection, waited for up to ``timeout_s``."""
        refs = {self.actors[j].node_info.remote(): j for j in range(len(self.actors)) if j != exclude}
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        lost = {}
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as e:
                lost[refs[ref]] = e
        return dict(sorted(lost.items()))

    def kill_actors(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass

    def release(self) -> None:
        """Kill the actors and remove the placement group (the gang's resources are back)."""
        self.kill_actors()
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
