"""raybatch's ARM-facing code against a fake Azure Resource Manager (tests/fake_arm.py):
Azure cannot be reached from here, so the azure-mgmt clients get a requests transport that
answers with JSON in the shape Azure's REST reference documents, with a fake credential and
no IMDS probe; the tests assert what was *sent*. Nothing leaves loopback (an autouse fixture
refuses any other connection).

Covered: Ray's ``bootstrap_azure`` (run by ``ray up`` for raybatch's provider subclass) and
the subclass's ``create_node`` (the VM deployment's parameters for dedicated, Spot and head
types; ARM error codes as ``NodeLaunchException`` categories, also from the nested
details a failed deployment carries); the clean-up of NICs left by evicted VMs; the state
disk of ``raybatch cluster up/down`` (create, attach, detach, idempotent)."""

from __future__ import annotations

import copy
import json
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("azure.mgmt.compute")

import ray.autoscaler._private._azure.config as ray_azure_config  # noqa: E402
import ray.autoscaler._private._azure.node_provider as ray_azure_provider  # noqa: E402
from azure.mgmt.compute import ComputeManagementClient  # noqa: E402
from azure.mgmt.network import NetworkManagementClient  # noqa: E402
from azure.mgmt.resource import ResourceManagementClient  # noqa: E402
from ray.autoscaler.node_launch_exception import NodeLaunchException  # noqa: E402

from raybatch.cluster import azure, configs  # noqa: E402
from raybatch.cluster.azure_provider import RaybatchAzureNodeProvider, tag_network_resources  # noqa: E402
from tests.fake_arm import SUBSCRIPTION, FakeArm, FakeCredential  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "cluster_configs"
RG = "raybatch-spot-rg"
RGP = rf"/subscriptions/{SUBSCRIPTION}/resourcegroups/{RG}"
CLUSTER = "raybatch-spot"
NET = "/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Network" % (SUBSCRIPTION, RG)
COMPUTE = "/subscriptions/%s/resourceGroups/%s/providers/Microsoft.Compute" % (SUBSCRIPTION, RG)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and "/" not in host:
            raise AssertionError(f"a test tried to reach {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def arm(monkeypatch):
    arm = FakeArm()

    def client(cls):
        return lambda credential, subscription_id, **kw: cls(credential, subscription_id,
                                                              transport=arm.transport(), **kw)

    for module in (ray_azure_provider, ray_azure_config):
        for cls in (ComputeManagementClient, NetworkManagementClient, ResourceManagementClient):
            if hasattr(module, cls.__name__):
                monkeypatch.setattr(module, cls.__name__, client(cls))
    monkeypatch.setattr(ray_azure_provider, "DefaultAzureCredential", lambda **kw: FakeCredential())
    monkeypatch.setattr(ray_azure_config, "AzureCliCredential", lambda **kw: FakeCredential())
    monkeypatch.setattr(ray_azure_provider, "get_cloud_from_metadata_requests", lambda: "unknown")
    arm.route("GET", r"/providers/Microsoft.Compute/skus$", {"value": []})  # no zones: regional VMs
    return arm


@pytest.fixture
def config(tmp_path):
    c = configs.load(ROOT / "azure-spot.yaml")
    c["provider"]["subscription_id"] = SUBSCRIPTION
    (tmp_path / "id").write_text("PRIVATE")
    (tmp_path / "id.pub").write_text("ssh-rsa AAAAB3Nza test@raybatch")
    c["auth"]["ssh_private_key"] = str(tmp_path / "id")
    c["auth"]["ssh_public_key"] = str(tmp_path / "id.pub")
    return c


def deployment_done(sent):
    return {"id": sent.path, "name": sent.path.split("/")[-1],
            "properties": {"provisioningState": "Succeeded", "outputs": {}}}


def bootstrap(arm, config) -> dict:
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import prepare_config

    arm.route("PUT", rf"{RGP}$", {"id": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RG}", "name": RG,
                                  "location": "westus2", "properties": {"provisioningState": "Succeeded"}})
    arm.route("GET", rf"{RGP}/resources$", {"value": []})
    outputs = {"msi": {"type": "String", "value": f"{RGP}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/msi"},
               "nsg": {"type": "String", "value": f"{NET}/networkSecurityGroups/nsg"},
               "subnet": {"type": "String", "value": f"{NET}/virtualNetworks/vnet/subnets/subnet"}}
    arm.long_running("PUT", rf"{RGP}/providers/Microsoft.Resources/deployments/ray-config$")
    arm.route("GET", rf"{RGP}/providers/Microsoft.Resources/deployments/ray-config$",
              {"name": "ray-config", "properties": {"provisioningState": "Succeeded", "outputs": outputs}})
    # what `ray up` runs: prepare_config, then the provider class's bootstrap_config
    return _bootstrap_config(prepare_config(copy.deepcopy(config)), no_config_cache=True)


def provider(bootstrapped) -> RaybatchAzureNodeProvider:
    p = RaybatchAzureNodeProvider(bootstrapped["provider"], bootstrapped["cluster_name"])
    p._swept_at = time.monotonic()  # these tests look at launches; the sweep has its own
    return p


def node_config(bootstrapped, node_type):
    return copy.deepcopy(bootstrapped["available_node_types"][node_type]["node_config"])


def tags(kind, node_type):
    return {"ray-node-type": kind, "ray-node-name": f"ray-{CLUSTER}-{kind}", "ray-user-node-type": node_type,
            "ray-launch-config": "abc"}


def sent_parameters(arm) -> list[dict]:
    return [{k: v["value"] for k, v in s.body["properties"]["parameters"].items()}
            for s in arm.requests_to("PUT", r"/deployments/ray-raybatch-spot-")]


# ---------------------------------------------------------------- bootstrap and launches

def test_ray_loads_the_subclass_and_bootstrap_azure_runs_for_it(arm, config):
    from ray.autoscaler._private.providers import _get_node_provider_cls

    assert _get_node_provider_cls(config["provider"]) is RaybatchAzureNodeProvider
    out = bootstrap(arm, config)
    rg_put = arm.requests_to("PUT", rf"{RGP}$")
    assert [s.body for s in rg_put] == [{"location": "westus2"}]
    deploy = arm.requests_to("PUT", r"/deployments/ray-config$")[0].body["properties"]
    assert deploy["mode"] == "Incremental"
    params = {k: v["value"] for k, v in deploy["parameters"].items()}
    assert params["clusterId"] == f"{CLUSTER}-{out['provider']['unique_id']}" and params["createMsi"] is True
    assert out["provider"]["subnet"].endswith("/subnets/subnet") and out["provider"]["nsg"].endswith("/nsg")
    for t in out["available_node_types"].values():
        arm_params = t["node_config"]["azure_arm_parameters"]
        assert arm_params["adminUsername"] == "azureuser"
        assert arm_params["publicKey"] == "ssh-rsa AAAAB3Nza test@raybatch"
    assert all(s.headers.get("Authorization") == "Bearer fake-token" for s in arm.sent)


def test_create_node_sends_spot_dedicated_and_head_parameters(arm, config):
    out = bootstrap(arm, config)
    arm.long_running("PUT", rf"{RGP}/providers/Microsoft.Resources/deployments/ray-raybatch-spot-[^/]+$")
    arm.route("GET", rf"{RGP}/providers/Microsoft.Resources/deployments/ray-raybatch-spot-[^/]+$", deployment_done)
    p = provider(out)
    p.create_node(node_config(out, "cpu_spot"), tags("worker", "cpu_spot"), 2)
    p.create_node(node_config(out, "cpu_dedicated"), tags("worker", "cpu_dedicated"), 1)
    p.create_node(node_config(out, "head"), tags("head", "head"), 1)
    spot, dedicated, head = sent_parameters(arm)

    image = {"imagePublisher": "microsoft-dsvm", "imageOffer": "ubuntu-hpc", "imageSku": "2204",
             "imageVersion": "latest"}
    assert {k: spot[k] for k in image} == image and {k: head[k] for k in image} == image
    assert spot["vmSize"] == dedicated["vmSize"] == "Standard_D16s_v5" and head["vmSize"] == "Standard_D4s_v5"
    assert (spot["priority"], spot["evictionPolicy"], spot["billingProfile"]) == ("Spot", "Delete", {"maxPrice": -1})
    assert "priority" not in dedicated and "billingProfile" not in dedicated  # the template's Regular
    assert spot["vmCount"] == 2 and dedicated["vmCount"] == 1
    assert spot["vmTags"]["ray-cluster-name"] == CLUSTER and spot["vmTags"]["ray-user-node-type"] == "cpu_spot"
    # workers: private IPs only; the head: a public IP (use_external_head_ip)
    assert (spot["provisionPublicIp"], dedicated["provisionPublicIp"], head["provisionPublicIp"]) == (False, False, True)
    assert spot["subnet"] == out["provider"]["subnet"] and spot["msi"] == out["provider"]["msi"]
    assert "availability_zone" not in head and head["zones"] == []
    # the VMs' tags are put on their NICs and public IPs too (what the orphan sweep keys on)
    body = arm.requests_to("PUT", r"/deployments/ray-raybatch-spot-")[0].body
    tagged = {r["type"]: r.get("tags") for r in body["properties"]["template"]["resources"]}
    assert tagged == {"Microsoft.Network/networkInterfaces": "[parameters('vmTags')]",
                      "Microsoft.Network/publicIpAddresses": "[parameters('vmTags')]",
                      "Microsoft.Compute/virtualMachines": "[parameters('vmTags')]"}


def test_tagging_leaves_other_deployments_alone():
    other = {"properties": {"template": {"resources": [{"type": "Microsoft.Network/networkInterfaces"}]},
                            "parameters": {"subnet": {"value": "x"}}}}
    assert tag_network_resources(other) is other


NESTED = json.dumps({"status": "Failed", "error": {
    "code": "ResourceDeploymentFailure", "message": "The resource operation completed with terminal provisioning state 'Failed'.",
    "details": [{"code": "AllocationFailed", "message": "Allocation failed. We do not have sufficient capacity for the requested VM size in this region."}]}})


@pytest.mark.parametrize("how,code", [
    ("put", "QuotaExceeded"),
    ("validation", "SkuNotAvailable"),
    ("async", "AllocationFailed"),
    ("async-plain", "OverconstrainedAllocationRequest"),
])
def test_a_failed_launch_raises_node_launch_exception_with_the_arm_code(arm, config, how, code):
    out = bootstrap(arm, config)
    path = rf"{RGP}/providers/Microsoft.Resources/deployments/ray-raybatch-spot-[^/]+$"
    if how == "put":
        arm.error("PUT", path, 409, "QuotaExceeded", "Operation could not be completed as it results in "
                  "exceeding approved standardDSv5Family Cores quota. Current Limit: 10, Current Usage: 8.")
    elif how == "validation":
        arm.route("PUT", path, {"error": {"code": "InvalidTemplateDeployment", "message": "The template deployment is not valid.",
                                          "details": [{"code": "SkuNotAvailable", "message": "The requested VM size Standard_D16s_v5 is currently not available in location 'westus2'."}]}},
                  status=400)
    elif how == "async":
        arm.long_running("PUT", path, status="Failed", error={
            "code": "DeploymentFailed", "message": "At least one resource deployment operation failed.",
            "details": [{"code": "Conflict", "message": NESTED}]})
    else:
        arm.long_running("PUT", path, status="Failed", error={
            "code": "OverconstrainedAllocationRequest", "message": "Allocation failed. VM(s) with the following constraints cannot be allocated."})
    p = provider(out)
    with pytest.raises(NodeLaunchException) as e:
        p.create_node(node_config(out, "cpu_spot"), tags("worker", "cpu_spot"), 1)
    assert e.value.category == code
    assert e.value.description.startswith("1 x Standard_D16s_v5 in westus2: ")
    assert e.value.src_exc_info is not None


def test_the_autoscalers_launch_failure_names_the_arm_code(arm, config):
    """Ray's NodeLauncher records the category: what `ray status` and raybatch's launch
    failures (the __autoscaling_status KV) show."""
    from ray.autoscaler._private.event_summarizer import EventSummarizer
    from ray.autoscaler._private.node_launcher import BaseNodeLauncher
    from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
    from ray.autoscaler._private.prom_metrics import AutoscalerPrometheusMetrics
    from ray.autoscaler._private.util import ConcurrentCounter

    out = bootstrap(arm, config)
    arm.error("PUT", r"/deployments/ray-raybatch-spot-[^/]+$", 409, "QuotaExceeded", "Cores quota exceeded.")
    tracker = NodeProviderAvailabilityTracker()
    events = EventSummarizer()
    launcher = BaseNodeLauncher(provider=provider(out), pending=ConcurrentCounter(), event_summarizer=events,
                                node_provider_availability_tracker=tracker, session_name="s",
                                prom_metrics=AutoscalerPrometheusMetrics(), node_types=out["available_node_types"])
    launcher.pending.inc("cpu_spot", 1)  # as the autoscaler does before handing the launch over
    launcher.launch_node(out, 1, "cpu_spot")
    summary = tracker.summary().node_availabilities["cpu_spot"]
    assert summary.is_available is False
    assert summary.unavailable_node_information.category == "QuotaExceeded"
    assert any("(QuotaExceeded)" in m for m in events.summary())


# ---------------------------------------------------------------- orphan NICs

def nic(name, cluster=CLUSTER, vm=None, public_ip=None):
    ipc = {"name": "ipc", "properties": {"privateIPAddress": "10.1.0.9"}}
    if public_ip:
        ipc["properties"]["publicIPAddress"] = {"id": f"{NET}/publicIPAddresses/{public_ip}"}
    body = {"name": name, "id": f"{NET}/networkInterfaces/{name}",
            "properties": {"provisioningState": "Succeeded", "ipConfigurations": [ipc]}}
    if cluster is not None:
        body["tags"] = {"ray-cluster-name": cluster, "ray-node-type": "worker"}
    if vm:
        body["properties"]["virtualMachine"] = {"id": f"{COMPUTE}/virtualMachines/{vm}"}
    return body


def vm(name, kind="worker", cluster=CLUSTER, data_disks=(), zones=None):
    body = {"name": name, "id": f"{COMPUTE}/virtualMachines/{name}", "location": "westus2",
            "tags": {"ray-cluster-name": cluster, "ray-node-type": kind},
            "properties": {"storageProfile": {"dataDisks": list(data_disks)},
                           "networkProfile": {"networkInterfaces": [{"id": f"{NET}/networkInterfaces/{name}-nic"}]}}}
    if zones:
        body["zones"] = zones
    return body


W = "ray-raybatch-spot-worker-ab12"


def orphan_world(arm):
    arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/virtualMachines$", {"value": [vm(f"{W}-live0")]})
    arm.route("GET", rf"{RGP}/providers/Microsoft.Network/networkInterfaces$", {"value": [
        nic(f"{W}-evicted-nic0"),                                          # orphan: deleted
        nic(f"{W}-live-nic0", vm=f"{W}-live0"),                            # attached: kept
        nic(f"{W}-live-nic1"),                                             # its VM live1 was evicted
        nic(f"{W}-busy-nic0"),                                             # deployment running: kept
        nic(f"{W}-gone-nic-public0", public_ip=f"{W}-gone-ip0"),           # orphan with a public IP
        nic("ray-other-worker-ab12-x1-nic0", cluster="other"),             # another cluster's: kept
        nic("someones-nic0", cluster=None),                                # untagged: kept
    ]})
    arm.route("GET", rf"{RGP}/providers/Microsoft.Resources/deployments/{W}-busy$",
              {"name": f"{W}-busy", "properties": {"provisioningState": "Running"}})
    arm.route("GET", rf"{RGP}/providers/Microsoft.Network/publicIPAddresses$", {"value": [
        {"name": f"{W}-gone-ip0", "tags": {"ray-cluster-name": CLUSTER},
         "properties": {"ipConfiguration": {"id": f"{NET}/networkInterfaces/{W}-gone-nic-public0/ipConfigurations/ipc"}}},
        {"name": f"{W}-stray-ip0", "tags": {"ray-cluster-name": CLUSTER}, "properties": {}},
        {"name": "ray-other-worker-ab12-x1-ip0", "tags": {"ray-cluster-name": "other"}, "properties": {}},
        {"name": f"{W}-live-ip0", "tags": {"ray-cluster-name": CLUSTER}, "properties": {}},
    ]})
    arm.route("DELETE", r"/networkInterfaces/[^/]+$", None, status=200)
    arm.route("DELETE", r"/publicIPAddresses/[^/]+$", None, status=200)


def test_orphan_sweep_removes_only_this_clusters_nics_whose_vm_is_gone(arm, config):
    out = bootstrap(arm, config)
    orphan_world(arm)
    p = provider(out)
    deleted = p.remove_orphan_nics()
    assert [s.path.split("/")[-1] for s in arm.requests_to("DELETE", r"/networkInterfaces/")] == [
        f"{W}-evicted-nic0", f"{W}-live-nic1", f"{W}-gone-nic-public0"]
    assert [s.path.split("/")[-1] for s in arm.requests_to("DELETE", r"/publicIPAddresses/")] == [
        f"{W}-gone-ip0", f"{W}-stray-ip0"]
    assert sorted(deleted) == sorted([f"{W}-evicted-nic0", f"{W}-live-nic1", f"{W}-gone-nic-public0",
                                      f"{W}-gone-ip0", f"{W}-stray-ip0"])
    # NICs go before the public IPs they held (an attached IP cannot be deleted)
    kinds = [("nic" if "networkInterfaces" in s.path else "ip") for s in arm.sent if s.method == "DELETE"]
    assert kinds == ["nic", "nic", "nic", "ip", "ip"]


def test_non_terminated_nodes_starts_the_sweep_at_most_once_per_interval(arm, config):
    out = bootstrap(arm, config)
    orphan_world(arm)
    arm.route("GET", rf"{COMPUTE}/virtualMachines/[^/]+/instanceView$", {"statuses": [{"code": "PowerState/running"}]})
    arm.route("GET", rf"{NET}/networkInterfaces/{W}-live0-nic$", nic(f"{W}-live0-nic", vm=f"{W}-live0"))
    p = RaybatchAzureNodeProvider(out["provider"], CLUSTER)
    assert p.non_terminated_nodes({}) == [f"{W}-live0"]
    p._sweep.result(timeout=30)
    assert len(arm.requests_to("DELETE", r"/networkInterfaces/")) == 3
    p.non_terminated_nodes({})
    assert p.start_orphan_sweep() is None  # swept less than ORPHAN_SWEEP_INTERVAL_S ago
    assert len(arm.requests_to("GET", r"/networkInterfaces$")) == 1


def test_a_failing_sweep_never_breaks_the_autoscaler(arm, config):
    out = bootstrap(arm, config)
    arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/virtualMachines$", {"value": []})
    arm.error("GET", rf"{RGP}/providers/Microsoft.Network/networkInterfaces$", 403, "AuthorizationFailed",
              "The client does not have authorization to perform action 'Microsoft.Network/networkInterfaces/read'.")
    p = RaybatchAzureNodeProvider(out["provider"], CLUSTER)
    assert p.non_terminated_nodes({}) == []
    assert p._sweep.result(timeout=30) == []


# ---------------------------------------------------------------- the state disk

DISK = f"{CLUSTER}-raybatch-state"
DISK_ID = f"{COMPUTE}/disks/{DISK}"
USER_DISK = {"lun": 0, "name": "scratch", "createOption": "Attach", "caching": "ReadOnly",
             "managedDisk": {"id": f"{COMPUTE}/disks/scratch"}}
STATE_ENTRY = {"lun": 10, "name": DISK, "createOption": "Attach", "caching": "None", "managedDisk": {"id": DISK_ID}}


def disk_world(arm, attached=False, exists=False, zones=None):
    head = vm("ray-raybatch-spot-head-ab12-aaaa0", kind="head",
              data_disks=[USER_DISK] + ([STATE_ENTRY] if attached else []), zones=zones)
    arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/virtualMachines$", {"value": [
        vm("ray-other-head-ab12-bbbb0", kind="head", cluster="other"), vm(f"{W}-live0"), head]})
    disk = {"name": DISK, "id": DISK_ID, "location": "westus2", "sku": {"name": "Premium_LRS"},
            "properties": {"diskSizeGB": 64, "provisioningState": "Succeeded"}}
    if zones:
        disk["zones"] = zones
    if exists:
        arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/disks/{DISK}$", disk)
    else:
        arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/disks/{DISK}$", disk)
        arm.error("GET", rf"{RGP}/providers/Microsoft.Compute/disks/{DISK}$", 404, "ResourceNotFound",
                  f"The Resource 'Microsoft.Compute/disks/{DISK}' was not found.", times=1)
    # ARM answers 201 with the resource being created, then the operation's status
    arm.long_running("PUT", rf"{RGP}/providers/Microsoft.Compute/disks/{DISK}$",
                     {**disk, "properties": {**disk["properties"], "provisioningState": "Updating"}},
                     initial_status=202)
    arm.long_running("PATCH", rf"{RGP}/providers/Microsoft.Compute/virtualMachines/{head['name']}$",
                     {**head, "properties": {**head["properties"], "provisioningState": "Updating"}},
                     initial_status=200)
    arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/virtualMachines/{head['name']}$", head)
    return head


def disk_config(config, **raybatch):
    c = copy.deepcopy(config)
    if raybatch:
        c["raybatch"] = raybatch
    return c


def test_ensure_state_disk_creates_and_attaches(arm, config):
    head = disk_world(arm)
    out = azure.ensure_state_disk(config, credential=FakeCredential(), transport=arm.transport())
    [put] = arm.requests_to("PUT", r"/disks/")
    assert put.body == {"location": "westus2", "sku": {"name": "Premium_LRS"},
                        "tags": {"ray-cluster-name": CLUSTER, "raybatch-role": "state"},
                        "properties": {"creationData": {"createOption": "Empty"}, "diskSizeGB": 64}}
    [patch] = arm.requests_to("PATCH", r"/virtualMachines/")
    assert patch.path.endswith(head["name"])
    # the update replaces the list: the VM's other data disk is sent back unchanged
    assert patch.body == {"storageProfile": {"dataDisks": [USER_DISK, STATE_ENTRY]}}
    assert out == {"disk_name": DISK, "disk_id": DISK_ID, "size_gb": 64, "sku": "Premium_LRS", "lun": 10,
                   "device": "/dev/disk/azure/scsi1/lun10", "vm_name": head["name"], "created": True,
                   "attached": True}


def test_ensure_state_disk_is_idempotent(arm, config):
    disk_world(arm, attached=True, exists=True)
    out = azure.ensure_state_disk(config, credential=FakeCredential(), transport=arm.transport())
    assert (out["created"], out["attached"], out["lun"]) == (False, False, 10)
    assert not arm.requests_to("PUT", r"/disks/") and not arm.requests_to("PATCH", r"/virtualMachines/")


def test_an_existing_detached_disk_is_attached_not_recreated(arm, config):
    disk_world(arm, exists=True)
    out = azure.ensure_state_disk(config, credential=FakeCredential(), transport=arm.transport())
    assert (out["created"], out["attached"]) == (False, True)
    assert not arm.requests_to("PUT", r"/disks/") and len(arm.requests_to("PATCH", r"/virtualMachines/")) == 1


def test_state_disk_size_sku_and_zone_follow_config_and_head(arm, config):
    disk_world(arm, zones=["2"])
    azure.ensure_state_disk(disk_config(config, state_disk_gb=256, state_disk_sku="StandardSSD_LRS"),
                            credential=FakeCredential(), transport=arm.transport())
    [put] = arm.requests_to("PUT", r"/disks/")
    assert (put.body["properties"]["diskSizeGB"], put.body["sku"], put.body["zones"]) == (
        256, {"name": "StandardSSD_LRS"}, ["2"])


@pytest.mark.parametrize("block,message", [
    ({"state_disk_gb": 2}, r"raybatch.state_disk_gb: must be an integer from 4 to 32767 \(GB\), got 2"),
    ({"state_disk_gb": "64"}, r"raybatch.state_disk_gb: must be an integer"),
    ({"state_disk_sku": "UltraSSD_LRS"}, r"raybatch.state_disk_sku: must be one of Premium_LRS, .* got 'UltraSSD_LRS'"),
])
def test_bad_state_disk_settings_are_named(arm, config, block, message):
    with pytest.raises(ValueError, match=message):
        azure.ensure_state_disk(disk_config(config, **block), credential=FakeCredential(), transport=arm.transport())
    assert arm.sent == []


def test_state_disk_errors_carry_the_arm_code(arm, config):
    disk_world(arm)
    arm.error("PUT", rf"/disks/{DISK}$", 409, "OperationNotAllowed",
              "Operation results in exceeding quota limits of Premium Storage.")
    with pytest.raises(azure.ArmError) as e:
        azure.ensure_state_disk(config, credential=FakeCredential(), transport=arm.transport())
    assert e.value.code == "OperationNotAllowed"
    assert str(e.value) == (f"state disk {DISK}: create: OperationNotAllowed: Operation results in "
                            "exceeding quota limits of Premium Storage.")


def test_no_head_vm_is_a_clear_error(arm, config):
    arm.route("GET", rf"{RGP}/providers/Microsoft.Compute/virtualMachines$", {"value": [vm(f"{W}-live0")]})
    with pytest.raises(azure.ArmError, match=r"HeadNotFound: no VM in resource group raybatch-spot-rg is tagged "
                       r"ray-node-type=head, ray-cluster-name=raybatch-spot"):
        azure.ensure_state_disk(config, credential=FakeCredential(), transport=arm.transport())


def test_detach_keeps_the_disk_and_is_idempotent(arm, config):
    head = disk_world(arm, attached=True, exists=True)
    out = azure.detach_state_disk(config, credential=FakeCredential(), transport=arm.transport())
    assert out == {"disk_name": DISK, "vm_name": head["name"], "detached": True}
    [patch] = arm.requests_to("PATCH", r"/virtualMachines/")
    assert patch.body == {"storageProfile": {"dataDisks": [USER_DISK]}}
    assert not [s for s in arm.sent if s.method == "DELETE"]

    disk_world(arm, attached=False, exists=True)
    again = azure.detach_state_disk(config, credential=FakeCredential(), transport=arm.transport())
    assert again == {"disk_name": DISK, "vm_name": head["name"], "detached": False}
    assert len(arm.requests_to("PATCH", r"/virtualMachines/")) == 1


def test_arm_error_reads_nested_deployment_errors():
    class Resp:
        def __init__(self, body):
            self.body = body

        def json(self):
            return self.body

    class Err(Exception):
        def __init__(self, body):
            self.response = Resp(body)

    assert azure.arm_error(Err({"status": "Failed", "error": {"code": "DeploymentFailed", "message": "x",
                                                              "details": [{"code": "Conflict", "message": NESTED}]}}))[0] \
        == "AllocationFailed"
    assert azure.arm_error(Err({"error": {"code": "DeploymentFailed", "message": "only wrappers"}})) == \
        ("DeploymentFailed", "only wrappers")
    assert azure.arm_error(Err(None))[0] == "Err"
