"""Node launches that failed, as Ray's autoscaler reports them.

Ray's v1 autoscaler (what ``ray start`` / ``ray up`` run in Ray 2.60) writes its status,
every update, as JSON to the GCS internal KV key ``__autoscaling_status``
(``ray.autoscaler._private.monitor.Monitor._run``)::

    {"time": <epoch s>, "monitor_pid": ..., "load_metrics_report": {...},
     "autoscaler_report": {               # dataclasses.asdict(AutoscalerSummary)
        "active_nodes": {...}, "pending_nodes": [...], "pending_launches": {...},
        "failed_nodes": [[ip, node_type], ...],          # launched, then died
        "node_availability_summary": {"node_availabilities": {
            "<node type>": {"node_type": ..., "is_available": false,
                            "last_checked_timestamp": <epoch s of the launch attempt>,
                            "unavailable_node_information": {"category": ..., "description": ...}}}}}}

A node provider records a launch failure there only when ``create_node`` raises
``NodeLaunchException(category, description)`` (raybatch's Azure provider raises one with
the ARM error code as the category); the record is kept for 30 minutes
(``AUTOSCALER_NODE_AVAILABILITY_MAX_STALENESS_S``) or until a launch of that type
succeeds. Ray's v2 autoscaler keeps failed launches in its cluster status instead
(``ClusterStatus.failed_launches``): read when the KV key has no v1 report.

``raybatch cluster status`` lists these; ``Demand`` skips a spot type for a while after one.
The report is read here for the node records too (``autoscaler_report``: machines being set
up, failed ones, pending launches)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from raybatch.scheduler.cluster import GCS_TIMEOUT_S

log = logging.getLogger("raybatch.launches")

STATUS_KEY = b"__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS


@dataclass(frozen=True)
class LaunchFailure:
    node_type: str
    at: float        # when the failed launch was attempted (epoch seconds)
    category: str    # the provider's short label, e.g. an ARM error code (OperationNotAllowed)
    message: str     # what the provider said

    def __str__(self) -> str:
        return f"{self.node_type}: {self.category}: {self.message}"


def report_of(raw: Optional[bytes | str]) -> Optional[dict[str, Any]]:
    """The ``autoscaler_report`` of a ``__autoscaling_status`` value; None when the value is
    missing, not JSON or has no autoscaler report."""
    if not raw:
        return None
    try:
        status = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.warning("the autoscaler's status (%s) is not JSON", STATUS_KEY.decode())
        return None
    report = status.get("autoscaler_report") if isinstance(status, dict) else None
    return report if isinstance(report, dict) else None


def read_report(gcs_client: Any, timeout: float = GCS_TIMEOUT_S) -> Optional[dict[str, Any]]:
    """The v1 autoscaler's last report, read from the GCS internal KV (``gcs_client``: a
    ``ray._raylet.GcsClient``); None when there is none. Raises what the GCS raises."""
    return report_of(gcs_client.internal_kv_get(STATUS_KEY, None, timeout=timeout))


def autoscaler_report(gcs_client: Any) -> dict[str, Any]:
    """The v1 autoscaler's last report (machines being set up, failed ones, pending
    launches, launch failures), or {} when there is none."""
    return read_report(gcs_client) or {}


def failures_in(report: Optional[dict[str, Any]]) -> list[LaunchFailure]:
    """The launch failures of a v1 autoscaler report, oldest first."""
    summary = (report or {}).get("node_availability_summary") or {}
    records = summary.get("node_availabilities") or {}
    out = []
    for node_type, record in records.items():
        if not isinstance(record, dict) or record.get("is_available", True):
            continue
        info = record.get("unavailable_node_information") or {}
        out.append(LaunchFailure(node_type=str(record.get("node_type") or node_type),
                                 at=float(record.get("last_checked_timestamp") or 0.0),
                                 category=str(info.get("category") or "unknown"),
                                 message=str(info.get("description") or "")))
    return sorted(out, key=lambda f: f.at)


def parse_status(raw: Optional[bytes | str]) -> list[LaunchFailure]:
    """The launch failures in a v1 ``__autoscaling_status`` value, oldest first. A value
    that is missing, not JSON or without an autoscaler report gives none."""
    return failures_in(report_of(raw))


def from_cluster_status(status: Any) -> list[LaunchFailure]:
    """The failed launches of a v2 ``ClusterStatus`` (``ray.autoscaler.v2.schema``)."""
    out = []
    for req in getattr(status, "failed_launches", None) or []:
        out.append(LaunchFailure(node_type=req.ray_node_type_name,
                                 at=float(req.failed_ts_s or req.request_ts_s or 0),
                                 category="LaunchFailed",
                                 message=req.details or f"{req.count} node(s) of {req.instance_type_name} "
                                                        "could not be launched"))
    return sorted(out, key=lambda f: f.at)


def launch_failures(gcs_client: Any, gcs_address: Optional[str] = None) -> list[LaunchFailure]:
    """The autoscaler's recent failed node launches, oldest first (``gcs_client``: a
    ``ray._raylet.GcsClient``). v2's cluster status is read only when ``gcs_address`` is
    given and the KV holds no v1 report. Raises what the GCS raises when it cannot be
    reached."""
    report = read_report(gcs_client)
    if report is not None or gcs_address is None:
        return failures_in(report)
    from ray.autoscaler.v2.sdk import get_cluster_status  # noqa: PLC0415

    try:
        return from_cluster_status(get_cluster_status(gcs_address, timeout=GCS_TIMEOUT_S))
    except Exception as e:  # noqa: BLE001 - a v1 cluster before its first report has no v2 state
        log.debug("no v2 cluster status: %s", e)
        return []
