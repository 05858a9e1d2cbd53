"""Ray's fake_multinode provider with two cloud behaviours it lacks, for the eviction tests
(the monitor imports this module: the cluster's env puts the repository on PYTHONPATH):

* a node whose raylet died is gone from the cloud's list, as an evicted Spot VM is
  (``evictionPolicy: Delete``): the v1 autoscaler then launches a replacement instead of
  waiting forever for a node it still believes is starting;
* a node type whose ``node_config`` has ``fail_launch: <category>`` cannot be launched:
  ``create_node`` raises ``NodeLaunchException`` as raybatch's Azure provider does for an
  ARM error (quota, capacity), which the autoscaler records in ``__autoscaling_status``."""

from __future__ import annotations

from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.node_launch_exception import NodeLaunchException


class FakeCloudProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")
                raylets = getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_RAYLET) or []
                if raylets and all(p.process.poll() is not None for p in raylets):
                    del self._nodes[node_id]  # the VM is gone with its raylet
                    node.kill_all_processes(check_alive=False, allow_graceful=False)
        return super().non_terminated_nodes(tag_filters)

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        category = (node_config or {}).get("fail_launch")
        if category:
            raise NodeLaunchException(category, f"the fake cloud has no capacity for {count} node(s) of this type",
                                      None)
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
