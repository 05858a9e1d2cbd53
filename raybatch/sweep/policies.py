"""Azure ML's early-termination policies, over "intervals" (one interval is one report of
the primary metric). Pure rules first, tested against Azure's worked examples; the Tune
schedulers at the end only feed them.

- bandit: at an evaluation interval, a trial whose metric is outside the slack of the best
  trial's metric at that interval stops (maximize: below best / (1 + slack_factor), or
  best - slack_amount; minimize: above best * (1 + slack_factor), or best + slack_amount);
- truncation selection: at an evaluation interval, the trials in the worst
  ``truncation_percentage`` % of the metrics reported at that interval stop;
- median stopping: Ray Tune's ``MedianStoppingRule`` over intervals (a trial whose best is
  worse than the median of the others' running averages at that interval);
- asha: Ray Tune's ``ASHAScheduler`` over intervals.

Evaluations happen at interval ``n`` (1-based) when ``n >= delay_evaluation`` and
``(n - delay_evaluation) % evaluation_interval == 0`` (every interval when it is 0)."""

from __future__ import annotations

import math
from typing import Any, Optional

from raybatch.spec.sweep import Bandit, TruncationSelection


def evaluates(n: int, interval: int, delay: int) -> bool:
    """Is the policy applied at a trial's ``n``-th report?"""
    if n < max(delay, 1):
        return False
    return interval <= 1 or (n - delay) % interval == 0


class IntervalHistory:
    """Each trial's primary metric, one value per interval (report)."""

    def __init__(self, maximize: bool):
        self.maximize = maximize
        self.values: dict[str, list[float]] = {}
        self.finished: set[str] = set()

    def add(self, trial: str, value: float) -> int:
        self.values.setdefault(trial, []).append(value)
        return len(self.values[trial])

    def at(self, n: int, exclude_finished: bool = False) -> dict[str, float]:
        """Every trial's metric at interval ``n`` (trials that reached it)."""
        return {t: v[n - 1] for t, v in self.values.items() if len(v) >= n
                and not (exclude_finished and t in self.finished)}


def bandit_stops(policy: Bandit, history: IntervalHistory, trial: str, n: int) -> bool:
    """Does the bandit policy stop ``trial`` at its ``n``-th report?"""
    if not evaluates(n, policy.evaluation_interval, policy.delay_evaluation):
        return False
    values = history.at(n)
    mine = values[trial]
    best = max(values.values()) if history.maximize else min(values.values())
    if history.maximize:
        limit = best / (1 + policy.slack_factor) if policy.slack_factor is not None else best - policy.slack_amount
        return mine < limit
    limit = best * (1 + policy.slack_factor) if policy.slack_factor is not None else best + policy.slack_amount
    return mine > limit


def truncation_stops(policy: TruncationSelection, history: IntervalHistory, trial: str, n: int) -> bool:
    """Does truncation selection stop ``trial`` at its ``n``-th report? The worst
    ``truncation_percentage`` % of the values reported at that interval stop (rounded down;
    at least two trials must have reached it)."""
    if not evaluates(n, policy.evaluation_interval, policy.delay_evaluation):
        return False
    values = history.at(n, exclude_finished=policy.exclude_finished_jobs)
    values[trial] = history.values[trial][n - 1]
    cut = math.floor(len(values) * policy.truncation_percentage / 100)
    if len(values) < 2 or cut < 1:
        return False
    ranked = sorted(values, key=lambda t: values[t], reverse=not history.maximize)  # worst first
    return trial in ranked[:cut]


def tune_scheduler(policy: Any, metric: str, mode: str) -> Optional[Any]:
    """The Ray Tune scheduler for an early-termination policy (None: run every trial out)."""
    if policy is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler  # noqa: PLC0415

    # metric and mode reach Tune's own schedulers through TuneConfig (Tune refuses them twice)
    if policy.type == "median_stopping":
        return MedianStoppingRule(time_attr="training_iteration",
                                  grace_period=max(policy.delay_evaluation, 1), min_samples_required=1,
                                  min_time_slice=max(policy.evaluation_interval, 1) - 1, hard_stop=True)
    if policy.type == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=policy.max_t,
                             grace_period=policy.grace_period, reduction_factor=policy.reduction_factor)
    rule = bandit_stops if policy.type == "bandit" else truncation_stops

    class AzurePolicy(FIFOScheduler):
        """Azure ML's {policy.type} policy as a Tune scheduler."""

        def __init__(self) -> None:
            super().__init__()
            self.history = IntervalHistory(maximize=mode == "max")

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if metric not in result:
                return TrialScheduler.CONTINUE
            n = self.history.add(trial.trial_id, float(result[metric]))
            return TrialScheduler.STOP if rule(policy, self.history, trial.trial_id, n) else TrialScheduler.CONTINUE

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            self.history.finished.add(trial.trial_id)

    return AzurePolicy()
