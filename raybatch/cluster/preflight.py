"""Pre-flight checks of an Azure cluster config (``raybatch cluster check FILE``; also the
first step of ``raybatch cluster up``): what would make ``ray up`` fail, or leave a node
type unable to launch, found before anything is created.

How the Ray cluster YAML maps to the checks:

- ``provider.subscription_id``, ``provider.location``, ``provider.resource_group``: where;
  the resource group must exist (``resource_groups.check_existence``) — Ray would
  otherwise create it, usually a typo.
- Credentials: ``DefaultAzureCredential().get_token(management scope)`` must succeed (Ray's
  node provider uses it on the head), and ``az account show`` must exit 0 (Ray's
  ``bootstrap_azure`` uses ``AzureCliCredential``: ``ray up`` needs ``az login``).
- ``available_node_types.<t>.node_config.azure_arm_parameters``: ``vmSize`` must be a
  virtual-machine SKU of the location (``resource_skus.list(filter="location eq '<r>'")``)
  without a ``NotAvailableForSubscription`` restriction — of type ``Location`` (the size
  cannot be used in the region) or ``Zone`` (the zones Ray would spread the VMs over, i.e.
  ``availability_zone`` or, without it, every zone of the size, include a restricted one);
  a spot type (``fit.is_spot_type``: ``priority: Spot``, the older ``Low``, or the
  low-priority marks) needs the SKU's ``LowPriorityCapable``;
  ``<t>.resources`` ``CPU``/``GPU`` are compared with the SKU's ``vCPUs``/``GPUs``: more than
  the VM has is an error (the scheduler would place work that cannot run), fewer is a
  warning (capacity left idle), except ``CPU: 0``, raybatch's way of keeping work off the head.
- Image generation (``HyperVGenerations``): the image's generation is looked up, not guessed
  from its name — ``virtual_machine_images.get`` of ``imagePublisher:imageOffer:imageSku`` at
  ``imageVersion`` (``latest``: the highest version ``virtual_machine_images.list`` returns)
  gives ``hyperVGeneration``; a SKU whose ``HyperVGenerations`` lacks it is an error (a
  Gen2-only size with a Gen1 image fails at creation). An image that does not exist in the
  location is an error. Images given by ``imageId`` (galleries, managed images) are not
  looked up: their generation is not checked.
- Quota (``usage.list(location)``, free = ``limit - currentValue``): dedicated VMs count
  against the regional ``cores`` and their SKU ``family`` (e.g. ``standardNCASv3_T4Family``),
  Spot VMs against ``lowPriorityCores``. The head plus every type's ``min_workers`` must fit
  (error); the most the autoscaler may launch — each type's ``max_workers``, the total capped
  by the top-level ``max_workers``, largest VMs first — should fit (warning). The quota's
  ``currentValue`` includes VMs of this cluster when it is already up, so on a re-``up`` the
  numbers are conservative.

The Azure SDK is imported inside the functions: ``raybatch --help`` stays fast and a missing
``azure`` extra is one problem that says ``pip install 'raybatch[azure]'``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Union

from raybatch.cluster.azure import arm_error_line
from raybatch.scheduler.fit import is_spot_type

MANAGEMENT_SCOPE = "https://management.azure.com/.default"
INSTALL_HINT = "pip install 'raybatch[azure]'"
UNAVAILABLE = "NotAvailableForSubscription"


@dataclass(frozen=True)
class Problem:
    """One finding: ``str()`` is one line, ``<type> <field>: <what is wrong> (<numbers>)``;
    ``node_type`` is None for what concerns the whole cluster."""

    level: str  # "error" | "warning"
    node_type: Optional[str]
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.node_type + ' ' if self.node_type else ''}{self.field}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _error(node_type: Optional[str], field: str, message: str) -> Problem:
    return Problem("error", node_type, field, message)


def _warning(node_type: Optional[str], field: str, message: str) -> Problem:
    return Problem("warning", node_type, field, message)


# ---------------------------------------------------------------- the config


@dataclass
class NodeType:
    name: str
    vm_size: Optional[str]
    spot: bool
    cpus: Optional[float]
    gpus: Optional[float]
    min_workers: int
    max_workers: int
    is_head: bool
    image: Optional[tuple[str, str, str, str]]  # publisher, offer, sku, version
    zones: Optional[list[str]]  # None: no zones ("none"); []: every zone of the size; else these


def _zones(value: Any) -> Optional[list[str]]:
    """Ray's reading of ``availability_zone`` (``_parse_availability_zones``)."""
    if value is None:
        return []
    parts = [z.strip() for z in str(value).split(",") if z.strip()]
    if len(parts) == 1 and parts[0].lower() in ("none", "null"):
        return None
    if len(parts) == 1 and parts[0].lower() == "auto":
        return []
    return parts


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def node_types(config: dict) -> tuple[list[NodeType], list[Problem]]:
    """The config's node types as the checks need them, and what is missing to check them."""
    problems: list[Problem] = []
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        return [], [_error(None, "available_node_types", "missing or empty: list the head and worker types")]
    head = config.get("head_node_type")
    if head not in types:
        problems.append(_error(None, "head_node_type",
                               f"{head!r} is not one of available_node_types ({', '.join(types)})"))
    provider = config.get("provider") or {}
    global_max = config.get("max_workers")
    out = []
    for name, t in types.items():
        t = t if isinstance(t, dict) else {}
        params = (t.get("node_config") or {}).get("azure_arm_parameters") or {}
        size = params.get("vmSize")
        if not size:
            problems.append(_error(name, "node_config.azure_arm_parameters.vmSize", "missing"))
        resources = t.get("resources") or {}
        image = None
        if not params.get("imageId") and all(params.get(k) for k in ("imagePublisher", "imageOffer", "imageSku")):
            image = (params["imagePublisher"], params["imageOffer"], params["imageSku"],
                     str(params.get("imageVersion") or "latest"))
        zone_value = params.get("availability_zone", provider.get("availability_zone"))
        out.append(NodeType(
            name=name, vm_size=size, spot=is_spot_type(t),
            cpus=resources.get("CPU"), gpus=resources.get("GPU"),
            min_workers=_int(t.get("min_workers"), 0),
            max_workers=_int(t.get("max_workers"), _int(global_max, 0)),
            is_head=name == head, image=image, zones=_zones(zone_value)))
    return out, problems


# ---------------------------------------------------------------- Azure calls


AzLoggedIn = Union[bool, Callable[[], bool], None]


def az_cli_logged_in() -> tuple[bool, str]:
    """(logged in, why not): ``az account show`` exits 0 when ``az login`` was done."""
    try:
        r = subprocess.run(["az", "account", "show", "--output", "none"], capture_output=True, text=True,
                           timeout=60)
    except FileNotFoundError:
        return False, "the Azure CLI (az) is not installed; install it and run `az login`"
    except subprocess.TimeoutExpired:
        return False, "`az account show` did not answer within 60 s"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"`az account show` exited {r.returncode} ({last}); run `az login`"
    return True, ""


def _capabilities(sku) -> dict[str, str]:
    return {c.name: str(c.value) for c in (sku.capabilities or []) if c.name}


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value))


def _number(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def check(config: dict, *, credential=None, transport=None, az_logged_in: AzLoggedIn = None) -> list[Problem]:
    """Every problem found in ``config`` (a Ray cluster YAML read as a dict) against the
    subscription: errors would make ``ray up`` fail or a type unable to launch, warnings
    are limits it may run into. ``credential`` (default ``DefaultAzureCredential()``) and
    ``transport`` (azure-core; default the network) are what tests replace;
    ``az_logged_in``: a bool or a callable returning one (default: run ``az account show``)."""
    problems: list[Problem] = []
    provider = config.get("provider") or {}
    ptype = str(provider.get("type", ""))
    if ptype != "azure" and not (ptype == "external" and "azure" in str(provider.get("module", "")).lower()):
        return [_error(None, "provider.type", f"{ptype or '(missing)'!s}: pre-flight checks Azure configs "
                       "only (type: azure, or an external Azure provider)")]
    for key in ("subscription_id", "location", "resource_group"):
        if not provider.get(key):
            problems.append(_error(None, f"provider.{key}", "missing"))
    types, type_problems = node_types(config)
    problems += type_problems

    # az login (Ray's bootstrap uses the CLI's credential)
    if az_logged_in is None:
        ok, why = az_cli_logged_in()
    else:
        ok = az_logged_in() if callable(az_logged_in) else bool(az_logged_in)
        why = "run `az login`"
    if not ok:
        problems.append(_error(None, "az login", f"the Azure CLI is not logged in: {why}"))

    try:
        from azure.core.exceptions import HttpResponseError  # noqa: PLC0415
        from azure.mgmt.compute import ComputeManagementClient  # noqa: PLC0415
        from azure.mgmt.resource import ResourceManagementClient  # noqa: PLC0415
    except ImportError as e:
        return problems + [_error(None, "azure", f"the Azure SDK is not installed ({e.name}): {INSTALL_HINT}")]

    if credential is None:
        try:
            from azure.identity import DefaultAzureCredential  # noqa: PLC0415
        except ImportError:
            return problems + [_error(None, "azure", f"azure-identity is not installed: {INSTALL_HINT}")]
        credential = DefaultAzureCredential()
    try:
        credential.get_token(MANAGEMENT_SCOPE)
    except Exception as e:  # noqa: BLE001 - every credential failure ends the checks the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return problems + [_error(None, "credential", f"no Azure credential for {MANAGEMENT_SCOPE}: {first}; "
                                  "run `az login` (or set AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET)")]

    sub, location, group = provider.get("subscription_id"), provider.get("location"), provider.get("resource_group")
    if not (sub and location):
        return problems
    kwargs = {"transport": transport} if transport is not None else {}
    compute = ComputeManagementClient(credential, sub, **kwargs)
    if group:
        try:
            if not ResourceManagementClient(credential, sub, **kwargs).resource_groups.check_existence(group):
                problems.append(_error(None, "provider.resource_group",
                                       f"resource group '{group}' does not exist in subscription {sub} "
                                       f"(create it: az group create -n {group} -l {location})"))
        except HttpResponseError as e:
            problems.append(_error(None, "provider.resource_group",
                                   f"cannot check '{group}': {arm_error_line(e)}"))

    try:
        skus = [s for s in compute.resource_skus.list(filter=f"location eq '{location}'")
                if (s.resource_type or "").lower() == "virtualmachines"]
    except HttpResponseError as e:
        return problems + [_error(None, "provider.location",
                                  f"cannot list VM sizes in {location}: {arm_error_line(e)}")]
    by_name = {s.name.lower(): s for s in skus if s.name}
    found: dict[str, Any] = {}
    for t in types:
        if not t.vm_size:
            continue
        sku = by_name.get(t.vm_size.lower())
        if sku is None:
            problems.append(_error(t.name, "vmSize", f"{t.vm_size} is not a VM size offered in {location}"))
            continue
        found[t.name] = sku
        problems += _check_sku(t, sku, location)
    problems += _check_images(compute, types, found, location, HttpResponseError)

    try:
        usages = {u.name.value.lower(): u for u in compute.usage.list(location) if u.name and u.name.value}
    except HttpResponseError as e:
        return problems + [_error(None, "quota", f"cannot read the quota of {location}: {arm_error_line(e)}")]
    problems += _check_quota(config, types, found, usages, location)
    return problems


def _check_sku(t: NodeType, sku, location: str) -> list[Problem]:
    out: list[Problem] = []
    caps = _capabilities(sku)
    for r in sku.restrictions or []:
        if _enum(r.reason_code) != UNAVAILABLE:
            continue
        kind = _enum(r.type)
        if kind == "Location":
            out.append(_error(t.name, "vmSize", f"{t.vm_size} is not available to this subscription in "
                              f"{location} (restriction {UNAVAILABLE}, type Location)"))
        elif kind == "Zone" and t.zones is not None:
            restricted = sorted(set((r.restriction_info.zones if r.restriction_info else None) or []))
            size_zones = sorted({z for li in (sku.location_info or []) for z in (li.zones or [])})
            used = sorted(set(t.zones) & set(size_zones)) if t.zones else size_zones
            bad = sorted(set(used) & set(restricted))
            if bad:
                ok = sorted(set(size_zones) - set(restricted))
                hint = (f"set availability_zone: \"{','.join(ok)}\"" if ok
                        else "set availability_zone: none (no zone) or another size")
                out.append(_error(t.name, "vmSize", f"{t.vm_size} is not available to this subscription in "
                                  f"zone(s) {', '.join(bad)} of {location} (restriction {UNAVAILABLE}, type Zone; "
                                  f"Ray would use zones {', '.join(used)}); {hint}"))
    if t.spot and caps.get("LowPriorityCapable", "False").lower() != "true":
        out.append(_error(t.name, "priority", f"Spot: {t.vm_size} is not LowPriorityCapable in {location}; "
                          "use a dedicated type or another size"))
    for res, cap in (("CPU", "vCPUs"), ("GPU", "GPUs")):
        have = _number(caps.get(cap)) or 0.0
        declared = t.cpus if res == "CPU" else t.gpus
        if declared is None:
            if have:
                out.append(_warning(t.name, f"resources.{res}", f"not declared; {t.vm_size} has {have:g} {cap}: "
                                    f"the autoscaler will not launch this type for {res} demand"))
            continue
        declared = float(declared)
        if declared > have:
            out.append(_error(t.name, f"resources.{res}", f"{declared:g} declared but {t.vm_size} has {have:g} {cap}"))
        elif declared < have and not (res == "CPU" and declared == 0):
            out.append(_warning(t.name, f"resources.{res}", f"{declared:g} declared but {t.vm_size} has {have:g} "
                                f"{cap} ({have - declared:g} left idle)"))
    return out


def _check_images(compute, types: list[NodeType], skus: dict, location: str, http_error) -> list[Problem]:
    out: list[Problem] = []
    generations: dict[tuple, Optional[str]] = {}
    for t in types:
        if t.image is None or t.name not in skus:
            continue
        if t.image not in generations:
            publisher, offer, sku_name, version = t.image
            urn = ":".join(t.image)
            try:
                if version.lower() == "latest":
                    versions = [v.name for v in compute.virtual_machine_images.list(
                        location, publisher, offer, sku_name) if v.name]
                    if not versions:
                        raise LookupError
                    version = max(versions, key=_version_key)
                image = compute.virtual_machine_images.get(location, publisher, offer, sku_name, version)
                generations[t.image] = _enum(image.hyper_v_generation) if image.hyper_v_generation else None
            except LookupError:
                generations[t.image] = None
                out.append(_error(t.name, "imageSku", f"image {urn} does not exist in {location}"))
                continue
            except http_error as e:
                generations[t.image] = None
                if getattr(e, "status_code", None) == 404:
                    out.append(_error(t.name, "imageSku", f"image {urn} does not exist in {location}"))
                else:
                    out.append(_warning(t.name, "imageSku", f"cannot look up image {urn}: {arm_error_line(e)}; "
                                        "its Hyper-V generation is not checked"))
                continue
        gen = generations[t.image]
        allowed = _capabilities(skus[t.name]).get("HyperVGenerations")
        if gen and allowed and gen.upper() not in [g.strip().upper() for g in allowed.split(",")]:
            out.append(_error(t.name, "imageSku", f"image {':'.join(t.image)} is Hyper-V generation {gen} but "
                              f"{t.vm_size} supports {allowed} only; pick an image of generation {allowed}"))
    return out


def _worst_case(entries: Iterable[tuple[float, int]], cap: Optional[int]) -> float:
    """vCPUs of the most the autoscaler may launch: (vCPUs, max_workers) per type, at most
    ``cap`` workers in all, largest VMs first."""
    total, left = 0.0, cap
    for vcpus, count in sorted(entries, reverse=True):
        n = count if left is None else min(count, left)
        total += vcpus * n
        if left is not None:
            left -= n
    return total


def _check_quota(config: dict, types: list[NodeType], skus: dict, usages: dict, location: str) -> list[Problem]:
    cap = config.get("max_workers")
    cap = _int(cap, 0) if cap is not None else None
    # bucket -> [(type, vCPUs)]
    buckets: dict[tuple[str, str], list[tuple[NodeType, float]]] = {}
    for t in types:
        sku = skus.get(t.name)
        if sku is None:
            continue
        vcpus = _number(_capabilities(sku).get("vCPUs")) or 0.0
        if t.spot:
            names = [("lowPriorityCores", "Spot vCPUs (lowPriorityCores)")]
        else:
            names = [("cores", "regional vCPUs (cores)")]
            if sku.family:
                names.append((sku.family, f"{sku.family} vCPUs"))
        for key in names:
            buckets.setdefault(key, []).append((t, vcpus))
    out: list[Problem] = []
    for (quota, label), members in buckets.items():
        who = ",".join(t.name for t, _ in members)
        usage = usages.get(quota.lower())
        if usage is None:
            out.append(_warning(who, "quota", f"no {quota} quota listed in {location}; not checked"))
            continue
        free = float(usage.limit) - float(usage.current_value)
        numbers = f"limit {usage.limit:g}, in use {usage.current_value:g}, free {free:g}"
        head = sum(v for t, v in members if t.is_head)
        at_min = head + sum(v * t.min_workers for t, v in members)
        at_max = head + _worst_case(((v, t.max_workers) for t, v in members), cap)
        if at_min > free:
            out.append(_error(who, "min_workers", f"the head plus min_workers need {at_min:g} {label} in "
                              f"{location}; the quota has {free:g} free ({numbers}); request more quota or "
                              "lower min_workers"))
        elif at_max > free:
            out.append(_warning(who, "max_workers", f"at max_workers the cluster needs {at_max:g} {label} in "
                                f"{location}; the quota has {free:g} free ({numbers}); launches beyond it fail"))
    return out


def to_json(problems: list[Problem]) -> str:
    return json.dumps([p.to_dict() for p in problems], indent=2)
