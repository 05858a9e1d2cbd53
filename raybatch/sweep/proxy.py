"""What Ray Tune runs and calls for a sweep, in a module of its own: Tune pickles its trainable,
stopper and callbacks, and these must be pickled by reference (the driver runs as
``__main__``, whose objects would be pickled by value with whatever they reach).

- ``trial_proxy``: one trial, as Tune sees it: registers with the slot pool, reports the
  trial's metric events as they come, returns when the trial has ended;
- ``Stop``: ends ``fit`` once the attempt must stop, or the sweep's limits.timeout came;
- ``EarlyStop``: tells the pool at once when Tune's scheduler stopped a trial."""

from __future__ import annotations

from typing import Any, Optional

import ray
from ray import tune

# the driver process's attempt (raybatch.sweep.driver.SweepAttempt): .stop, .pool
ATTEMPT: Optional[Any] = None
_POOLS: dict[tuple[str, str], Any] = {}  # a reused proxy actor looks its pool up once


def trial_proxy(config: dict[str, Any], pool_name: str, namespace: str, primary: str) -> None:
    pool = _POOLS.get((pool_name, namespace))
    if pool is None:
        pool = _POOLS[(pool_name, namespace)] = ray.get_actor(pool_name, namespace=namespace)
    tune_id = tune.get_context().get_trial_id()
    n = ray.get(pool.register.remote(tune_id, config))
    cursor, latest = 0, {}
    while True:
        events, end = ray.get(pool.events.remote(n, cursor, 60.0))
        cursor += len(events)
        for e in events:
            latest[e["name"]] = e["value"]
            if e["name"] == primary:
                tune.report({**latest, "step": e["step"], "raybatch_trial": n})
        if end is not None:
            break
    if end["state"] == "failed":
        raise RuntimeError(f"trial {n} failed: {end['message']}")


class Stop(tune.Stopper):
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return ATTEMPT is not None and (ATTEMPT.stop.is_set() or ATTEMPT.over is not None)


class EarlyStop(tune.Callback):
    def __init__(self, policy: str):
        self.policy = policy

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if ATTEMPT is not None and ATTEMPT.pool is not None:  # not waited for: Tune's loop goes on
            ATTEMPT.pool.early_stop.remote(trial.trial_id, f"stopped early by the {self.policy} policy")
