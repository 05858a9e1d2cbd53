"""Autoscaling driven by the queue (Batch AI's autoScale, on Ray's autoscaler).

The scheduler knows what the queue needs; Ray's autoscaler knows how to launch
nodes. Given the autoscaler's cluster YAML (its ``available_node_types``), each
cycle:

1. builds the largest cluster the autoscaler may make: the live nodes plus, per
   node type, the workers it may still add (``max_workers``, and the cluster's
   global ``max_workers``);
2. places the waiting jobs, in queue order, on the live nodes' free resources
   and then on those hypothetical new nodes, gang by gang, exactly as the policy
   would; the new nodes that received a bundle are the nodes to add;
3. asks the autoscaler for them through the GCS (``request_cluster_resources``):
   the request is a cluster shape, so it lists every live node's capacity plus
   one whole-node bundle per node to add. Whole-node bundles keep a spread gang
   on distinct nodes, which bundles of the job's size would not.

When no waiting job needs a new node, the request is withdrawn (an empty
request) and Ray's idle timeout removes the nodes that are no longer used.
A job that does not fit even the largest cluster is rejected at submit.

Spot (low-priority) types (``fit.is_spot_type``; their new nodes are told apart by their marks,
``fit.is_low_priority``): a job with
``low_priority_nodes: allow`` gets new dedicated nodes when they can hold it, spot ones
only when they cannot (or the job sets ``prefer_low_priority``: then the other way round).
A spot type whose launch failed (``launches.launch_failures``: no capacity, quota) is
left out of the plan for ``SPOT_BACKOFF_S`` after that failure.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from raybatch.scheduler import fit
from raybatch.scheduler.cluster import GCS_TIMEOUT_S, gcs_client
from raybatch.scheduler.fit import NodeView
from raybatch.scheduler.launches import LaunchFailure, launch_failures
from raybatch.scheduler.policy import Job, place, why_not

log = logging.getLogger("raybatch.autoscale")

NEW_PREFIX = "~new:"  # ids of the hypothetical nodes the autoscaler could add
SPOT_BACKOFF_S = 600.0  # a spot type is not planned for this long after a failed launch
FAILURES_EVERY_S = 5.0  # the autoscaler's launch failures are read at most this often

# Resources Ray adds by itself, which a request must not name.
_IMPLICIT = ("node:", "object_store_memory")


def _requestable(resources: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items()
            if v > 0 and not k.startswith(_IMPLICIT) and k != "memory"}


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    max_workers: int = 0
    spot: bool = False  # fit.is_spot_type of its config


@dataclass
class NodeTypes:
    """The node types of a Ray autoscaler cluster config, and its worker limits."""

    types: dict[str, NodeType]
    head_type: Optional[str] = None
    max_workers: Optional[int] = None  # all worker types together

    @classmethod
    def from_cluster_yaml(cls, path: Path) -> "NodeTypes":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_config(data, source=str(path))

    @classmethod
    def from_config(cls, data: dict[str, Any], source: str = "cluster config") -> "NodeTypes":
        available = data.get("available_node_types")
        if not isinstance(available, dict) or not available:
            raise ValueError(f"{source}: available_node_types: required, a mapping of node types")
        types = {}
        for name, t in available.items():
            resources = (t or {}).get("resources")
            if not isinstance(resources, dict) or not resources:
                raise ValueError(f"{source}: available_node_types.{name}.resources: required so that "
                                 "raybatch knows what a new node of this type holds (e.g. {CPU: 4, GPU: 1})")
            types[name] = NodeType(name, {k: float(v) for k, v in resources.items()},
                                   {str(k): str(v) for k, v in ((t.get("labels") or {}).items())},
                                   int(t.get("max_workers", 0) or 0), fit.is_spot_type(t))
        head = data.get("head_node_type")
        return cls(types, head, data.get("max_workers"))

    def largest(self, nodes: list[NodeView]) -> tuple[list[NodeView], list[NodeView], Optional[int]]:
        """(live nodes, hypothetical new nodes, how many of those may be added at most)
        for the largest cluster reachable from now. Each type offers up to its own
        ``max_workers``; the cluster-wide ``max_workers`` is the third value."""
        live = [n for n in nodes if n.alive]
        count: dict[str, int] = {}
        for n in live:
            if n.node_type:
                count[n.node_type] = count.get(n.node_type, 0) + 1
        workers = sum(c for t, c in count.items() if t != self.head_type)
        room = None if self.max_workers is None else max(0, int(self.max_workers) - workers)
        new: list[NodeView] = []
        for t in self.types.values():
            for k in range(max(0, t.max_workers - count.get(t.name, 0))):
                res = dict(t.resources)
                # "~" sorts after Ray's hex node ids: on a tie, best fit takes a live node
                new.append(NodeView(f"{NEW_PREFIX}{t.name}:{k}", available=dict(res), total=res,
                                    labels=dict(t.labels), node_type=t.name))
        return live, new, room


def preferred_pools(pool: list[NodeView], job: Job) -> list[list[NodeView]]:
    """The node sets to place a waiting job on, in order of preference (they share the
    pool's nodes). Live nodes are always in; of the new nodes, an ``allow`` job tries the
    dedicated ones first (spot first with ``prefer_low_priority``), then the other class,
    then both (a gang with one spot node is as likely to be evicted as one of spot nodes
    only). ``require``/``avoid`` jobs are kept to their class by ``place`` itself."""
    if job.low_priority_nodes != "allow":
        return [pool]
    out = []
    for spot in (job.prefer_low_priority, not job.prefer_low_priority):
        only = [n for n in pool if not n.node_id.startswith(NEW_PREFIX) or fit.is_low_priority(n) == spot]
        if len(only) < len(pool):
            out.append(only)
    return out + [pool]


def failures_via_gcs(gcs_address: str) -> Callable[[], list[LaunchFailure]]:
    """The autoscaler's launch failures, read from the GCS (``launches.launch_failures``)."""
    gcs = gcs_client(gcs_address)
    return lambda: launch_failures(gcs, gcs_address)


def request_via_gcs(gcs_address: str) -> Callable[[list[dict[str, float]]], None]:
    """Send a cluster-shape request to Ray's autoscaler, without ``ray.init``.

    Ray 2.60 has two autoscalers that read demand from different places, each
    ignoring the other's: v2 a GCS resource constraint, v1 (the default of
    ``ray start``) an internal-KV key. Both are written; the request is a single
    slot, so each write replaces the previous one (a user's own
    ``request_resources`` would replace ours too, until our next change)."""
    gcs = gcs_client(gcs_address)
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL  # noqa: PLC0415
    from ray.autoscaler.v2.sdk import request_cluster_resources  # noqa: PLC0415

    def send(bundles: list[dict[str, float]]) -> None:
        request_cluster_resources(gcs_address, [{"resources": b} for b in bundles], timeout=GCS_TIMEOUT_S)
        gcs.internal_kv_put(AUTOSCALER_RESOURCE_REQUEST_CHANNEL, json.dumps(bundles).encode(), True, None,
                            timeout=GCS_TIMEOUT_S)

    return send


class Demand:
    """Keeps the autoscaler's request in step with what the queue needs."""

    def __init__(self, types: NodeTypes, gcs_address: Optional[str] = None,
                 send: Optional[Callable[[list[dict[str, float]]], None]] = None,
                 failures: Optional[Callable[[], list[LaunchFailure]]] = None):
        """``failures``: the autoscaler's recent failed launches (default: read from the
        GCS at ``gcs_address``; none without one)."""
        self.types = types
        self._send = send or request_via_gcs(gcs_address or "")
        self._failures = failures or (failures_via_gcs(gcs_address) if gcs_address else None)
        self._failures_at = -FAILURES_EVERY_S
        self.backed_off: dict[str, float] = {}                   # spot type -> skipped until (epoch s)
        self.requested: Optional[list[dict[str, float]]] = None  # last request sent
        self.to_add: dict[str, int] = {}                         # node type -> nodes asked for
        self.for_jobs: list[str] = []
        self.updated_at: Optional[float] = None
        self.error: Optional[str] = None

    def refresh_backoff(self, now: Optional[float] = None) -> dict[str, float]:
        """Spot types whose launch failed in the last SPOT_BACKOFF_S -> until when they are
        skipped (read from the autoscaler at most every FAILURES_EVERY_S)."""
        now = time.time() if now is None else now
        if self._failures is not None and time.monotonic() - self._failures_at >= FAILURES_EVERY_S:
            self._failures_at = time.monotonic()
            try:
                failures = self._failures()
            except Exception as e:  # noqa: BLE001 - keep the last known back-offs
                log.warning("reading the autoscaler's launch failures failed: %s", e)
                failures = []
            for f in failures:
                t, until = self.types.types.get(f.node_type), f.at + SPOT_BACKOFF_S
                if t is None or not t.spot or until <= max(now, self.backed_off.get(t.name, 0.0)):
                    continue
                if t.name not in self.backed_off:
                    log.info("spot type %s: a launch failed (%s: %s); not planned for %.0f s", t.name,
                             f.category, f.message, until - now)
                self.backed_off[t.name] = until
        self.backed_off = {k: v for k, v in self.backed_off.items() if v > now}
        return self.backed_off

    def plan(self, nodes: list[NodeView], unfit: list[Job]) -> tuple[dict[str, int], list[str]]:
        """Which new nodes (per type) the waiting jobs need, and which jobs they are for."""
        live, new, room = self.types.largest(nodes)
        skipped = self.refresh_backoff()
        new = [n for n in new if n.node_type not in skipped]
        pool = [n.copy() for n in live] + [n.copy() for n in new]
        used: set[str] = set()
        jobs: list[str] = []
        for job in unfit:
            placed = None
            for candidates in preferred_pools(pool, job):
                placed = place(candidates, job)
                if placed is not None:
                    break
            if placed is None:
                continue  # does not fit even there: it waits for running jobs instead
            fresh = {p for p in placed if p.startswith(NEW_PREFIX)}
            if room is not None and len(used | fresh) > room:
                continue  # over the cluster's max_workers
            fit.reserve(pool, placed, job.bundle)
            if fresh:
                used |= fresh
                jobs.append(job.id)
        to_add: dict[str, int] = {}
        for n in new:
            if n.node_id in used:
                to_add[n.node_type] = to_add.get(n.node_type, 0) + 1
        return to_add, jobs

    def update(self, nodes: list[NodeView], unfit: list[Job], starting: bool = False) -> None:
        """``starting``: some admitted gangs are not placed yet. Their nodes look idle
        to the autoscaler until the placement group lands, so the live nodes are kept
        (requested) until then instead of withdrawing."""
        to_add, jobs = self.plan(nodes, unfit) if unfit else ({}, [])
        bundles = []  # no request: idle nodes may go
        if to_add or starting:
            bundles = [_requestable(n.total) for n in nodes if n.alive]
            for t, k in sorted(to_add.items()):
                bundles += [_requestable(self.types.types[t].resources) for _ in range(k)]
            bundles = [b for b in bundles if b]
        self.to_add, self.for_jobs = to_add, jobs
        if bundles == self.requested:
            return
        try:
            self._send(bundles)
        except Exception as e:  # noqa: BLE001 - the GCS may be briefly unreachable; retried next cycle
            self.error = f"{type(e).__name__}: {e}"
            log.warning("autoscaler request failed: %s", self.error)
            return
        self.error = None
        self.requested, self.updated_at = bundles, time.time()
        if to_add:
            log.info("asked the autoscaler for %s for %s", to_add, ", ".join(jobs))
        elif bundles:
            log.info("keeping the live nodes while admitted gangs are placed")
        else:
            log.info("withdrew the autoscaler request")

    def never_fits(self, job: Job, nodes: list[NodeView]) -> Optional[str]:
        """Why ``job`` cannot fit even the largest cluster (all of it idle), or None."""
        live, new, room = self.types.largest(nodes)
        idle = [n.idle() for n in live] + new
        placed = place(idle, job)
        if placed is not None and (room is None or sum(p.startswith(NEW_PREFIX) for p in placed) <= room):
            return None
        limit = len(live) + (len(new) if room is None else min(room, len(new)))
        return (why_not(idle, job).replace("free now", "in the largest cluster")
                + f" (at most {limit} nodes: the {len(live)} live ones plus what the autoscaler's "
                  "max_workers allow)")

    def info(self) -> dict[str, Any]:
        if not self.to_add and self.requested:
            summary = "keeping the live nodes until admitted gangs are placed"
        elif self.to_add:
            summary = (f"asked for {', '.join(f'{k} x {t}' for t, k in sorted(self.to_add.items()))} "
                       f"for {', '.join(self.for_jobs)}")
        else:
            summary = "no request: the queue needs no new node"
        if self.error:
            summary += f" (last request failed: {self.error})"
        if self.backed_off:
            summary += "; not planning spot type(s) after a failed launch: " + ", ".join(
                f"{t} until {time.strftime('%H:%M:%S', time.localtime(u))}" for t, u in sorted(self.backed_off.items()))
        return {"to_add": self.to_add, "for_jobs": self.for_jobs, "requested_bundles": self.requested,
                "updated_at": self.updated_at, "error": self.error, "summary": summary,
                "spot_backed_off": dict(self.backed_off),
                "node_types": {t.name: {"resources": t.resources, "max_workers": t.max_workers}
                               for t in self.types.types.values()}}
