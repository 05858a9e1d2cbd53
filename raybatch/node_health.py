"""How fast Ray declares a silent node dead: the GCS's node health checks, as raybatch
sets them on every cluster it starts (the local default, the cluster configs' head start
commands, the test clusters). docs/node-loss.md has the measurements and the trade-off.

The GCS asks each raylet "are you serving?" (gRPC health check) every ``period`` ms and
gives each check ``timeout`` ms; ``threshold`` failed checks in a row and the node is
DEAD: its actors die, every rank on it is lost, raybatch ends the attempt NODE_LOST.

- a raylet that died (SIGKILL, crash) or a VM whose kernel still answers: each check is
  refused at once -> dead after ``(threshold - 1) * period`` + up to one period;
- a VM powered off, or cut off by the network: each check waits out its timeout -> dead
  after ``threshold * timeout + (threshold - 1) * period`` + up to one period.

Ray's defaults (period 3 s, timeout 10 s, threshold 5) take up to 15 s and 65 s; ours take
up to 1 s and 3 s, so that an attempt ends NODE_LOST within 5 s of the loss on every path
(docs/node-loss.md). The price is the false alarm: a raylet that answers no check for about
2.5 s (two checks timed out and the pause between them: a node frozen by swapping, a stalled
disk, a VM paused by host maintenance) is declared dead, and Ray does not take a dead node
back (its raylet exits when it hears): its ranks restart elsewhere from their checkpoint.
A cluster where such freezes are common raises the threshold (each step adds 1.5 s).
Only the GCS acts on them (set them where the head starts); raybatch's drivers read them
to know how long Ray may take (``raybatch.runtime.watch.lost_rank_check_s``)."""

from __future__ import annotations

# Ray config names (ray_config_def.h); env RAY_<name> or the GCS's _system_config.
NODE_HEALTH: dict[str, int] = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 2,
}
RAY_DEFAULTS: dict[str, int] = {  # Ray 2.60, for comparison (ray._raylet.Config)
    "health_check_period_ms": 3000,
    "health_check_timeout_ms": 10000,
    "health_check_failure_threshold": 5,
}


def node_health_env(settings: dict[str, int] = NODE_HEALTH) -> dict[str, str]:
    """The settings as the environment of ``ray start --head`` (or any Ray process)."""
    return {f"RAY_{k}": str(v) for k, v in settings.items()}


def detection_bounds_s(settings: dict[str, int] = NODE_HEALTH) -> tuple[float, float]:
    """The latest moment (s after the loss) Ray declares a node dead: a refused raylet
    (each check fails at once), and a silent one (each check waits out its timeout)."""
    period, timeout = settings["health_check_period_ms"] / 1000, settings["health_check_timeout_ms"] / 1000
    n = settings["health_check_failure_threshold"]
    return n * period, n * timeout + n * period
