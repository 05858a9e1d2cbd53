"""Reading the live Ray cluster: each node's total and free resources, the nodes being
drained, why nodes died.

Uses the GCS's cluster resource state (what Ray's autoscaler reads), so the
server needs no ``ray.init`` and does not show up as a driver. Every GCS client of
raybatch is made here (``gcs_client``), and every GCS call of the scheduler's cycle is
bounded by ``GCS_TIMEOUT_S``: a GCS that does not answer fails the read (retried next
cycle) instead of hanging the cycle."""

from __future__ import annotations

import functools
from typing import Any, Optional

from raybatch.scheduler.fit import NodeView

_ALIVE = {1, 3}  # NodeStatus RUNNING, IDLE (autoscaler.proto)
GCS_TIMEOUT_S = 10  # seconds a GCS call may take (as Ray's own autoscaler SDK: DEFAULT_RPC_TIMEOUT_S)


def gcs_client(address: str) -> Any:
    """A ``ray._raylet.GcsClient`` for the GCS at ``address`` (host:port), without
    ``ray.init`` (raybatch's client environment is set first: ``ray_client_env``)."""
    from raybatch.config import ray_client_env  # noqa: PLC0415

    ray_client_env()
    from ray._raylet import GcsClient  # noqa: PLC0415

    return GcsClient(address=address)


def node_hex(key: Any) -> str:
    """A node id as the GCS returns it (NodeID, bytes or hex str), in hex."""
    return key.hex() if hasattr(key, "hex") else str(key)


def resource_state(gcs: Any, timeout: float = GCS_TIMEOUT_S) -> Any:
    """The autoscaler's ``ClusterResourceState`` (what
    ``ray.autoscaler.v2.sdk.get_cluster_resource_state`` returns, with a timeout)."""
    from ray.core.generated.autoscaler_pb2 import GetClusterResourceStateReply  # noqa: PLC0415

    reply = GetClusterResourceStateReply()
    reply.ParseFromString(gcs.get_cluster_resource_state(timeout_s=timeout))
    return reply.cluster_resource_state


def draining_nodes(gcs: Any, timeout: float = GCS_TIMEOUT_S) -> dict[str, int]:
    """Nodes being drained (``ray drain-node``, a spot watcher's notice): node id (hex) ->
    when it goes (epoch ms; 0 when the drain set no deadline)."""
    return {node_hex(k): int(ms or 0) for k, ms in gcs.get_draining_nodes(timeout=timeout).items()}


@functools.lru_cache(maxsize=1)
def _death_names() -> dict[int, str]:
    from ray.core.generated import gcs_pb2  # noqa: PLC0415

    reasons = gcs_pb2.GcsNodeInfo.DESCRIPTOR.fields_by_name["death_info"].message_type.enum_types[0]
    return {v.number: v.name for v in reasons.values}


def death_reason(number: int) -> str:
    """A ``NodeDeathInfo.Reason`` number's name (e.g. 3: AUTOSCALER_DRAIN_PREEMPTED), as Ray's
    protobuf defines it; UNSPECIFIED for a number it does not know."""
    return _death_names().get(int(number), "UNSPECIFIED")


class RayClusterView:
    def __init__(self, gcs_address: str):
        self.gcs_address = gcs_address
        self._gcs = gcs_client(gcs_address)

    def snapshot(self) -> list[NodeView]:
        state = resource_state(self._gcs)
        nodes = []
        for n in state.node_states:
            nodes.append(
                NodeView(
                    node_id=n.node_id.hex(),
                    ip=n.node_ip_address,
                    available={k: float(v) for k, v in n.available_resources.items()},
                    total={k: float(v) for k, v in n.total_resources.items()},
                    alive=n.status in _ALIVE,
                    labels=dict(n.labels),
                    node_type=n.ray_node_type_name,
                )
            )
        return nodes

    def draining(self) -> dict[str, Optional[float]]:
        """Nodes being drained: node id -> when it goes (epoch s), None when the drain set
        no deadline (``draining_nodes``)."""
        return {k: (ms / 1000.0 if ms else None) for k, ms in draining_nodes(self._gcs).items()}

    def death_reasons(self, node_ids: list[str]) -> dict[str, str]:
        """Why these nodes died, as the GCS recorded it (``NodeDeathInfo.Reason`` names, e.g.
        AUTOSCALER_DRAIN_PREEMPTED), for those that did."""
        wanted, out = set(node_ids), {}
        for k, info in self._gcs.get_all_node_info(timeout=GCS_TIMEOUT_S).items():
            node_id = node_hex(k)
            if node_id in wanted and info.HasField("death_info") and info.death_info.reason:
                out[node_id] = death_reason(info.death_info.reason)
        return out
