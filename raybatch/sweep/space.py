"""A sweep's search space and sampling as Ray Tune's, with Azure ML's meaning kept.

Tune draws the *underlying* value of each parameter and the trial computes the value the
command gets (``spec.sweep.param_value``): ``loguniform`` draws uniform(min_value,
max_value) and the trial takes logbase ** draw (e: Azure's exp(uniform)); ``lognormal``
draws normal(mu, sigma) likewise; the ``q`` kinds round to a multiple of q. So a seeded
random sweep and a restored one see the same draws, and Optuna (bayesian) sees choice,
uniform and quniform as they are.

- random: Tune's ``BasicVariantGenerator`` (``seed``: its random state), ``num_samples`` =
  max_total_trials;
- grid: every combination of the choices, in order, capped at max_total_trials; Tune
  runs ``grid_search`` over their index;
- bayesian: ``OptunaSearch`` (TPE), on the objective."""

from __future__ import annotations

import itertools
from typing import Any

from raybatch.spec.sweep import SweepSpec, param_value

GRID_KEY = "__grid"


def grid_point(sweep: SweepSpec, i: int) -> dict[str, Any]:
    """A grid sweep's i-th combination (the first parameter varies slowest)."""
    values = itertools.product(*(p.values for p in sweep.search_space.values()))  # type: ignore[union-attr]
    return dict(zip(sweep.search_space, next(itertools.islice(values, i, None))))


def tune_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: what its search algorithm draws."""
    from ray import tune  # noqa: PLC0415

    if sweep.sampling_algorithm.type == "grid":
        return {GRID_KEY: tune.grid_search(list(range(sweep.total_trials)))}
    out: dict[str, Any] = {}
    for name, p in sweep.search_space.items():
        t = p.type
        if t == "choice":
            out[name] = tune.choice(list(p.values))
        elif t == "randint":
            out[name] = tune.randint(0, p.upper)
        elif t == "quniform":
            out[name] = tune.quniform(p.min_value, p.max_value, p.q)
        elif t in ("uniform", "loguniform", "qloguniform"):
            out[name] = tune.uniform(p.min_value, p.max_value)
        else:  # normal, qnormal, lognormal, qlognormal
            out[name] = tune.randn(p.mu, p.sigma)
    return out


def params_of(sweep: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameter values (what its command gets) from Tune's config."""
    if sweep.sampling_algorithm.type == "grid":
        return grid_point(sweep, int(config[GRID_KEY]))
    base = sweep.sampling_algorithm.base
    return {name: _plain(param_value(p, config[name], base)) for name, p in sweep.search_space.items()}


def _plain(value: Any) -> Any:
    """A JSON-friendly value: numpy's scalars become Python's."""
    return value.item() if hasattr(value, "item") else value


def search_alg(sweep: SweepSpec, concurrency: int) -> Any:
    """Tune's search algorithm, creating at most ``concurrency`` trials at once (each is a
    proxy: a Ray worker on the head; the slots run max_concurrent_trials of them)."""
    algo = sweep.sampling_algorithm
    if algo.type == "bayesian":  # the objective reaches it through TuneConfig
        from ray.tune.search import ConcurrencyLimiter  # noqa: PLC0415
        from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

        return ConcurrencyLimiter(OptunaSearch(seed=algo.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: PLC0415

    return BasicVariantGenerator(random_state=algo.seed, constant_grid_search=True, max_concurrent=concurrency)


def num_samples(sweep: SweepSpec) -> int:
    """Tune's num_samples: a grid's grid_search already makes one trial per combination."""
    return 1 if sweep.sampling_algorithm.type == "grid" else sweep.limits.max_total_trials
