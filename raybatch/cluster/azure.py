"""The Azure side of ``raybatch cluster up/down`` that Ray's launcher does not do: the
raybatch server's state directory on a managed disk, so the store survives the head VM
being replaced (Ray deletes the data disks of the VMs it terminates, so ``down`` detaches
this one first).

``ensure_state_disk`` creates the disk ``<cluster_name>-raybatch-state`` in the cluster's
resource group and location (``disks.begin_create_or_update``; size and SKU from the
config's optional ``raybatch: {state_disk_gb: N, state_disk_sku: S}`` block, default 64 GB
Premium_LRS) and attaches it to the head VM at LUN ``STATE_DISK_LUN``
(``virtual_machines.begin_update``); both steps are skipped when already done.
``detach_state_disk`` takes it off the head VM and keeps the disk. The head VM is the VM
Ray tagged ``ray-node-type: head`` and ``ray-cluster-name: <cluster_name>``.

On the VM the disk is ``/dev/disk/azure/scsi1/lun<STATE_DISK_LUN>``; formatting and
mounting it at the state dir is the node side's job (``raybatch cluster head-setup``).

ARM errors become ``ArmError`` with ARM's own code (``arm_error`` reads it, also out of
the nested ``details`` a failed deployment carries).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

log = logging.getLogger("raybatch.cluster.azure")

STATE_DISK_LUN = 10
STATE_DISK_GB = 64
STATE_DISK_SKUS = ("Premium_LRS", "StandardSSD_LRS", "Standard_LRS", "StandardSSD_ZRS", "Premium_ZRS")
STATE_DISK_SKU = "Premium_LRS"
DEVICE = "/dev/disk/azure/scsi1/lun{lun}"
TAG_CLUSTER = "ray-cluster-name"      # = ray.autoscaler.tags.TAG_RAY_CLUSTER_NAME
TAG_NODE_KIND = "ray-node-type"       # = ray.autoscaler.tags.TAG_RAY_NODE_KIND
ROLE_TAG = "raybatch-role"

# Codes ARM wraps the real cause in: the category is the first code below them.
GENERIC_CODES = {"DeploymentFailed", "InvalidTemplateDeployment", "ResourceDeploymentFailure",
                 "Conflict", "BadRequest", "MultipleErrorsOccurred", "OperationFailed",
                 "InternalServerError", "Failed"}


class ArmError(RuntimeError):
    """An Azure Resource Manager request failed; ``code`` is ARM's error code."""

    def __init__(self, what: str, code: str, message: str):
        super().__init__(f"{what}: {code}: {message}")
        self.code = code
        self.message = message


def _error_tree(body: Any) -> Optional[dict]:
    """The ``{"code", "message", "details"}`` object of an ARM error body, if any."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("error"), dict):
        return body["error"]
    props = body.get("properties")
    if isinstance(props, dict) and isinstance(props.get("error"), dict):
        return props["error"]
    if "code" in body:
        return body
    return None


def _codes(err: dict, depth: int = 0) -> list[tuple[str, str]]:
    """(code, message) depth first; a message that is itself an ARM error body (as deployment
    failures nest them) is followed too."""
    if depth > 8 or not isinstance(err, dict):
        return []
    code, message = str(err.get("code") or ""), str(err.get("message") or "")
    out = [(code, message)] if code else []
    for d in err.get("details") or []:
        out += _codes(d, depth + 1)
    if message.lstrip().startswith("{"):
        try:
            inner = _error_tree(json.loads(message))
        except ValueError:
            inner = None
        if inner:
            out += _codes(inner, depth + 1)
    return out


def arm_error(exc: BaseException) -> tuple[str, str]:
    """(ARM error code, message) of an azure-core error: the most specific code (past the
    wrappers a deployment adds), else the HTTP reason, else the exception's class name."""
    tree: Optional[dict] = None
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            tree = _error_tree(response.json())
        except Exception:  # noqa: BLE001 - no JSON body
            tree = None
    if tree is None:
        odata = getattr(exc, "error", None)
        if odata is not None and getattr(odata, "code", None):
            tree = {"code": odata.code, "message": getattr(odata, "message", ""),
                    "details": [{"code": getattr(d, "code", ""), "message": getattr(d, "message", "")}
                                for d in (getattr(odata, "details", None) or [])]}
    codes = _codes(tree) if tree else []
    for code, message in codes:
        if code not in GENERIC_CODES:
            return code, message
    if codes:
        return codes[0]
    status = getattr(exc, "status_code", None)
    reason = getattr(exc, "reason", None)
    if status:
        return f"HTTP{status}", str(reason or exc)
    return type(exc).__name__, str(getattr(exc, "message", None) or exc)


def arm_error_line(exc: BaseException) -> str:
    """``arm_error`` as one line, ``<code>: <message>`` (the message's first line)."""
    code, message = arm_error(exc)
    first = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    return f"{code}: {first}" if first else code


def _compute(config: dict, credential, transport):
    from azure.mgmt.compute import ComputeManagementClient  # noqa: PLC0415

    kwargs = {"transport": transport} if transport is not None else {}
    return ComputeManagementClient(credential, _provider(config)["subscription_id"], **kwargs)


def _provider(config: dict) -> dict:
    p = config.get("provider") or {}
    for key in ("subscription_id", "resource_group", "location"):
        if not isinstance(p.get(key), str) or not p.get(key):
            raise ValueError(f"provider.{key}: required for the state disk (a non-empty string), "
                             f"got {p.get(key)!r}")
    if not config.get("cluster_name"):
        raise ValueError("cluster_name: required (the state disk is named after it)")
    return p


def disk_settings(config: dict) -> tuple[int, str]:
    """(size in GB, SKU) from the config's ``raybatch:`` block, checked."""
    block = config.get("raybatch") or {}
    if not isinstance(block, dict):
        raise ValueError(f"raybatch: must be a mapping (state_disk_gb, state_disk_sku), got {block!r}")
    size = block.get("state_disk_gb", STATE_DISK_GB)
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 32767:
        raise ValueError(f"raybatch.state_disk_gb: must be an integer from 4 to 32767 (GB), got {size!r}")
    sku = block.get("state_disk_sku", STATE_DISK_SKU)
    if sku not in STATE_DISK_SKUS:
        raise ValueError(f"raybatch.state_disk_sku: must be one of {', '.join(STATE_DISK_SKUS)}, got {sku!r}")
    return size, sku


def state_disk_name(config: dict) -> str:
    return f"{config['cluster_name']}-raybatch-state"


def _call(what: str, fn, *args, **kwargs):
    from azure.core.exceptions import AzureError  # noqa: PLC0415

    try:
        return fn(*args, **kwargs)
    except AzureError as e:
        code, message = arm_error(e)
        raise ArmError(what, code, message) from None


def _head_vm(compute, config: dict):
    rg, name = config["provider"]["resource_group"], config["cluster_name"]
    vms = _call(f"list VMs in resource group {rg}",
                lambda: list(compute.virtual_machines.list(resource_group_name=rg)))
    heads = [vm for vm in vms if (vm.tags or {}).get(TAG_NODE_KIND) == "head"
             and (vm.tags or {}).get(TAG_CLUSTER) == name]
    if len(heads) > 1:
        raise ArmError(f"cluster {name}", "SeveralHeads",
                       f"{len(heads)} VMs tagged as its head ({', '.join(v.name for v in heads)})")
    return heads[0] if heads else None


def _same_id(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and a.lower() == b.lower()


def _disk_entry(d) -> dict:
    """An attached data disk as it is sent back in the VM update (all of them are: the update
    replaces the list)."""
    entry: dict[str, Any] = {"lun": d.lun, "createOption": "Attach"}
    if d.name:
        entry["name"] = d.name
    if d.managed_disk is not None and d.managed_disk.id:
        entry["managedDisk"] = {"id": d.managed_disk.id}
    if d.caching:
        entry["caching"] = _plain(d.caching)
    return entry


def _plain(value: Any) -> Any:
    """An SDK enum member as the string ARM sent (str() of one is its Python name)."""
    return getattr(value, "value", value)


def ensure_state_disk(config: dict, *, credential, transport=None) -> dict:
    """Create the state disk if missing and attach it to the head VM if not attached.

    Returns {disk_name, disk_id, size_gb, sku, lun, device, vm_name, created, attached}
    (``created``/``attached``: done by this call). Idempotent."""
    p = _provider(config)
    size, sku = disk_settings(config)
    rg, location, name = p["resource_group"], p["location"], state_disk_name(config)
    compute = _compute(config, credential, transport)
    vm = _head_vm(compute, config)
    if vm is None:
        raise ArmError(f"state disk {name}", "HeadNotFound",
                       f"no VM in resource group {rg} is tagged {TAG_NODE_KIND}=head, "
                       f"{TAG_CLUSTER}={config['cluster_name']} (run after the cluster's head is up)")
    from azure.core.exceptions import AzureError, ResourceNotFoundError  # noqa: PLC0415

    created = False
    try:
        disk = compute.disks.get(resource_group_name=rg, disk_name=name)
    except ResourceNotFoundError:
        disk = None
    except AzureError as e:
        code, message = arm_error(e)
        raise ArmError(f"state disk {name}: get", code, message) from None
    vm_zones = list(vm.zones or [])
    if disk is None:
        body: dict[str, Any] = {
            "location": location,
            "sku": {"name": sku},
            "tags": {TAG_CLUSTER: config["cluster_name"], ROLE_TAG: "state"},
            "properties": {"creationData": {"createOption": "Empty"}, "diskSizeGB": size},
        }
        if vm_zones:  # a zonal VM attaches only disks of its zone
            body["zones"] = vm_zones
        log.info("creating state disk %s (%d GB %s) in %s/%s", name, size, sku, rg, location)
        disk = _call(f"state disk {name}: create",
                     lambda: compute.disks.begin_create_or_update(
                         resource_group_name=rg, disk_name=name, disk=body).result())
        created = True
    disk_zones = list(disk.zones or [])
    if disk_zones and disk_zones != vm_zones:
        raise ArmError(f"state disk {name}", "ZoneMismatch",
                       f"the disk is in zone(s) {','.join(disk_zones)} but head VM {vm.name} is in "
                       f"{','.join(vm_zones) or 'no zone'}; give the head `availability_zone: \"none\"` "
                       "(regional) or move the disk")
    data_disks = list((vm.storage_profile.data_disks if vm.storage_profile else None) or [])
    result = {"disk_name": name, "disk_id": disk.id, "size_gb": disk.disk_size_gb or size,
              "sku": (_plain(disk.sku.name) if disk.sku else sku), "lun": STATE_DISK_LUN,
              "device": DEVICE.format(lun=STATE_DISK_LUN), "vm_name": vm.name, "created": created,
              "attached": False}
    mine = next((d for d in data_disks if d.managed_disk is not None
                 and _same_id(d.managed_disk.id, disk.id)), None)
    if mine is not None:
        result["lun"] = mine.lun
        result["device"] = DEVICE.format(lun=mine.lun)
        return result
    owner = getattr(disk, "managed_by", None)
    if owner and not _same_id(owner, vm.id):
        raise ArmError(f"state disk {name}", "DiskAttachedElsewhere",
                       f"attached to {owner}, not to head VM {vm.name}; detach it there first")
    taken = next((d for d in data_disks if d.lun == STATE_DISK_LUN), None)
    if taken is not None:
        raise ArmError(f"state disk {name}", "LunInUse",
                       f"LUN {STATE_DISK_LUN} of head VM {vm.name} holds disk {taken.name}; "
                       "raybatch attaches its state disk there")
    update = {"storageProfile": {"dataDisks": [_disk_entry(d) for d in data_disks] + [
        {"lun": STATE_DISK_LUN, "name": name, "createOption": "Attach", "caching": "None",
         "managedDisk": {"id": disk.id}}]}}
    log.info("attaching state disk %s to %s at LUN %d", name, vm.name, STATE_DISK_LUN)
    _call(f"state disk {name}: attach to {vm.name}",
          lambda: compute.virtual_machines.begin_update(
              resource_group_name=rg, vm_name=vm.name, parameters=update).result())
    result["attached"] = True
    return result


def detach_state_disk(config: dict, *, credential, transport=None) -> dict:
    """Take the state disk off the head VM (before ``ray down``, which deletes the data disks
    of the VMs it terminates). The disk itself is kept. Returns {disk_name, vm_name, detached}."""
    p = _provider(config)
    rg, name = p["resource_group"], state_disk_name(config)
    compute = _compute(config, credential, transport)
    vm = _head_vm(compute, config)
    if vm is None:
        return {"disk_name": name, "vm_name": None, "detached": False}
    data_disks = list((vm.storage_profile.data_disks if vm.storage_profile else None) or [])
    keep = [d for d in data_disks if not (d.name == name or (
        d.managed_disk is not None and (d.managed_disk.id or "").lower().endswith(f"/disks/{name}".lower())))]
    if len(keep) == len(data_disks):
        return {"disk_name": name, "vm_name": vm.name, "detached": False}
    update = {"storageProfile": {"dataDisks": [_disk_entry(d) for d in keep]}}
    log.info("detaching state disk %s from %s", name, vm.name)
    _call(f"state disk {name}: detach from {vm.name}",
          lambda: compute.virtual_machines.begin_update(
              resource_group_name=rg, vm_name=vm.name, parameters=update).result())
    return {"disk_name": name, "vm_name": vm.name, "detached": True}
