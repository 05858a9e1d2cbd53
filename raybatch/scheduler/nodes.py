"""Node records: what each node of the cluster is doing, since when and why (Batch AI's
node states), kept in the store's ``nodes`` table for ``raybatch cluster status|nodes``.

Each scheduler cycle (at most every ``READ_EVERY_S``) the recorder reads, from the GCS:

- every node Ray knows, alive or dead (``GcsClient.get_all_node_info``: type, address,
  death reason),
- the autoscaler's view (``get_cluster_resource_state``: RUNNING / IDLE / DRAINING),
- the nodes being drained and their deadlines (``GcsClient.get_draining_nodes``),
- the v1 autoscaler's report in the ``__autoscaling_status`` internal-KV key
  (``launches.autoscaler_report``): machines it is still setting up (they have no Ray node
  id yet: recorded as ``ip:<address>``) and those whose set-up failed (Ray's
  ``update-failed`` status),

and turns them into one state per node:

=========== ================================================================================
preparing   launched, its setup commands or ``ray start`` are still running
idle        in the cluster, nothing placed on it
running     something is placed on it (a gang, a slot)
unusable    its set-up failed (``update-failed``); the autoscaler replaces it
leaving     being drained (idle removal, or a spot eviction notice)
preempted   gone: drained for a preemption (``AUTOSCALER_DRAIN_PREEMPTED``, a spot eviction)
terminated  gone: removed by the autoscaler or stopped on purpose
lost        gone without notice (raylet died, VM vanished)
=========== ================================================================================

Writes are cheap: a row changes only when its state, reason or type changes, and
``last_seen`` is refreshed at most every ``TOUCH_EVERY_S``. When a node leaves the idle or
running state (or ends), the time it spent there is added to its ``idle_s`` / ``running_s``
in the same write: the cost report (``raybatch.scheduler.cost``) reads idle hours from them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import BaseModel

from raybatch.scheduler.cluster import (GCS_TIMEOUT_S, death_reason, draining_nodes, gcs_client, node_hex,
                                        resource_state)
from raybatch.scheduler.fit import is_spot_type
from raybatch.scheduler.launches import autoscaler_report
from raybatch.state.states import JobState
from raybatch.state.store import Store

log = logging.getLogger("raybatch.nodes")

READ_EVERY_S = 1.0
TOUCH_EVERY_S = 30.0
LIVE_STATES = ("preparing", "idle", "running", "unusable", "leaving")
ENDED_STATES = ("preempted", "terminated", "lost")
IP_PREFIX = "ip:"  # a machine the autoscaler manages that has not joined Ray (yet)

# NodeStatus (autoscaler.proto), by number: the generated modules are only imported where
# the GCS is read (death reasons' names: raybatch.scheduler.cluster.death_reason)
_RUNNING, _DEAD, _IDLE, _DRAINING = 1, 2, 3, 4


class NodeInfo(BaseModel):
    """One node as ``GET /api/v1/nodes`` shows it (a row of the store, plus its jobs)."""

    node_id: str
    node_type: Optional[str] = None
    vm_size: Optional[str] = None
    spot: bool = False
    head: bool = False
    ip: Optional[str] = None
    state: str
    state_since: float
    reason: Optional[str] = None
    first_seen: float
    last_seen: float
    ended_at: Optional[float] = None
    end_reason: Optional[str] = None
    idle_s: float = 0.0                 # seconds idle / running before state_since (cost)
    running_s: float = 0.0
    jobs: list[str] = []


class ClusterStatus(BaseModel):
    """``GET /api/v1/nodes/status``: the cluster at a glance."""

    phase: str                              # steady | resizing
    why: str                                # what makes it resizing (or "")
    counts: dict[str, int]                  # worker nodes per state (LIVE_STATES + preempted)
    head: Optional[NodeInfo] = None
    launching: dict[str, int] = {}          # node type -> launches requested, no machine yet
    demand: Optional[dict[str, Any]] = None  # raybatch.scheduler.autoscale.Demand.info()
    launch_failures: list[dict[str, Any]] = []
    preempted_window_s: float


@dataclass
class Observed:
    """One node as the GCS and the autoscaler show it now."""

    node_id: str
    state: str
    node_type: Optional[str] = None
    ip: Optional[str] = None
    head: bool = False
    reason: Optional[str] = None
    vm_size: Optional[str] = None
    since: Optional[float] = None         # when it started (first sight of a node we missed)
    ended_at: Optional[float] = None
    end_reason: Optional[str] = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


@dataclass
class GcsView:
    """What one read of the GCS returned (plain data, so classification is testable)."""

    infos: list[dict[str, Any]] = field(default_factory=list)      # see _info_dict
    status: dict[str, int] = field(default_factory=dict)           # node id -> NodeStatus
    draining: dict[str, int] = field(default_factory=dict)         # node id -> deadline (ms, 0: none)
    report: dict[str, Any] = field(default_factory=dict)           # __autoscaling_status's autoscaler_report


def classify(view: GcsView) -> list[Observed]:
    """Every node's state from one read of the GCS (see the module's table)."""
    out: list[Observed] = []
    joined: set[str] = set()
    for i in view.infos:
        nid = i["node_id"]
        joined.add(nid)
        obs = Observed(nid, "idle", node_type=i.get("node_type") or None, ip=i.get("ip"), head=i.get("head", False),
                       vm_size=i.get("instance_type") or None, since=i.get("start_s"))
        if not i["alive"]:
            reason = i.get("death_reason") or "UNSPECIFIED"
            message = i.get("death_message") or ""
            obs.ended_at = i.get("end_s") or time.time()
            if reason == "AUTOSCALER_DRAIN_PREEMPTED":
                obs.state = "preempted"
            elif reason in ("AUTOSCALER_DRAIN_IDLE", "EXPECTED_TERMINATION"):
                obs.state = "terminated"
            else:
                obs.state = "lost"
            obs.end_reason = f"{reason}: {message}" if message else reason
        elif nid in view.draining or view.status.get(nid) == _DRAINING:
            obs.state = "leaving"
            deadline = view.draining.get(nid) or 0
            obs.reason = "DRAINING" + (f" until {time.strftime('%H:%M:%S', time.localtime(deadline / 1000))}"
                                       if deadline else "")
        elif view.status.get(nid) == _RUNNING:
            obs.state = "running"
        out.append(obs)
    # the v1 autoscaler's machines that are not Ray nodes (yet): its set-up runs, or failed.
    # (On fake_multinode the "ip" is the node id: use_node_id_as_ip.)
    alive_ips = {i.get("ip") for i in view.infos if i["alive"]}
    for entry in view.report.get("pending_nodes") or []:
        ip, ntype, status = (list(entry) + [None, None, None])[:3]
        if ip and ip not in joined and ip not in alive_ips:
            out.append(Observed(IP_PREFIX + ip, "preparing", node_type=ntype, ip=ip, reason=status))
    for entry in view.report.get("failed_nodes") or []:
        ip, ntype = (list(entry) + [None, None])[:2]
        if ip and ip not in joined and ip not in alive_ips:
            out.append(Observed(IP_PREFIX + ip, "unusable", node_type=ntype, ip=ip, reason="update-failed"))
    return out


def type_facts(config: Optional[dict[str, Any]]) -> dict[str, tuple[Optional[str], bool]]:
    """node type -> (VM size, spot?) from a Ray cluster config (Azure's ``vmSize``; spot as
    ``fit.is_spot_type`` decides)."""
    out: dict[str, tuple[Optional[str], bool]] = {}
    for name, t in ((config or {}).get("available_node_types") or {}).items():
        t = t if isinstance(t, dict) else {}
        nc = t.get("node_config") or {}
        params = (nc.get("azure_arm_parameters") or nc) if isinstance(nc, dict) else {}
        size = params.get("vmSize") or nc.get("vmSize") or nc.get("InstanceType") or None
        out[str(name)] = (size, is_spot_type(t))
    return out


class NodeRecorder:
    """Keeps the store's ``nodes`` table in step with the cluster; a scheduler cycle hook.

    ``read`` returns a GcsView (default: read from the GCS at ``gcs_address``);
    ``config`` returns the current cluster config (VM sizes and spot types), or None."""

    def __init__(self, store: Store, gcs_address: Optional[str] = None, *,
                 read: Optional[Callable[[], GcsView]] = None,
                 config: Optional[Callable[[], Optional[dict[str, Any]]]] = None,
                 read_every: float = READ_EVERY_S, touch_every: float = TOUCH_EVERY_S):
        self.store = store
        self._read = read or gcs_reader(gcs_address or "")
        self._config = config or (lambda: None)
        self.read_every, self.touch_every = read_every, touch_every
        self._last_read = 0.0
        self._last_touch = 0.0
        self.report: dict[str, Any] = {}   # the last autoscaler report (for status)
        self.error: Optional[str] = None
        # node id -> the row as last written (live rows; ended ones need no more writes)
        self._rows: dict[str, dict[str, Any]] = {r["node_id"]: r for r in store.nodes()}
        self._ended: set[str] = {r["node_id"] for r in store.nodes(ended=True) if r["ended_at"] is not None}

    def __call__(self, _scheduler: Any = None) -> None:
        now = time.time()
        if now - self._last_read < self.read_every:
            return
        self._last_read = now
        try:
            view = self._read()
        except Exception as e:  # noqa: BLE001 - the GCS may be briefly unreachable
            if self.error is None:
                log.warning("reading the cluster's nodes failed: %s: %s", type(e).__name__, e)
            self.error = f"{type(e).__name__}: {e}"
            return
        self.error = None
        self.report = view.report
        self.apply(classify(view), now)

    def apply(self, observed: list[Observed], now: float) -> None:
        config = self._config() or {}
        facts = type_facts(config)
        head_type = config.get("head_node_type")
        seen: set[str] = set()
        for obs in observed:
            seen.add(obs.node_id)
            if obs.node_id in self._ended:
                continue
            row = self._rows.get(obs.node_id)
            if obs.head and not obs.node_type:
                obs.node_type = head_type  # `ray start --head` does not name its type
            size, spot = facts.get(obs.node_type or "", (None, False))
            want = {"node_type": obs.node_type, "vm_size": obs.vm_size or size, "spot": int(spot),
                    "head": int(obs.head), "ip": obs.ip, "state": obs.state, "reason": obs.reason}
            if obs.ended:
                want.update(ended_at=obs.ended_at, end_reason=obs.end_reason)
            if row is None:
                first = obs.since or now
                if not obs.node_id.startswith(IP_PREFIX) and obs.ip:
                    # it was set up under its address before it joined Ray: one machine, one record
                    pre = self._rows.pop(IP_PREFIX + obs.ip, None) or self._rows.pop(IP_PREFIX + obs.node_id, None)
                    if pre is not None:
                        first = pre["first_seen"]
                        self.store.delete_node(pre["node_id"])
                row = {"node_id": obs.node_id, **want, "state_since": obs.ended_at if obs.ended else now,
                       "first_seen": min(first, now), "last_seen": now}
                self.store.put_node(obs.node_id, **{k: v for k, v in row.items() if k != "node_id"})
            else:
                changed = {k: v for k, v in want.items() if row.get(k) != v and not (k == "vm_size" and v is None)}
                if changed:
                    if "state" in changed:
                        changed["state_since"] = obs.ended_at if obs.ended else now
                        changed.update(time_in_state(row, changed["state_since"]))
                    changed["last_seen"] = now
                    row.update(changed)
                    self.store.put_node(obs.node_id, **changed)
            if obs.ended:
                self._rows.pop(obs.node_id, None)
                self._ended.add(obs.node_id)
            else:
                self._rows[obs.node_id] = row
        # recorded as live, seen no more: a machine the autoscaler dropped before it joined
        # Ray, or a node the GCS forgot (it caches a limited number of dead nodes)
        for node_id in [n for n in self._rows if n not in seen]:
            row = self._rows.pop(node_id)
            if node_id.startswith(IP_PREFIX):
                state, why = ("terminated", f"removed by the autoscaler while {row['state']}"
                              + (f" ({row['reason']})" if row.get("reason") else ""))
            else:
                state, why = "lost", "no longer known to Ray's GCS"
            self.store.put_node(node_id, state=state, state_since=now, ended_at=now, end_reason=why,
                                last_seen=row["last_seen"], **time_in_state(row, now))
            self._ended.add(node_id)
        if now - self._last_touch >= self.touch_every and self._rows:
            self._last_touch = now
            self.store.touch_nodes(list(self._rows), now)
            for row in self._rows.values():
                row["last_seen"] = now


def time_in_state(row: dict[str, Any], until: float) -> dict[str, float]:
    """The row's seconds-by-state counter (``idle_s`` / ``running_s``) with the state it
    leaves at ``until`` added: what the cost report's idle hours are made of. Empty when
    the state left is neither idle nor running."""
    column = {"idle": "idle_s", "running": "running_s"}.get(row.get("state") or "")
    if column is None:
        return {}
    return {column: (row.get(column) or 0.0) + max(0.0, until - row["state_since"])}


def jobs_on_nodes(store: Store) -> dict[str, list[str]]:
    """node id -> the active jobs pinned there (a gang's nodes, an array job's live slots'),
    as the scheduler recorded them."""
    out: dict[str, list[str]] = {}
    for job in store.active_jobs():
        if job["state"] not in (JobState.STARTING.value, JobState.RUNNING.value):
            continue
        nodes: set[str] = set()
        attempt = store.get_attempt(job["id"], job["attempt"])
        if attempt:
            nodes |= set(attempt["nodes"])
        for slot in store.slots(job["id"], job["attempt"], live=True):
            nodes |= set(slot["nodes"])
        for r in store.ranks(job["id"], job["attempt"]):
            if r["node_id"]:
                nodes.add(r["node_id"])
        for n in nodes:
            out.setdefault(n, []).append(job["id"])
    return out


def node_infos(store: Store, ended: bool = False, since: Optional[float] = None) -> list[NodeInfo]:
    jobs = jobs_on_nodes(store)
    return [NodeInfo(**{**r, "spot": bool(r["spot"]), "head": bool(r["head"]), "jobs": jobs.get(r["node_id"], [])})
            for r in store.nodes(ended=ended, since=since)]


def cluster_status(store: Store, recorder: Optional[NodeRecorder], demand: Optional[dict[str, Any]],
                   launch_failures: list[dict[str, Any]], preempted_window_s: float = 3600.0) -> ClusterStatus:
    """steady or resizing, worker nodes per state, what is being launched, and why."""
    now = time.time()
    infos = node_infos(store, ended=True, since=now - preempted_window_s)
    counts = {s: 0 for s in (*LIVE_STATES, "preempted")}
    head = None
    for n in infos:
        if n.head:
            head = n
            continue
        if n.state in counts:
            counts[n.state] += 1
    report = recorder.report if recorder is not None else {}
    launching = {str(k): int(v) for k, v in (report.get("pending_launches") or {}).items() if v}
    why = []
    if launching:
        why.append("launching " + ", ".join(f"{k} x {t}" for t, k in sorted(launching.items())))
    if counts["preparing"]:
        why.append(f"{counts['preparing']} node(s) being set up")
    if counts["leaving"]:
        why.append(f"{counts['leaving']} node(s) leaving")
    if demand and demand.get("to_add"):
        why.append("asked for " + ", ".join(f"{k} x {t}" for t, k in sorted(demand["to_add"].items())))
    return ClusterStatus(phase="resizing" if why else "steady", why="; ".join(why), counts=counts, head=head,
                         launching=launching, demand=demand, launch_failures=launch_failures,
                         preempted_window_s=preempted_window_s)


# ---- reading the GCS ---------------------------------------------------------------
def _info_dict(node_id: str, info: Any) -> dict[str, Any]:
    death = info.death_info if info.HasField("death_info") else None
    return {
        "node_id": node_id, "alive": info.state == 0, "node_type": info.node_type_name or None,
        "ip": info.node_manager_address or None, "head": bool(info.is_head_node),
        "instance_type": info.instance_type_name or None,
        "start_s": info.start_time_ms / 1000 if info.start_time_ms else None,
        "end_s": info.end_time_ms / 1000 if info.end_time_ms else None,
        "death_reason": death_reason(death.reason) if death is not None else None,
        "death_message": death.reason_message if death is not None else None,
    }


def gcs_reader(gcs_address: str) -> Callable[[], GcsView]:
    """A GcsView reader for the cluster at ``gcs_address`` (no ray.init)."""
    state: dict[str, Any] = {}

    def read() -> GcsView:
        if "gcs" not in state:
            state["gcs"] = gcs_client(gcs_address)
        gcs = state["gcs"]
        infos = [_info_dict(node_hex(nid), info)
                 for nid, info in gcs.get_all_node_info(timeout=GCS_TIMEOUT_S).items()]
        status = {n.node_id.hex(): int(n.status) for n in resource_state(gcs).node_states}
        return GcsView(infos, status, draining_nodes(gcs), autoscaler_report(gcs))

    return read

