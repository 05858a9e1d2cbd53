"""What the cluster cost: node-hours, idle hours and hours lost to spot evictions, grouped by
node type, experiment or job, and money when a prices file is given (``raybatch cost``,
``GET /api/v1/cost``). Pure arithmetic on the store's rows: ``report`` takes the ``nodes``
table, the attempts and the array jobs' slots and a clock, nothing else.

Definitions (docs/azure.md, "Cost", says the same for users). The window is
[``since``, now] (no ``since``: since the first record).

node-hours
    by node type: each recorded node's life inside the window, from
    max(first_seen, since) to min(ended_at or now, now), head included.
    by experiment or job: each attempt's gang, from the attempt's ``started_at`` (its nodes
    are reserved from admission: placement, staging and start-up are the job's) to its
    ``ended_at`` (or now), times the nodes of its gang, each on its own node type; an array
    job's gangs are its slots (granted to released). What no job holds (idle nodes, the
    head, nodes being set up or drained) is the row ``(no job)``: the recorded nodes'
    hours minus the jobs' hours, per VM size. A gang counts each of its nodes once, however
    many of its bundles share it (``placement_strategy: pack``). Jobs of different gangs
    sharing one node at the same time each count that node's hours in full (the report does
    not split a node between jobs): their rows, and the by-experiment and by-job totals, can
    then add up to more than the node's own hours (the by-type report, from the nodes'
    lives, does not).
idle hours
    time a worker node spent in the ``idle`` state (nothing placed on it) inside the
    window. The NodeRecorder keeps, per node, the seconds spent idle or running before its
    current state (``idle_s``, ``running_s``); the current state counts up to now. When the
    window starts inside a node's life, before its current state began, the counted seconds
    are pro-rated over [first_seen, state_since] (the report says for how many nodes).
    The head runs the server: its hours are node-hours, never idle hours.
hours lost to evictions
    for each attempt that ended ``EVICTED``, or ``NODE_LOST`` with a lost node (or, when
    none was recorded, a node of its gang) that is a spot node: its gang's node-hours from
    the attempt's newest checkpoint to its end. The newest checkpoint's time is recorded
    per attempt (``checkpoint_at``) only for jobs with a deadline (their progress is
    followed: raybatch.scheduler.deadline_jobs); for the others the loss runs from the
    moment the attempt started running (``running_at``; ``started_at`` when it never ran),
    an upper bound, and the report says so. Array jobs' slots are not counted (their tasks
    rerun one by one: ``raybatch items``).
money
    hours × the hourly price of (VM size, spot) from a prices file (``Prices``, written by
    ``raybatch cluster prices``), looked up when the report is made (``price``): the report
    names the file, its region, currency and date. Hours on a VM size the file lacks (or a
    node whose size is unknown: the local default's nodes) are ``unpriced_hours``.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError



class GroupBy(str, enum.Enum):
    """What a cost report groups by (``raybatch cost --by``, ``GET /api/v1/cost?by=``)."""

    type = "type"
    experiment = "experiment"
    job = "job"


NO_JOB = "(no job)"
UNKNOWN_TYPE = "(unknown)"
RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"
PRICES_FILE = "prices.yaml"  # under RAYBATCH_HOME: what `cluster prices` writes and `cost` reads
LOSS_NOTE = ("hours lost to evictions of jobs without a deadline run from the evicted attempt's start of "
             "running to its end (their checkpoint times are not recorded): an upper bound")

Rate = tuple[Optional[str], bool]  # (VM size, spot)


# ---- the prices file ---------------------------------------------------------------
class VmPrice(BaseModel):
    """The hourly prices of one VM size (either may be missing)."""

    model_config = ConfigDict(extra="forbid")
    dedicated: Optional[float] = Field(None, ge=0)
    spot: Optional[float] = Field(None, ge=0)


class Prices(BaseModel):
    """``prices.yaml``: hourly prices of Linux VMs per VM size, dedicated (pay-as-you-go) and
    Spot, in one region and currency."""

    model_config = ConfigDict(extra="forbid")
    source: str = RETAIL_PRICES_URL
    region: str
    currency: str
    fetched_at: str                       # ISO 8601, UTC: when the prices were read
    unit: str = "1 Hour"
    prices: dict[str, VmPrice]

    def price(self, vm_size: Optional[str], spot: bool) -> Optional[float]:
        """The hourly price of (VM size, spot); the size matched case-insensitively."""
        if not vm_size:
            return None
        entry = self.prices.get(vm_size) or self._lower().get(vm_size.lower())
        if entry is None:
            return None
        return entry.spot if spot else entry.dedicated

    def _lower(self) -> dict[str, VmPrice]:
        return {k.lower(): v for k, v in self.prices.items()}


class PricesError(ValueError):
    """A prices file that cannot be used (the message names the file and the field)."""


def load_prices(path: str | Path) -> Prices:
    import yaml  # noqa: PLC0415

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PricesError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PricesError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PricesError(f"{path}: a prices file is a YAML mapping (region, currency, fetched_at, prices)")
    try:
        return Prices.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                             for err in e.errors())
        raise PricesError(f"{path}: {problems}") from None


# ---- the report --------------------------------------------------------------------
class RateHours(BaseModel):
    """A group's hours on one (VM size, spot), and its price when priced."""

    vm_size: Optional[str] = None
    spot: bool = False
    node_hours: float = 0.0
    eviction_loss_hours: float = 0.0
    price: Optional[float] = None        # per hour


class CostGroup(BaseModel):
    key: str                             # node type, experiment, job id; NO_JOB; "total"
    name: Optional[str] = None           # by job: the job's name
    nodes: int = 0                       # distinct nodes its hours were on
    node_hours: float = 0.0
    idle_hours: Optional[float] = None   # by type, the NO_JOB row and the total; None for a job
    eviction_loss_hours: float = 0.0
    rates: list[RateHours] = []
    cost: Optional[float] = None         # money, with prices
    eviction_loss_cost: Optional[float] = None
    unpriced_hours: Optional[float] = None


class PricesInfo(BaseModel):
    file: str
    region: str
    currency: str
    fetched_at: str


class CostReport(BaseModel):
    """``GET /api/v1/cost``, and ``raybatch cost -o json`` (with money when priced)."""

    by: str
    since: Optional[float] = None        # the window's start (None: the first record)
    until: float                         # the window's end: when the report was made
    groups: list[CostGroup]
    total: CostGroup
    prorated_nodes: int = 0              # nodes whose idle hours were pro-rated (see the module doc)
    prices: Optional[PricesInfo] = None
    notes: list[str] = []


class _Acc:
    """One group's sums while the report is made."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.hours: dict[Rate, float] = defaultdict(float)
        self.loss: dict[Rate, float] = defaultdict(float)
        self.idle: Optional[float] = None
        self.name: Optional[str] = None

    def add(self, node: str, rate: Rate, hours: float, loss: float = 0.0) -> None:
        self.nodes.add(node)
        self.hours[rate] += hours
        if loss:
            self.loss[rate] += loss

    def merge(self, other: "_Acc") -> "_Acc":
        """Add another group's nodes and hours to this one (the only place sums of groups
        are made: an experiment's jobs, a report's total)."""
        self.nodes |= other.nodes
        for r, h in other.hours.items():
            self.hours[r] += h
        for r, h in other.loss.items():
            self.loss[r] += h
        return self

    def group(self, key: str) -> CostGroup:
        rates = [RateHours(vm_size=r[0], spot=r[1], node_hours=self.hours.get(r, 0.0) / 3600,
                           eviction_loss_hours=self.loss.get(r, 0.0) / 3600)
                 for r in sorted(set(self.hours) | set(self.loss), key=lambda r: (r[0] or "", r[1]))]
        return CostGroup(key=key, name=self.name, nodes=len(self.nodes),
                         node_hours=sum(self.hours.values()) / 3600,
                         idle_hours=None if self.idle is None else self.idle / 3600,
                         eviction_loss_hours=sum(self.loss.values()) / 3600, rates=rates)


def _overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


def work_lost_from(attempt: dict[str, Any]) -> Optional[float]:
    """From when an interruption of this attempt loses work: its newest checkpoint
    (``checkpoint_at``, never before its start of running), or its start of running
    (``running_at``) without one; None when it never ran. The work lost when it ends at
    ``end`` is ``end`` minus this (``work_lost``). Used by the cost report (hours lost to
    evictions) and by the deadline scheduler's restart overhead d."""
    ran_from = attempt.get("running_at")
    if ran_from is None:
        return None
    return max(ran_from, attempt.get("checkpoint_at") or ran_from)


def work_lost(attempt: dict[str, Any], end: Optional[float] = None) -> float:
    """Seconds of work an attempt lost by ending at ``end`` (default: its ``ended_at``):
    end − (its newest checkpoint, or its start of running); 0 when it never ran."""
    start = work_lost_from(attempt)
    end = attempt.get("ended_at") if end is None else end
    if start is None or end is None:
        return 0.0
    return max(0.0, end - start)


def node_seconds(node: dict[str, Any], since: float, now: float) -> tuple[float, float, float, bool]:
    """(alive, idle, running) seconds of one ``nodes`` row inside [since, now], and whether
    the idle/running seconds counted before its current state were pro-rated."""
    first, state_since = node["first_seen"], node["state_since"]
    end = min(node["ended_at"] if node.get("ended_at") is not None else now, now)
    alive = _overlap(first, end, since, now)
    current = _overlap(state_since, end, since, now)
    idle = current if node["state"] == "idle" else 0.0
    running = current if node["state"] == "running" else 0.0
    before_idle, before_running = node.get("idle_s") or 0.0, node.get("running_s") or 0.0
    prorated = False
    if since > first and (before_idle or before_running):
        # the counters cover [first_seen, state_since]: keep the share inside the window
        frac = 0.0 if since >= state_since else (state_since - since) / max(state_since - first, 1e-9)
        before_idle, before_running = before_idle * frac, before_running * frac
        prorated = True
    return alive, idle + before_idle, running + before_running, prorated


def _attempt_end(a: dict[str, Any], now: float) -> float:
    end = a.get("ended_at")
    if end is None:
        # the attempt was never closed: its job moved on (a later attempt, a final state)
        stale = a.get("job_attempt") not in (None, a["n"]) or a.get("job_state") in ("SUCCEEDED", "FAILED",
                                                                                     "CANCELLED")
        end = (a.get("job_ended_at") or a.get("job_updated_at") or now) if stale else now
    return min(end, now)


def _lost_to_eviction(a: dict[str, Any], spot: dict[str, bool]) -> bool:
    if a.get("outcome") == "EVICTED":
        return True
    if a.get("outcome") != "NODE_LOST":
        return False
    where = a.get("lost_nodes") or a.get("nodes") or []
    return any(spot.get(n, False) for n in where)


def report(nodes: Iterable[dict[str, Any]], attempts: Iterable[dict[str, Any]],
           slots: Iterable[dict[str, Any]] = (), *, by: str = "type", now: float,
           since: Optional[float] = None) -> CostReport:
    """The cost report of these store rows over [since, now] (see the module's definitions).

    ``nodes``: ``nodes`` table rows; ``attempts``: ``Store.cost_attempts`` rows (an attempt
    with its job's ``job_name``, ``job_experiment``, ``job_nodes``...); ``slots``:
    ``Store.cost_slots`` rows."""
    try:
        by = GroupBy(by)
    except ValueError:
        raise ValueError(f"by: '{by}' is not one of {', '.join(g.value for g in GroupBy)}") from None
    if since is not None and not math.isfinite(since):
        raise ValueError("since: not a finite time")
    lo = since if since is not None else -math.inf
    nodes = list(nodes)
    rate: dict[str, Rate] = {n["node_id"]: (n.get("vm_size"), bool(n.get("spot"))) for n in nodes}
    ntype = {n["node_id"]: n.get("node_type") or UNKNOWN_TYPE for n in nodes}
    spot = {k: v[1] for k, v in rate.items()}
    prorated = 0

    # the nodes' own hours: the by-type groups, and the cluster's total for the (no job) row
    by_type: dict[str, _Acc] = defaultdict(_Acc)
    cluster = _Acc()
    cluster.idle = 0.0
    alive_s: dict[str, float] = {}   # node -> seconds alive in the window
    held_s: dict[str, float] = defaultdict(float)  # node -> seconds a job's gang held it
    for n in nodes:
        alive, idle, _running, was_prorated = node_seconds(n, lo, now)
        if alive <= 0:
            continue
        alive_s[n["node_id"]] = alive
        prorated += was_prorated
        acc = by_type[ntype[n["node_id"]]]
        acc.add(n["node_id"], rate[n["node_id"]], alive)
        cluster.add(n["node_id"], rate[n["node_id"]], alive)
        if not n.get("head"):
            acc.idle = (acc.idle or 0.0) + idle
            cluster.idle += idle
        elif acc.idle is None:
            acc.idle = 0.0

    # the jobs' gangs: (job, attempt, nodes, start, end, loss start or None)
    slots_of: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for s in slots:
        slots_of[(s["job_id"], s["attempt"])].append(s)
    by_job: dict[str, _Acc] = defaultdict(_Acc)
    job_experiment: dict[str, str] = {}
    upper_bound = False  # a loss measured from the start of running, not from a checkpoint
    for a in attempts:
        end = _attempt_end(a, now)
        job = a["job_id"]
        job_experiment[job] = a.get("job_experiment") or ""
        acc = by_job[job]
        acc.name = a.get("job_name")
        gangs = [(s["nodes"], s["granted_at"], min(s["released_at"] or end, end)) for s in
                 slots_of.get((job, a["n"]), [])]
        loss_from = None
        if not gangs:
            count = max(1, int(a.get("job_nodes") or 1))
            members = list(a.get("nodes") or []) or [f"{job}#{a['n']}.{i}" for i in range(count)]
            gangs = [(members, a["started_at"], end)]
            if _lost_to_eviction(a, spot):
                # never ran: all its time held was lost
                loss_from = work_lost_from(a)
                if loss_from is None:
                    loss_from = a["started_at"]
        for members, start, stop in gangs:
            held = _overlap(start, stop, lo, now)
            loss = _overlap(loss_from, stop, lo, now) if loss_from is not None else 0.0
            upper_bound = upper_bound or (loss > 0 and not a.get("checkpoint_at"))
            # a gang packed onto one node (``pack``) names it once per bundle: counted once
            for node in dict.fromkeys(members):
                r = rate.get(node, (None, False))
                if held or loss:
                    acc.add(node, r, held, loss)
                    held_s[node] += held
                if loss:  # charged to the node types the lost gang had
                    by_type[ntype.get(node, UNKNOWN_TYPE)].add(node, r, 0.0, loss)

    groups: list[CostGroup]
    everything = _Acc()  # the total: the sum of the groups
    if by == GroupBy.type:
        groups = [acc.group(key) for key, acc in by_type.items()]
        for acc in by_type.values():
            everything.merge(acc)
        everything.idle = cluster.idle
    else:
        accs: dict[str, _Acc] = defaultdict(_Acc)
        if by == GroupBy.job:
            accs = by_job
        else:
            for job, acc in by_job.items():
                accs[job_experiment[job]].merge(acc)
        accs = {key: acc for key, acc in accs.items() if acc.hours or acc.loss}
        rest = _Acc()  # the recorded nodes' hours that no gang held
        rest.idle = cluster.idle
        for node, alive in alive_s.items():
            if alive - held_s.get(node, 0.0) > 1.0:
                rest.add(node, rate[node], alive - held_s.get(node, 0.0))
        groups = [acc.group(key) for key, acc in accs.items()]
        if rest.hours or rest.idle:
            groups.append(rest.group(NO_JOB))
        for acc in [*accs.values(), rest]:
            everything.merge(acc)
        everything.nodes |= cluster.nodes
        everything.idle = cluster.idle
    total = everything.group("total")
    groups.sort(key=lambda g: (g.key == NO_JOB, -g.node_hours, g.key))
    notes = [LOSS_NOTE] if upper_bound else []
    if prorated:
        notes.append(f"the window starts inside the life of {prorated} node(s): their idle hours before "
                     "their current state are pro-rated")
    return CostReport(by=by.value, since=since, until=now, groups=groups, total=total, prorated_nodes=prorated,
                      notes=notes)


def price(rep: CostReport, prices: Prices, file: str | Path) -> CostReport:
    """The report with money: each group's hours on (VM size, spot) × that hourly price."""
    rep = rep.model_copy(deep=True)
    unknown: set[str] = set()
    for g in [*rep.groups, rep.total]:
        g.cost, g.eviction_loss_cost, g.unpriced_hours = 0.0, 0.0, 0.0
        for r in g.rates:
            r.price = prices.price(r.vm_size, r.spot)
            if r.price is None:
                g.unpriced_hours += r.node_hours
                if r.node_hours or r.eviction_loss_hours:
                    unknown.add(f"{r.vm_size or 'unknown size'}{' (spot)' if r.spot else ''}")
                continue
            g.cost += r.node_hours * r.price
            g.eviction_loss_cost += r.eviction_loss_hours * r.price
    rep.prices = PricesInfo(file=str(file), region=prices.region, currency=prices.currency,
                            fetched_at=prices.fetched_at)
    if unknown:
        rep.notes.append(f"no price in {file} for {', '.join(sorted(unknown))}: their hours are unpriced_hours")
    return rep
