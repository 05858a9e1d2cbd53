"""Deadline-aware use of spot (low-priority) nodes: the "Uniform Progress" policy of Wu et
al., "Can't Be Late: Optimizing Spot Instance Savings under Deadlines" (NSDI 2024).

A job with a ``deadline`` and a ``runtime_estimate`` C (the compute time it needs on one
gang) should use cheap spot nodes as much as it can and still finish by its deadline. Let
t be the time since submit, D the deadline measured the same way, p the job's progress
(compute time up to its newest checkpoint) and d the restart overhead (start-up plus the
work an interruption loses, measured from the job's own attempts). The uniform-progress
line is C·t/D: a job on it finishes exactly at its deadline. The rules, first match wins:

4. D − t < C − p + 2d: dedicated nodes to the end, whatever else holds (one more
   interruption could make it late);
3. on dedicated nodes: stay there until p is ahead of the line at t + 2d (a switch costs
   a restart; only a job that can afford one goes back to spot);
2. spot available (a free spot node fits the gang, or a spot node type can still launch):
   take spot, and stay on it until evicted;
1. queued, spot not available, p below the line: take dedicated nodes;
0. otherwise (queued, no spot, p at or ahead of the line): wait for spot.

``choose`` is the pure function; the scheduler applies it only by setting the job's
effective ``low_priority_nodes`` each cycle (rules 1, 3, 4: ``avoid``; 2 and 0:
``require``), so queue order, quotas and preemption are unchanged. raybatch does not
migrate a running job: a decision acts when the job next starts (after an eviction, say).
``simulate`` runs one job through a spot-availability trace on a simulated clock, for the
benchmark (``benchmarks/bench_spot_deadline.py``) and the tests."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Literal

DEFAULT_RESTART_OVERHEAD_S = 60.0  # d until the job has been restarted once


class Where(str, enum.Enum):
    QUEUED = "queued"
    SPOT = "spot"
    DEDICATED = "dedicated"


RULE_WORDS = {
    4: "deadline close: dedicated nodes to the end",
    3: "on dedicated nodes until ahead of the uniform-progress line",
    2: "spot available: on spot until evicted",
    1: "behind the uniform-progress line and no spot: dedicated nodes",
    0: "ahead of the uniform-progress line: waiting for spot",
}


@dataclass(frozen=True)
class Decision:
    rule: int                        # 0..4, as in the module docstring
    nodes: Literal["spot", "dedicated"]
    slack: float                     # D - t - (C - p): time to spare if it ran from now without a stop

    @property
    def low_priority_nodes(self) -> str:
        """The job's effective ``low_priority_nodes`` for the policy."""
        return "require" if self.nodes == "spot" else "avoid"

    @property
    def words(self) -> str:
        return f"rule {self.rule}: {RULE_WORDS[self.rule]}"


def choose(t: float, D: float, C: float, p: float, d: float, where: Where | str,
           spot_available: bool) -> Decision:
    """Spot or dedicated nodes for a job ``t`` seconds after its submit (see the module
    docstring for the symbols and the rules)."""
    where = Where(where)
    remaining = max(0.0, C - p)
    slack = D - t - remaining
    if D - t < remaining + 2 * d:
        return Decision(4, "dedicated", slack)
    if where is Where.DEDICATED and p < C * (t + 2 * d) / D:
        return Decision(3, "dedicated", slack)
    if spot_available or where is Where.SPOT:
        return Decision(2, "spot", slack)
    if where is Where.QUEUED and p < C * t / D:
        return Decision(1, "dedicated", slack)
    return Decision(0, "spot", slack)


# ---- a simulated clock, for the benchmark and the tests ----------------------------------

Strategy = Literal["dedicated", "greedy", "uniform"]


@dataclass
class SimOutcome:
    finished_at: float   # seconds after submit (inf: never, within the horizon)
    met: bool            # finished by the deadline
    spot_s: float        # time held on spot nodes (running or restarting)
    dedicated_s: float   # time held on dedicated nodes
    restarts: int

    def cost(self, spot_price: float, dedicated_price: float = 1.0) -> float:
        """In units of one gang-hour of dedicated nodes (``dedicated_price`` per hour)."""
        return (self.spot_s * spot_price + self.dedicated_s * dedicated_price) / 3600.0


def simulate(strategy: Strategy, C: float, D: float, d: float, available: Callable[[float], bool],
             step: float = 10.0, migrate: bool = False, horizon: float | None = None) -> SimOutcome:
    """One job of compute time ``C`` and deadline ``D`` (seconds after submit) under a
    spot-availability trace ``available(t)``; every start (first start, after an
    eviction, a switch) costs ``d`` of overhead during which no progress is made.

    - ``dedicated``: dedicated nodes from the start;
    - ``greedy``: spot whenever available; when not, wait; dedicated to the end only once
      D − t < C − p + d (checked one step ahead, with an overhead being paid counted as
      remaining work, so that greedy, too, never makes itself late);
    - ``uniform``: ``choose`` each step. With ``migrate`` a running job changes node class
      when the rule says so (the paper's setting); without it, as raybatch does, the
      decision acts only when the job (re)starts.

    A spot node is taken back the moment ``available`` turns false (eviction)."""
    horizon = horizon if horizon is not None else max(4 * D, D + 4 * C)
    t, p = 0.0, 0.0
    where = Where.QUEUED
    overhead_left = 0.0
    spot_s = dedicated_s = 0.0
    restarts = -1  # the first start is not a restart
    pinned = False  # greedy: dedicated to the end

    def start(cls: Where) -> None:
        nonlocal where, overhead_left, restarts
        where, overhead_left = cls, d
        restarts += 1

    while t < horizon:
        if p >= C:
            return SimOutcome(t, t <= D + 1e-9, spot_s, dedicated_s, max(0, restarts))
        avail = available(t)
        if where is Where.SPOT and not avail:
            where = Where.QUEUED  # evicted
        if strategy == "dedicated":
            if where is Where.QUEUED:
                start(Where.DEDICATED)
        elif strategy == "greedy":
            # "when" is the last step at which a switch still makes it: an overhead being
            # paid counts as remaining work, and a spot start that would leave no room for
            # a later switch is not made (greedy, too, must never make itself late)
            need = C - p + (overhead_left if where is not Where.QUEUED else 0.0)
            if not pinned and (D - (t + step) < need + d
                               or where is Where.QUEUED and avail and D - (t + step) < need + 2 * d):
                pinned = True
            if pinned and where is not Where.DEDICATED:
                start(Where.DEDICATED)
            elif where is Where.QUEUED and avail and not pinned:
                start(Where.SPOT)
        else:
            dec = choose(t, D, C, p, d, where, avail)
            want = Where.SPOT if dec.nodes == "spot" else Where.DEDICATED
            if where is Where.QUEUED:
                if want is Where.DEDICATED or avail:
                    start(want)
            elif migrate and want is not where and (want is Where.DEDICATED or avail):
                start(want)
        if where is Where.SPOT:
            spot_s += step
        elif where is Where.DEDICATED:
            dedicated_s += step
        if where is not Where.QUEUED:
            used = min(step, overhead_left)
            overhead_left -= used
            p = min(C, p + step - used)
        t += step
    return SimOutcome(float("inf"), False, spot_s, dedicated_s, max(0, restarts))


def markov_availability(fraction: float, mean_up_s: float, seed: int, step: float,
                        length_s: float) -> Callable[[float], bool]:
    """A two-state Markov chain (spot available / not) sampled every ``step`` seconds:
    available a ``fraction`` of the time on average, with available periods of mean
    ``mean_up_s`` (so unavailable ones of mean ``mean_up_s · (1 − f) / f``)."""
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    mean_down_s = mean_up_s * (1 - fraction) / fraction if fraction > 0 else float("inf")
    p_leave_up = min(1.0, step / mean_up_s)
    p_leave_down = min(1.0, step / mean_down_s) if mean_down_s != float("inf") else 0.0
    n = int(length_s / step) + 2
    states = []
    up = rng.random() < fraction
    for _ in range(n):
        states.append(up)
        up = (rng.random() >= p_leave_up) if up else (rng.random() < p_leave_down)
    return lambda t: states[min(len(states) - 1, int(t / step))]
