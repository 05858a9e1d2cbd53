"""The spot watcher: turn an Azure eviction notice into a Ray drain (``raybatch spot-watch``).

Runs on every spot (low-priority) node, started after ``ray start`` by the node type's
``worker_start_ray_commands``. It polls Azure's Instance Metadata Service for Scheduled
Events (``GET /metadata/scheduledevents?api-version=2020-07-01`` with ``Metadata: true``;
https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events)::

    {"DocumentIncarnation": 2,
     "Events": [{"EventId": "...", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                 "Resources": ["vm-name"], "EventStatus": "Scheduled",
                 "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT", "Description": "...",
                 "EventSource": "Platform", "DurationInSeconds": -1}]}

A Spot VM gets ``Preempt`` at least 30 s before it is evicted. For a ``Preempt`` event
that names this VM (``/metadata/instance/compute/name``), it drains this node's raylet
once per event: ``GcsClient.drain_node(node, DRAIN_NODE_REASON_PREEMPTION, message,
NotBefore in ms)``. Ray then schedules nothing new there, and the raybatch server
SIGTERMs the gangs on the node at once, with grace = min(grace_period, time left)
(``raybatch.scheduler.evictions``). The event is never acknowledged (a POST of
``StartRequests`` would let Azure evict the VM at once, cutting the grace short).

Logs go to stderr: what happened, never a token."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Optional

from raybatch.scheduler.cluster import GCS_TIMEOUT_S, node_hex

IMDS_URL = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
VM_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
PREEMPT = "Preempt"
IMDS_TIMEOUT_S = 5.0


class WatchError(RuntimeError):
    """The watcher cannot run (no IMDS, no Ray node of its own): the reason, in words."""


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    event_type: str
    resources: tuple[str, ...]
    status: str
    not_before: Optional[float]  # epoch s; None once the event has started (NotBefore is "")
    description: str = ""
    source: str = ""

    def names(self, vm_name: str) -> bool:
        return vm_name.lower() in (r.lower() for r in self.resources)


def parse_not_before(value: Optional[str]) -> Optional[float]:
    """IMDS's NotBefore ("Mon, 19 Sep 2016 18:29:47 GMT", RFC 1123) as epoch seconds."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        raise WatchError(f"Scheduled Events: NotBefore {value!r} is not an RFC 1123 date") from None


def parse_events(doc: Any) -> tuple[Optional[int], list[ScheduledEvent]]:
    """(DocumentIncarnation, the events) of a Scheduled Events document."""
    if not isinstance(doc, dict):
        raise WatchError("Scheduled Events: the answer is not a JSON object")
    out = []
    for e in doc.get("Events") or []:
        out.append(ScheduledEvent(event_id=str(e.get("EventId", "")), event_type=str(e.get("EventType", "")),
                                  resources=tuple(str(r) for r in e.get("Resources") or ()),
                                  status=str(e.get("EventStatus", "")),
                                  not_before=parse_not_before(e.get("NotBefore")),
                                  description=str(e.get("Description", "")), source=str(e.get("EventSource", ""))))
    return doc.get("DocumentIncarnation"), out


class Imds:
    """Azure's Instance Metadata Service (no proxy: it is link-local)."""

    def __init__(self, base_url: str = IMDS_URL, timeout_s: float = IMDS_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> bytes:
        req = urllib.request.Request(self.base_url + path, headers={"Metadata": "true"})
        with self._opener.open(req, timeout=self.timeout_s) as resp:
            return resp.read()

    def vm_name(self) -> str:
        name = self.get(VM_NAME_PATH).decode().strip()
        if not name:
            raise WatchError(f"{self.base_url}{VM_NAME_PATH} gave no VM name")
        return name

    def events(self) -> tuple[Optional[int], list[ScheduledEvent]]:
        try:
            doc = json.loads(self.get(EVENTS_PATH))
        except ValueError as e:
            raise WatchError(f"Scheduled Events: not JSON ({e})") from None
        return parse_events(doc)


def local_addresses(gcs_address: str) -> set[str]:
    """This machine's addresses: its host name's, and the one it reaches the GCS from."""
    out = {"127.0.0.1"}
    try:
        out |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    host, _, port = gcs_address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port or 6379)))  # no packet is sent: picks the route's source address
            out.add(s.getsockname()[0])
    except (OSError, ValueError):
        pass
    return out


def own_node_id(gcs: Any, gcs_address: str) -> str:
    """The Ray node id of the raylet on this machine: the one live node whose address or
    host name is this machine's."""
    addresses, hostname = local_addresses(gcs_address), socket.gethostname()
    mine = []
    for k, info in gcs.get_all_node_info(timeout=GCS_TIMEOUT_S).items():
        if info.state != 0:  # GcsNodeInfo.ALIVE
            continue
        if info.node_manager_address in addresses or info.node_manager_hostname == hostname:
            mine.append(node_hex(k))
    if len(mine) != 1:
        found = "none" if not mine else f"{len(mine)} ({', '.join(m[:12] for m in mine)})"
        raise WatchError(f"cannot tell this machine's Ray node: live nodes at {sorted(addresses)} or host "
                         f"{hostname}: {found}; pass --node-id")
    return mine[0]


def drain_via_gcs(gcs: Any) -> Callable[[str, str, int], tuple[bool, str]]:
    """``drain(node_id, message, deadline_ms)`` -> (accepted, why not), for preemption."""
    from ray.core.generated import autoscaler_pb2  # noqa: PLC0415

    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")

    def drain(node_id: str, message: str, deadline_ms: int) -> tuple[bool, str]:
        accepted, why = gcs.drain_node(node_id, reason, message, deadline_ms, timeout=GCS_TIMEOUT_S)
        return bool(accepted), str(why or "")

    return drain


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} spot-watch: {msg}", file=sys.stderr, flush=True)


@dataclass
class SpotWatcher:
    """One node's watcher: ``poll`` once, or ``run`` until stopped."""

    imds: Imds
    drain: Callable[[str, str, int], tuple[bool, str]]
    node_id: str
    vm_name: str
    log: Callable[[str], None] = _log
    drained: set[str] = field(default_factory=set)  # EventIds this node was drained for
    _errors: int = 0

    def poll(self, now: Optional[float] = None) -> list[ScheduledEvent]:
        """Read the events once; drain for each new Preempt of this VM. The events drained for."""
        _, events = self.imds.events()
        now = time.time() if now is None else now
        out = []
        for e in events:
            if e.event_type != PREEMPT or not e.names(self.vm_name) or e.event_id in self.drained:
                continue
            deadline = e.not_before if e.not_before is not None else now  # started: it goes now
            message = (f"Azure Scheduled Event {e.event_id}: {PREEMPT} of {self.vm_name} "
                       f"({e.status or 'Scheduled'}), not before {time.strftime('%H:%M:%S', time.gmtime(deadline))} UTC")
            accepted, why = self.drain(self.node_id, message, int(deadline * 1000))
            if not accepted:
                self.log(f"{message}: Ray refused to drain node {self.node_id[:12]}: {why}; trying again")
                continue
            self.drained.add(e.event_id)
            self.log(f"{message}: drained Ray node {self.node_id[:12]} for preemption "
                     f"({max(0.0, deadline - now):.0f} s left)")
            out.append(e)
        return out

    def run(self, poll_s: float, stop: Optional[threading.Event] = None) -> None:
        stop = stop or threading.Event()
        self.log(f"watching Scheduled Events for {self.vm_name} (Ray node {self.node_id[:12]}) every {poll_s:g} s")
        while not stop.is_set():
            try:
                self.poll()
                if self._errors:
                    self.log("Scheduled Events answer again")
                self._errors = 0
            except Exception as e:  # noqa: BLE001 - IMDS or the GCS may be briefly unreachable
                self._errors += 1
                if self._errors in (1, 10) or self._errors % 100 == 0:  # not a line per second
                    self.log(f"poll failed ({self._errors} in a row): {type(e).__name__}: {e}")
            stop.wait(poll_s)
