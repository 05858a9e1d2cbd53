"""Cluster configs: read a Ray autoscaler cluster YAML and lint it for what raybatch needs.

Ray's own checks (``prepare_config`` + ``validate_config``) say whether Ray can start the
cluster; ``lint`` says whether raybatch can *use* it. Each rule below maps to a field of
the YAML (see ``cluster_configs/README.md``):

everywhere (Azure and fake_multinode):
  * the six command lists are set, so nothing inherits Ray's provider defaults (on Azure
    these pin a ``ray-3.0.0.dev0`` wheel);
  * the head type has ``CPU: 0`` (nothing of a job runs there) and ``raybatch_trial: 1000``
    (the sweep trial proxies' resource);
  * every worker type has integer resources, its own marker ``rb_type_<type>: 1`` (so the
    bundle Demand plans for a type launches that type and no other), ``min_workers`` and
    ``max_workers`` (0 <= min <= max);
  * a low-priority (spot) type (``fit.is_spot_type``: Spot priority or either mark) carries
    both ``raybatch_low_priority: 1`` and the label ``raybatch.io/low-priority: "true"``;
  * the cluster sets ``max_workers`` and ``idle_timeout_minutes``;
only on Azure (``type: azure`` or raybatch's provider subclass):
  * ``provider``: raybatch's provider subclass, a real ``subscription_id`` (not the
    placeholder), ``location``, ``resource_group``, ``cache_stopped_nodes: false``,
    ``use_internal_ips: true`` + ``use_external_head_ip: true``;
  * ``auth``: ``ssh_user`` and both ssh keys;
  * every type: ``vmSize`` and an image; a Spot type ``evictionPolicy: Delete`` and a
    ``billingProfile.maxPrice``;
  * ``file_mounts`` bring the raybatch wheel and the Ray auth token from ``{render_dir}``,
    and never the server's TLS key: Ray copies file_mounts to every node, workers included,
    so a mount of ``~/raybatch-tls`` (or of anything holding ``server.key``) is refused; the
    head makes the certificate and key itself (``head-setup``) and the key stays there;
  * setup commands pin Ray, install the wheel, run ``raybatch node-setup --mounts``;
  * every ``ray start`` runs with ``RAY_AUTH_MODE=token``; the head runs
    ``raybatch cluster head-setup`` after it, with ``--tls-cert``/``--tls-key`` (made there if
    missing; the server speaks HTTPS only, also through the SSH tunnel); spot workers start
    ``raybatch spot-watch``.

A problem is one line: ``<source>: <node type|cluster> <field>: <what is wrong> (<what is
allowed>)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from raybatch.cluster.tls import CERT_NAME, KEY_NAME
from raybatch.scheduler.fit import LOW_PRIORITY_LABEL, LOW_PRIORITY_RESOURCE, is_spot_type

RAY_VERSION = "2.60.0"
TRIAL_RESOURCE = "raybatch_trial"
TRIAL_UNITS = 1000
TYPE_MARKER_PREFIX = "rb_type_"
PROVIDER_MODULE = "raybatch.cluster.azure_provider.RaybatchAzureNodeProvider"
SUBSCRIPTION_PLACEHOLDER = "REPLACE-WITH-YOUR-SUBSCRIPTION-ID"
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands",
                 "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
# the file_mounts every Azure config carries ({render_dir}: `raybatch cluster up` fills it in)
RENDER_DIR = "{render_dir}"
TLS_DIR = "tls"            # in the render dir: the server's certificate only, read back from the head
TLS_ON_HEAD = "~/raybatch-tls"  # on the head: the certificate and its key (0700; made by head-setup)
FILE_MOUNTS = {"~/raybatch-setup": f"{RENDER_DIR}/node", "~/.ray/auth_token": f"{RENDER_DIR}/ray_auth_token"}
WHEEL_GLOB = "~/raybatch-setup/dist/raybatch-"
NODE_SETUP = "raybatch node-setup --mounts ~/raybatch-setup/mounts.yaml"
HEAD_SETUP = ("raybatch cluster head-setup --state-dir /mnt/raybatch-state "
              "--cluster-config ~/ray_bootstrap_config.yaml "
              f"--tls-cert {TLS_ON_HEAD}/{CERT_NAME} --tls-key {TLS_ON_HEAD}/{KEY_NAME}")
SPOT_WATCH = "raybatch spot-watch --gcs-address $RAY_HEAD_IP:6379"
SPOT_PRIORITY = "Spot"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_RAY_PIN = re.compile(r"\bray(\[[^\]]*\])?==" + re.escape(RAY_VERSION) + r"\b")


def load(path: str | Path) -> dict:
    """The cluster YAML at ``path`` as a dict; a clear error naming the file otherwise."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"{p}: cannot read the cluster config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ValueError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a cluster config is a YAML mapping (cluster_name, provider, "
                         f"available_node_types, ...), got {type(data).__name__}")
    return data


def is_azure(config: dict) -> bool:
    """Whether the config launches Azure VMs: Ray's ``azure`` provider or raybatch's subclass."""
    provider = config.get("provider") or {}
    if not isinstance(provider, dict):
        return False
    if provider.get("type") == "azure":
        return True
    return provider.get("type") == "external" and str(provider.get("module", "")).startswith(
        "raybatch.cluster.azure_provider.")


def lint(config: dict, source: str = "cluster config") -> list[str]:
    """raybatch's problems with a cluster config, one line each; [] when there are none."""
    if not isinstance(config, dict):
        return [f"{source}: cluster: not a mapping (a Ray cluster config is a YAML mapping)"]
    out: list[str] = []

    def bad(where: str, field: str, what: str) -> None:
        out.append(f"{source}: {where} {field}: {what}")

    _lint_cluster(config, bad)
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        bad("cluster", "available_node_types", "missing (a mapping of node type name -> "
            "{resources, node_config, min_workers, max_workers})")
        return out
    head = config.get("head_node_type")
    if head not in types:
        bad("cluster", "head_node_type", f"{head!r} is not one of available_node_types "
            f"({', '.join(map(str, types))})")
    for name, t in types.items():
        if not isinstance(t, dict):
            bad(str(name), "", "not a mapping")
            continue
        if name == head:
            _lint_head(str(name), t, bad)
        else:
            _lint_worker(str(name), t, bad)
        _lint_spot_marks(str(name), t, bad)
    if is_azure(config):
        _lint_azure(config, types, head, bad)
    return out


# ---------------------------------------------------------------- every provider

def _lint_cluster(config: dict, bad) -> None:
    for key in COMMAND_LISTS:
        value = config.get(key)
        if value is None:
            bad("cluster", key, "missing: set it (an empty list is fine) so that Ray's provider defaults "
                "are not inherited (on Azure they install a ray-3.0.0.dev0 wheel)")
        elif not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            bad("cluster", key, f"must be a list of shell commands, got {type(value).__name__}")
    mw = config.get("max_workers")
    if not _is_int(mw) or mw < 0:
        bad("cluster", "max_workers", f"must be an integer >= 0 (all worker types together), got {mw!r}")
    idle = config.get("idle_timeout_minutes")
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle <= 0:
        bad("cluster", "idle_timeout_minutes", f"must be a number > 0 (minutes before an idle worker "
            f"is removed; per-type idle_timeout_s is autoscaler v2 only), got {idle!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_resources(name: str, t: dict, bad) -> dict:
    res = t.get("resources")
    if not isinstance(res, dict) or not res:
        bad(name, "resources", "missing (raybatch plans nodes from them: e.g. {CPU: 16, "
            f"{TYPE_MARKER_PREFIX}{name}: 1}})")
        return {}
    for k, v in res.items():
        if not _is_int(v) or v < 0:
            bad(name, f"resources.{k}", f"must be an integer >= 0, got {v!r}")
    return res


def _lint_head(name: str, t: dict, bad) -> None:
    res = _int_resources(name, t, bad)
    if not res:
        return
    if res.get("CPU") != 0:
        bad(name, "resources.CPU", f"the head must declare CPU: 0 so no rank runs beside the server "
            f"and the autoscaler, got {res.get('CPU')!r}")
    if res.get(TRIAL_RESOURCE) != TRIAL_UNITS:
        bad(name, f"resources.{TRIAL_RESOURCE}", f"the head must declare {TRIAL_RESOURCE}: {TRIAL_UNITS} "
            f"(one unit per sweep trial proxy), got {res.get(TRIAL_RESOURCE)!r}")
    mw = t.get("max_workers", 0)
    if mw not in (0, None):
        bad(name, "max_workers", f"the head type must not add workers of its own type (0), got {mw!r}")


def _lint_worker(name: str, t: dict, bad) -> None:
    res = _int_resources(name, t, bad)
    marker = f"{TYPE_MARKER_PREFIX}{name}"
    if res:
        if res.get(marker) != 1:
            bad(name, f"resources.{marker}", f"each worker type needs its own marker {marker}: 1 (Demand's "
                f"bundles carry it so the planned type launches), got {res.get(marker)!r}")
        for k in res:
            if k.startswith(TYPE_MARKER_PREFIX) and k != marker:
                bad(name, f"resources.{k}", f"marker of another type; a type carries only its own "
                    f"({marker})")
    lo, hi = t.get("min_workers"), t.get("max_workers")
    if not _is_int(lo) or lo < 0:
        bad(name, "min_workers", f"must be set, an integer >= 0, got {lo!r}")
    if not _is_int(hi) or hi < 0:
        bad(name, "max_workers", f"must be set, an integer >= 0, got {hi!r}")
    if _is_int(lo) and _is_int(hi) and lo > hi:
        bad(name, "min_workers", f"larger than max_workers ({lo} > {hi})")


def _lint_spot_marks(name: str, t: dict, bad) -> None:
    if not is_spot_type(t):
        return
    res = t.get("resources") or {}
    labels = t.get("labels") or {}
    if res.get(LOW_PRIORITY_RESOURCE) != 1:
        bad(name, f"resources.{LOW_PRIORITY_RESOURCE}", f"a low-priority (spot) type needs "
            f"{LOW_PRIORITY_RESOURCE}: 1, got {res.get(LOW_PRIORITY_RESOURCE)!r}")
    if not isinstance(labels, dict) or labels.get(LOW_PRIORITY_LABEL) != "true":
        got = labels.get(LOW_PRIORITY_LABEL) if isinstance(labels, dict) else labels
        bad(name, f"labels.{LOW_PRIORITY_LABEL}", f"a low-priority (spot) type needs the label "
            f"{LOW_PRIORITY_LABEL}: \"true\" (a string), got {got!r}")


# ---------------------------------------------------------------- Azure only

def _lint_azure(config: dict, types: dict, head: Any, bad) -> None:
    p = config.get("provider") or {}
    if p.get("type") != "external" or p.get("module") != PROVIDER_MODULE:
        bad("provider", "module", f"use raybatch's provider subclass (type: external, module: "
            f"{PROVIDER_MODULE}): launch failures then carry the ARM error code and spot "
            f"evictions' NICs are removed; got type {p.get('type')!r}, module {p.get('module')!r}")
    sub = p.get("subscription_id")
    if sub == SUBSCRIPTION_PLACEHOLDER:
        bad("provider", "subscription_id", f"still the placeholder {SUBSCRIPTION_PLACEHOLDER}: set your "
            "subscription's id (az account show --query id -o tsv)")
    elif not isinstance(sub, str) or not _GUID.match(sub):
        bad("provider", "subscription_id", f"must be a subscription id (a GUID: "
            f"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx; without it Ray needs azure-cli-core), got {sub!r}")
    for key in ("location", "resource_group"):
        if not isinstance(p.get(key), str) or not p.get(key):
            bad("provider", key, f"must be set (a non-empty string), got {p.get(key)!r}")
    if p.get("cache_stopped_nodes") is not False:
        bad("provider", "cache_stopped_nodes", "must be false: a stopped (deallocated) VM keeps its "
            f"disks and quota and is invisible to raybatch, got {p.get('cache_stopped_nodes')!r}")
    for key in ("use_internal_ips", "use_external_head_ip"):
        if p.get(key) is not True:
            bad("provider", key, f"must be true (workers without public IPs; the head reachable over "
                f"ssh), got {p.get(key)!r}")

    auth = config.get("auth") or {}
    for key in ("ssh_user", "ssh_private_key", "ssh_public_key"):
        if not isinstance(auth.get(key), str) or not auth.get(key):
            bad("auth", key, f"must be set (both ssh keys: Ray otherwise generates a key pair per "
                f"resource group), got {auth.get(key)!r}")

    for name, t in types.items():
        if isinstance(t, dict):
            _lint_azure_type(str(name), t, bad)

    mounts = config.get("file_mounts") or {}
    for remote, local in FILE_MOUNTS.items():
        if not isinstance(mounts, dict) or mounts.get(remote) != local:
            got = mounts.get(remote) if isinstance(mounts, dict) else mounts
            bad("cluster", f"file_mounts.{remote}", f"must be {local!r} (raybatch cluster up renders "
                f"{RENDER_DIR}), got {got!r}")
    if isinstance(mounts, dict):
        for remote, local in mounts.items():
            if _ships_tls_key(str(remote), str(local)):
                bad("cluster", f"file_mounts.{remote}", f"ships the server's TLS key directory ({local!r}): "
                    f"file_mounts copy to every node, workers included, and the key must stay on the "
                    f"head (`{HEAD_SETUP.split(' --')[0]}` makes it in {TLS_ON_HEAD}); remove this mount")

    _lint_azure_commands(config, types, bad)


def _ships_tls_key(remote: str, local: str) -> bool:
    """Whether a file_mounts entry copies the server's TLS key (or its directory) to the nodes."""
    def parts(p: str) -> list[str]:
        return [x for x in p.replace("\\", "/").split("/") if x]

    r, loc = parts(remote), parts(local)
    return ("raybatch-tls" in r or KEY_NAME in r or KEY_NAME in loc
            or (bool(loc) and loc[-1] == TLS_DIR and loc[:-1] == [RENDER_DIR]))


def _lint_azure_type(name: str, t: dict, bad) -> None:
    arm = (t.get("node_config") or {}).get("azure_arm_parameters")
    if not isinstance(arm, dict):
        bad(name, "node_config.azure_arm_parameters", "missing (vmSize and the image)")
        return
    if not isinstance(arm.get("vmSize"), str) or not arm.get("vmSize"):
        bad(name, "node_config.azure_arm_parameters.vmSize", f"must be set (e.g. Standard_D16s_v5), "
            f"got {arm.get('vmSize')!r}")
    image = ("imagePublisher", "imageOffer", "imageSku", "imageVersion")
    if not arm.get("imageId") and not all(arm.get(k) for k in image):
        missing = [k for k in image if not arm.get(k)]
        bad(name, "node_config.azure_arm_parameters", f"no image: set imageId, or all of "
            f"{', '.join(image)} (missing {', '.join(missing)})")
    priority = arm.get("priority", "Regular")
    if priority not in ("Regular", SPOT_PRIORITY):
        bad(name, "node_config.azure_arm_parameters.priority", f"must be Regular or Spot, got {priority!r}")
    if priority == SPOT_PRIORITY:
        if arm.get("evictionPolicy") != "Delete":
            bad(name, "node_config.azure_arm_parameters.evictionPolicy", f"a Spot type needs Delete (a "
                f"Deallocated VM keeps its quota and is never reused), got {arm.get('evictionPolicy')!r}")
        price = (arm.get("billingProfile") or {}).get("maxPrice")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not (price == -1 or price > 0):
            bad(name, "node_config.azure_arm_parameters.billingProfile.maxPrice", f"a Spot type needs a "
                f"maximum price: -1 (up to the pay-as-you-go price, never evicted for price) or a "
                f"price > 0 in USD per hour, got {price!r}")
    elif priority == "Regular" and is_spot_type(t):  # another priority: said above
        bad(name, "node_config.azure_arm_parameters.priority", f"the type is marked low-priority but its "
            f"VMs are {priority!r}: set priority: Spot (or drop the low-priority marks)")


def _commands(value: Any) -> list[str]:
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def _lint_azure_commands(config: dict, types: dict, bad) -> None:
    setup = _commands(config.get("setup_commands"))
    wheel = next((i for i, c in enumerate(setup) if "pip install" in c and WHEEL_GLOB in c), None)
    node_setup = next((i for i, c in enumerate(setup) if NODE_SETUP in c), None)
    if not any(_RAY_PIN.search(c) and "pip install" in c for c in setup):
        bad("cluster", "setup_commands", f"must pip install ray[default]=={RAY_VERSION} (the Ray the "
            "server and the jobs were built for)")
    if wheel is None:
        bad("cluster", "setup_commands", f"must pip install the raybatch wheel "
            f"({WHEEL_GLOB}*.whl) on every node")
    if node_setup is None:
        bad("cluster", "setup_commands", f"must run `{NODE_SETUP}` (mounts and the setup task)")
    elif wheel is not None and node_setup < wheel:
        bad("cluster", "setup_commands", "runs raybatch node-setup before installing the raybatch wheel")
    all_cmds = [c for key in COMMAND_LISTS for c in _commands(config.get(key))]
    for t in types.values():
        if isinstance(t, dict):
            for key in ("initialization_commands", "worker_setup_commands"):
                all_cmds += _commands(t.get(key))
    if any("ray-3.0.0.dev0" in c or "ray-wheels" in c for c in all_cmds):
        bad("cluster", "commands", f"install a nightly Ray wheel; pin ray[default]=={RAY_VERSION}")

    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        cmds = _commands(config.get(key))
        starts = [i for i, c in enumerate(cmds) if re.search(r"\bray start\b", c)]
        if not starts:
            bad("cluster", key, "no `ray start`")
        for i in starts:
            if "RAY_AUTH_MODE=token" not in cmds[i]:
                bad("cluster", f"{key}[{i}]", "`ray start` without RAY_AUTH_MODE=token (the cluster's "
                    "token is ~/.ray/auth_token, from file_mounts)")
        if head and starts:
            if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in cmds[starts[0]]:
                bad("cluster", f"{key}[{starts[0]}]", "the head's `ray start --head` needs "
                    "--autoscaling-config=~/ray_bootstrap_config.yaml (no autoscaler otherwise)")
            setup_at = next((i for i, c in enumerate(cmds) if HEAD_SETUP in c), None)
            if setup_at is None:
                bad("cluster", key, f"must run `{HEAD_SETUP}` after `ray start --head` (the raybatch "
                    "server's systemd unit)")
            elif setup_at < starts[0]:
                bad("cluster", key, "runs raybatch cluster head-setup before `ray start --head`")
        if not head and any(is_spot_type(t) for t in types.values() if isinstance(t, dict)):
            watch = next((i for i, c in enumerate(cmds) if SPOT_WATCH in c), None)
            if watch is None:
                bad("cluster", key, f"spot types need `{SPOT_WATCH}` after `ray start` (evictions "
                    "drain the node)")
            elif starts and watch < starts[0]:
                bad("cluster", key, "starts raybatch spot-watch before `ray start`")
            elif LOW_PRIORITY_LABEL not in cmds[watch]:
                bad("cluster", f"{key}[{watch}]", f"start spot-watch only on spot nodes: test "
                    f"$RAY_OVERRIDE_LABELS for {LOW_PRIORITY_LABEL} (Ray {RAY_VERSION} has no per-type "
                    "worker_start_ray_commands)")


def problems_or_raise(config: dict, source: str) -> None:
    """Raise ValueError with every problem, one per line, when ``lint`` finds any."""
    found = lint(config, source)
    if found:
        raise ValueError("\n".join(found))


