"""Reading the live Ray cluster: each node's total and free resources.

Uses the GCS's cluster resource state (what Ray's autoscaler reads), so the
server needs no ``ray.init`` and does not show up as a driver."""

from __future__ import annotations

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
