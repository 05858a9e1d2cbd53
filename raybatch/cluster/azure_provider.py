"""raybatch's Azure node provider: Ray's ``AzureNodeProvider`` plus two things it lacks.

Used from a cluster YAML as::

    provider:
      type: external
      module: raybatch.cluster.azure_provider.RaybatchAzureNodeProvider
      subscription_id: ...
      location: ...
      resource_group: ...

Ray's bootstrap is unchanged (``bootstrap_config`` is inherited: ``bootstrap_azure``
creates the resource group, vnet, NSG and managed identity; ``validate_config`` accepts
an external provider), and so is everything else Ray's provider does. Added:

1. **Launch failures carry the ARM error code.** ``create_node`` raises Ray's
   ``NodeLaunchException(category=<ARM code>)`` (QuotaExceeded, SkuNotAvailable,
   AllocationFailed, OverconstrainedAllocationRequest, ...) instead of a bare error, so
   the autoscaler's "Failed to launch N node(s) of type T. (QuotaExceeded): ..." and
   raybatch's launch-failure records name the cause.
2. **NICs left by evicted spot VMs are removed.** A Spot VM with ``evictionPolicy:
   Delete`` is deleted on eviction, but its network interface (and public IP, if any) is
   not. The VMs' ARM template is given the VM's tags on its NICs and public IPs too; a NIC
   tagged with this cluster that is attached to no VM, whose VM does not exist and whose
   deployment is not running is deleted, then the public IPs it held. The sweep runs in
   the background, at most every ``ORPHAN_SWEEP_INTERVAL_S``, from ``create_node`` and
   ``non_terminated_nodes``; it never touches untagged resources or other clusters'.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from azure.core.exceptions import AzureError, ResourceNotFoundError
from ray.autoscaler._private._azure.node_provider import AzureNodeProvider
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

from raybatch.cluster.azure import arm_error

log = logging.getLogger("raybatch.cluster.azure_provider")

ORPHAN_SWEEP_INTERVAL_S = 60.0
RUNNING_DEPLOYMENT_STATES = {"accepted", "running", "creating", "updating", "waiting", "deleting"}
# NIC names of Ray's VM template: <vmName>-nic<i> or <vmName>-nic-public<i>; the VM is <vmName><i>
_NIC_NAME = re.compile(r"^(?P<base>.+?)-nic(?:-public)?(?P<index>\d+)$")
_TAGGED_TYPES = ("Microsoft.Network/networkInterfaces", "Microsoft.Network/publicIpAddresses")


def tag_network_resources(parameters: Any) -> Any:
    """A copy of a VM deployment's parameters whose template tags the NICs and public IPs
    with the VMs' tags (``vmTags``); other deployments are returned unchanged."""
    if not isinstance(parameters, dict):
        return parameters
    props = parameters.get("properties") or {}
    template = props.get("template") or {}
    if "vmTags" not in (props.get("parameters") or {}) or not isinstance(template.get("resources"), list):
        return parameters
    out = copy.deepcopy(parameters)
    for res in out["properties"]["template"]["resources"]:
        if str(res.get("type", "")).lower() in {t.lower() for t in _TAGGED_TYPES}:
            res.setdefault("tags", "[parameters('vmTags')]")
    return out


class _TaggingDeployments:
    """The resource client's ``deployments`` operations, with VM deployments' NICs tagged."""

    def __init__(self, inner):
        self._inner = inner

    def begin_create_or_update(self, resource_group_name, deployment_name, parameters, *args, **kwargs):
        return self._inner.begin_create_or_update(resource_group_name, deployment_name,
                                                  tag_network_resources(parameters), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _TaggingResourceClient:
    def __init__(self, inner):
        self._inner = inner
        self.deployments = _TaggingDeployments(inner.deployments)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class RaybatchAzureNodeProvider(AzureNodeProvider):
    """Ray's Azure provider with ARM error codes on launch failures and orphan NIC clean-up."""

    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self.resource_client = _TaggingResourceClient(self.resource_client)
        self._sweeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raybatch-nic-sweep")
        self._sweep: Optional[Future] = None
        self._swept_at = float("-inf")
        self._sweep_lock = threading.Lock()

    # -- launch failures ------------------------------------------------------------

    def create_node(self, node_config, tags, count):
        self.start_orphan_sweep()
        try:
            return super().create_node(node_config, tags, count)
        except AzureError as e:
            code, message = arm_error(e)
            size = (node_config.get("azure_arm_parameters") or {}).get("vmSize", "?")
            raise NodeLaunchException(
                category=code,
                description=f"{count} x {size} in {self.provider_config.get('location')}: {message}",
                src_exc_info=sys.exc_info()) from e

    # -- orphan NICs ----------------------------------------------------------------

    def non_terminated_nodes(self, tag_filters):
        nodes = super().non_terminated_nodes(tag_filters)
        self.start_orphan_sweep()
        return nodes

    def start_orphan_sweep(self, force: bool = False) -> Optional[Future]:
        """Start a background sweep unless one runs or one ran in the last interval."""
        with self._sweep_lock:
            if self._sweep is not None and not self._sweep.done():
                return self._sweep
            if not force and time.monotonic() - self._swept_at < ORPHAN_SWEEP_INTERVAL_S:
                return None
            self._swept_at = time.monotonic()
            self._sweep = self._sweeper.submit(self._sweep_logged)
            return self._sweep

    def _sweep_logged(self) -> list[str]:
        try:
            return self.remove_orphan_nics()
        except Exception as e:  # noqa: BLE001 - never break the autoscaler over clean-up
            code, message = arm_error(e) if isinstance(e, AzureError) else (type(e).__name__, str(e))
            log.warning("orphan NIC sweep failed: %s: %s", code, message)
            return []

    def _mine(self, tags: Optional[dict]) -> bool:
        return bool(tags) and tags.get(TAG_RAY_CLUSTER_NAME) == self.cluster_name

    def _deployment_running(self, rg: str, deployment: str) -> bool:
        try:
            d = self.resource_client.deployments.get(resource_group_name=rg, deployment_name=deployment)
        except ResourceNotFoundError:
            return False
        state = str(getattr(getattr(d, "properties", None), "provisioning_state", "") or "")
        return state.lower() in RUNNING_DEPLOYMENT_STATES

    def remove_orphan_nics(self) -> list[str]:
        """Delete this cluster's NICs whose VM is gone (and the public IPs they held, and this
        cluster's unattached public IPs whose VM is gone); the names deleted."""
        rg = self.provider_config["resource_group"]
        vms = {vm.name for vm in self.compute_client.virtual_machines.list(resource_group_name=rg)}
        deleted: list[str] = []
        ips_to_delete: set[str] = set()
        nic_polls = []
        for nic in self.network_client.network_interfaces.list(resource_group_name=rg):
            if not self._mine(nic.tags) or nic.virtual_machine is not None:
                continue
            if str(nic.provisioning_state or "").lower() == "deleting":
                continue
            m = _NIC_NAME.match(nic.name or "")
            if m is None:
                continue
            if f"{m['base']}{m['index']}" in vms or self._deployment_running(rg, m["base"]):
                continue  # its VM exists or is being created
            for ipc in nic.ip_configurations or []:
                if ipc.public_ip_address is not None and ipc.public_ip_address.id:
                    ips_to_delete.add(ipc.public_ip_address.id.split("/")[-1])
            log.info("deleting NIC %s: its VM %s%s no longer exists", nic.name, m["base"], m["index"])
            nic_polls.append(self.network_client.network_interfaces.begin_delete(
                resource_group_name=rg, network_interface_name=nic.name))
            deleted.append(nic.name)
        for poll in nic_polls:
            poll.wait(timeout=300)
        for ip in self.network_client.public_ip_addresses.list(resource_group_name=rg):
            if not self._mine(ip.tags) or ip.ip_configuration is not None or ip.name in ips_to_delete:
                continue
            base = re.match(r"^(?P<base>.+?)-ip(?P<index>\d+)$", ip.name or "")
            if base and f"{base['base']}{base['index']}" not in vms and not self._deployment_running(
                    rg, base["base"]):
                ips_to_delete.add(ip.name)
        ip_polls = []
        for name in sorted(ips_to_delete):
            log.info("deleting public IP %s: its VM no longer exists", name)
            ip_polls.append(self.network_client.public_ip_addresses.begin_delete(
                resource_group_name=rg, public_ip_address_name=name))
            deleted.append(name)
        for poll in ip_polls:
            poll.wait(timeout=300)
        return deleted
