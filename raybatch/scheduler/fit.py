"""Gang fit: can N bundles be placed on the live nodes, node by node?

Pure functions over a snapshot, so the policy is unit-testable without Ray. A job
of N nodes x R fits only if N nodes (distinct ones for 'spread') each have R
free — never by summing free resources across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

EPS = 1e-9

# How a low-priority (spot) node is marked: a Ray node label, or a custom resource.
LOW_PRIORITY_LABEL = "raybatch.io/low-priority"
LOW_PRIORITY_RESOURCE = "raybatch_low_priority"


@dataclass
class NodeView:
    """One Ray node as the scheduler sees it."""

    node_id: str
    ip: str = ""
    available: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    alive: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    node_type: str = ""  # the autoscaler's node type name, when there is one

    def copy(self) -> "NodeView":
        return NodeView(self.node_id, self.ip, dict(self.available), dict(self.total),
                        self.alive, dict(self.labels), self.node_type)

    def idle(self) -> "NodeView":
        """This node with nothing running on it: all of its resources free."""
        return NodeView(self.node_id, self.ip, dict(self.total), dict(self.total),
                        self.alive, dict(self.labels), self.node_type)


def _marked(labels: Any, resources: Any) -> bool:
    """Carries a low-priority mark: the label (true/1/yes) or some of the resource."""
    label = labels.get(LOW_PRIORITY_LABEL, "") if isinstance(labels, dict) else ""
    amount = resources.get(LOW_PRIORITY_RESOURCE, 0) if isinstance(resources, dict) else 0
    try:
        amount = float(amount or 0)
    except (TypeError, ValueError):
        amount = 1.0  # set, but not a number (a config's lint says so): marked
    return str(label).lower() in ("true", "1", "yes") or amount > 0


def is_low_priority(node: NodeView) -> bool:
    """Low-priority/spot nodes can be taken away by the cloud at any time."""
    return _marked(node.labels, node.total)


def is_spot_type(node_type: Any) -> bool:
    """Whether a node type of a Ray cluster config (an ``available_node_types`` entry) is
    low-priority (spot): its Azure VMs are ``priority: Spot`` (or the older ``Low``; any
    case), or it carries the marks its nodes are told apart by (``is_low_priority``). The
    one rule for the config's lint, the node records, Demand's back-off and the pre-flight."""
    if not isinstance(node_type, dict):
        return False
    node_config = node_type.get("node_config")
    arm = node_config.get("azure_arm_parameters") if isinstance(node_config, dict) else None
    priority = str(arm.get("priority") or "") if isinstance(arm, dict) else ""
    return priority.lower() in ("spot", "low") or _marked(node_type.get("labels"), node_type.get("resources"))


def fits(available: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(available.get(k, 0.0) + EPS >= v for k, v in bundle.items() if v > 0)


def _take(available: dict[str, float], bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        available[k] = available.get(k, 0.0) - v


def gang_fit(
    nodes: list[NodeView], bundle: dict[str, float], count: int, strategy: str = "spread"
) -> Optional[list[str]]:
    """Node ids for each of the ``count`` bundles, or None if the gang does not fit.

    'spread' needs ``count`` distinct nodes; 'pack' may put several bundles on one
    node. Nodes are tried most-loaded first (best fit), which keeps whole nodes
    free for wide gangs."""
    live = [n.copy() for n in nodes if n.alive]
    # best fit on the scarce resources first: GPUs, then CPUs, then memory
    live.sort(key=lambda n: (n.available.get("GPU", 0.0), n.available.get("CPU", 0.0),
                             n.available.get("memory", 0.0), n.node_id))
    placed: list[str] = []
    for node in live:
        while len(placed) < count and fits(node.available, bundle):
            _take(node.available, bundle)
            placed.append(node.node_id)
            if strategy == "spread":
                break
        if len(placed) == count:
            return placed
    return None


def reserve(nodes: list[NodeView], assignment: list[str], bundle: dict[str, float]) -> None:
    """Subtract a placed gang from the snapshot (in place)."""
    by_id = {n.node_id: n for n in nodes}
    for node_id in assignment:
        _take(by_id[node_id].available, bundle)


def could_ever_fit(nodes: list[NodeView], bundle: dict[str, float], count: int, strategy: str) -> bool:
    """Would the gang fit these nodes if they were all idle?"""
    return gang_fit([n.idle() for n in nodes], bundle, count, strategy) is not None


def _fmt_bundle(bundle: dict[str, float]) -> str:
    parts = []
    for k, v in bundle.items():
        if k == "memory":
            parts.append(f"{v / 2**30:.3g} GiB memory")
        else:
            name = {"CPU": "CPU", "GPU": "GPU"}.get(k, k)
            parts.append(f"{v:g} {name}")
    return ", ".join(parts)


def why_not(nodes: list[NodeView], bundle: dict[str, float], count: int, strategy: str) -> str:
    """Why a gang does not fit, in words (for ``show`` and the queue view)."""
    live = [n for n in nodes if n.alive]
    free = sum(1 for n in live if fits(n.available, bundle))
    need = f"{count} node{'s' if count != 1 else ''} with {_fmt_bundle(bundle)} free"
    if strategy == "spread":
        capable = sum(1 for n in live if fits(n.total, bundle))
        msg = f"needs {need}; {free} such node{'s are' if free != 1 else ' is'} free now"
        if capable < count:
            msg += f" and only {capable} of the {len(live)} live nodes could ever hold one"
        return msg
    return f"needs {need} (packing allowed); {free} node{'s' if free != 1 else ''} can take one now"
