"""Benchmark (spot/cost issue): deadline-aware spot use on a simulated clock.

One job of C = 4 h of compute under spot availability generated as a two-state Markov
chain (available / not), at three levels: available 80 %, 50 % and 20 % of the time, with
available periods of mean 60 min (unavailable periods then average 15, 60 and 240 min);
20 seeds each; deadlines 1.2x, 1.5x and 2x the runtime; a restart overhead of 2 min (every
start, eviction and switch); spot at 0.3 of the dedicated price. Compared:

- dedicated only;
- greedy: spot whenever available, else wait; dedicated to the end only when
  D - t < C - p + d;
- Uniform Progress as raybatch applies it (``raybatch.scheduler.deadline.choose`` at each
  start: raybatch does not move a running job), and as the paper runs it (it also moves a
  running job when the rule changes: ``migrate``).

Printed per availability level and deadline: missed deadlines (of 20), mean cost in
dedicated gang-hours, and each cost as a ratio of dedicated-only's, measured in the same run.
Targets: 0 missed deadlines for Uniform Progress and greedy; Uniform Progress's mean cost
<= greedy's, and well below dedicated-only.

    python benchmarks/bench_spot_deadline.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raybatch.scheduler.deadline import markov_availability, simulate  # noqa: E402

C = 4 * 3600.0
D_FACTORS = (1.2, 1.5, 2.0)
LEVELS = (0.8, 0.5, 0.2)
MEAN_UP_S = 3600.0
RESTART_S = 120.0
SPOT_PRICE = 0.3
STEP = 30.0
STRATEGIES = (("dedicated only", "dedicated", False), ("greedy", "greedy", False),
              ("Uniform Progress (raybatch)", "uniform", False), ("Uniform Progress (migrating)", "uniform", True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    print(f"one job of C = {C / 3600:g} h; restart overhead {RESTART_S / 60:g} min; spot price {SPOT_PRICE} "
          f"of dedicated; {args.seeds} seeds per cell; availability: Markov chain, available periods "
          f"of mean {MEAN_UP_S / 60:g} min")
    print(f"{'available':>9} {'deadline':>8}  {'strategy':30} {'missed':>6} {'mean cost':>9} {'vs dedicated':>12}")
    worst_missed = {name: 0 for name, _, _ in STRATEGIES}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in STRATEGIES}
    for level in LEVELS:
        for factor in D_FACTORS:
            D = factor * C
            costs: dict[str, list[float]] = {name: [] for name, _, _ in STRATEGIES}
            missed = {name: 0 for name, _, _ in STRATEGIES}
            for seed in range(args.seeds):
                trace = markov_availability(level, MEAN_UP_S, seed, STEP, 4 * D)
                for name, strategy, migrate in STRATEGIES:
                    out = simulate(strategy, C, D, RESTART_S, trace, step=STEP, migrate=migrate)
                    costs[name].append(out.cost(SPOT_PRICE))
                    missed[name] += not out.met
            base = statistics.mean(costs["dedicated only"])
            for name, _, _ in STRATEGIES:
                mean = statistics.mean(costs[name])
                worst_missed[name] = max(worst_missed[name], missed[name])
                ratios[name].append(mean / base)
                print(f"{level:>9.0%} {factor:>7.1f}x  {name:30} {missed[name]:>6} {mean:>9.2f} {mean / base:>11.2f}x")
    print("summary over the 9 cells:")
    for name, _, _ in STRATEGIES:
        print(f"  {name:30} most missed in a cell {worst_missed[name]}, mean cost vs dedicated "
              f"{statistics.mean(ratios[name]):.2f}x (min {min(ratios[name]):.2f}, max {max(ratios[name]):.2f})")


if __name__ == "__main__":
    main()
