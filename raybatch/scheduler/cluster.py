"""Reading the live Ray cluster: each node's total and free resources.

Uses the GCS's cluster resource state (what Ray's autoscaler reads), so the
server needs no ``ray.init`` and does not show up as a driver."""

from __future__ import annotations

from typing import Optional

from raybatch.scheduler.fit import NodeView

_ALIVE = {1, 3}  # NodeStatus RUNNING, IDLE (autoscaler.proto)


class RayClusterView:
    def __init__(self, gcs_address: str):
        from raybatch.config import ray_client_env  # noqa: PLC0415

        ray_client_env()
        from ray._raylet import GcsClient  # noqa: PLC0415

        self.gcs_address = gcs_address
        self._gcs = GcsClient(address=gcs_address)

    def snapshot(self) -> list[NodeView]:
        from ray.autoscaler.v2.sdk import get_cluster_resource_state  # noqa: PLC0415

        state = get_cluster_resource_state(self._gcs)
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
        """Nodes being drained (``ray drain-node``, a spot watcher's notice): node id -> when
        it goes (epoch s), None when the drain set no deadline."""
        return {(k.hex() if hasattr(k, "hex") else str(k)): (ms / 1000.0 if ms else None)
                for k, ms in self._gcs.get_draining_nodes().items()}

    def death_reasons(self, node_ids: list[str]) -> dict[str, str]:
        """Why these nodes died, as the GCS recorded it (``NodeDeathInfo.Reason`` names, e.g.
        AUTOSCALER_DRAIN_PREEMPTED), for those that did."""
        from ray.core.generated import gcs_pb2  # noqa: PLC0415

        reasons = gcs_pb2.GcsNodeInfo.DESCRIPTOR.fields_by_name["death_info"].message_type.enum_types[0]
        wanted, out = set(node_ids), {}
        for k, info in self._gcs.get_all_node_info().items():
            node_id = k.hex() if hasattr(k, "hex") else str(k)
            if node_id in wanted and info.HasField("death_info") and info.death_info.reason:
                out[node_id] = reasons.values_by_number[info.death_info.reason].name
        return out
