"""The sweep file: a hyperparameter sweep of any job, Azure ML's sweep job for raybatch.

    name: digits-sweep
    experiment: recipes
    trial: job.yaml          # any job file (any framework, nodes > 1, ...), or the job inline
    search_space:
      lr: {type: loguniform, min_value: -9.2, max_value: -2.3}   # exp(uniform(-9.2, -2.3))
      hidden: {type: choice, values: [32, 64, 128]}
    sampling_algorithm: random   # grid | bayesian | {type: random, seed: 1, logbase: 10}
    objective: {primary_metric: accuracy, goal: maximize}
    early_termination: {type: bandit, slack_factor: 0.1, evaluation_interval: 1, delay_evaluation: 3}
    limits: {max_total_trials: 16, max_concurrent_trials: 2, timeout: 2h, trial_timeout: 10m}

A trial's parameters reach its command as ``${{search_space.X}}`` (shell-quoted), and
its processes as ``RAYBATCH_PARAM_X`` and ``AZUREML_SWEEP_X``. The distributions are
Azure ML's (``loguniform``: exp(uniform(min_value, max_value)); ``q*``: rounded to a
multiple of q), and so are the rules: grid takes choice only; bayesian takes choice,
uniform and quniform, and no early termination.

This module is the file format and the sampling of one parameter; ``raybatch.sweep``
turns it into Ray Tune's search space, search algorithm and scheduler."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raybatch.spec.units import DURATION_HELP, parse_duration

PARAM_PLACEHOLDER = re.compile(r"\$\{\{\s*search_space\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Choice(_Strict):
    type: Literal["choice"]
    values: list[Union[str, int, float, bool]] = Field(min_length=1)


class Randint(_Strict):
    type: Literal["randint"]
    upper: int = Field(ge=1, description="integers 0 .. upper-1")


class Uniform(_Strict):
    type: Literal["uniform"]
    min_value: float
    max_value: float


class QUniform(Uniform):
    type: Literal["quniform"]  # type: ignore[assignment]
    q: float = Field(gt=0)


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]


class QLogUniform(Uniform):
    type: Literal["qloguniform"]  # type: ignore[assignment]
    q: float = Field(gt=0)


class Normal(_Strict):
    type: Literal["normal"]
    mu: float
    sigma: float = Field(gt=0)


class QNormal(Normal):
    type: Literal["qnormal"]  # type: ignore[assignment]
    q: float = Field(gt=0)


class LogNormal(Normal):
    type: Literal["lognormal"]  # type: ignore[assignment]


class QLogNormal(Normal):
    type: Literal["qlognormal"]  # type: ignore[assignment]
    q: float = Field(gt=0)


Param = Annotated[Union[Choice, Randint, Uniform, QUniform, LogUniform, QLogUniform, Normal, QNormal,
                        LogNormal, QLogNormal], Field(discriminator="type")]
PARAM_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform", "normal", "qnormal",
               "lognormal", "qlognormal")


class SamplingAlgorithm(_Strict):
    type: Literal["random", "grid", "bayesian"] = "random"
    seed: Optional[int] = Field(None, description="random: the seed (a sweep's parameters are then reproducible)")
    logbase: Optional[Union[float, Literal["e"]]] = Field(
        None, description="random: the base of log distributions (default e: loguniform is exp(uniform))")
    rule: Optional[Literal["random", "sobol"]] = None

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: Optional[str]) -> Optional[str]:
        if v == "sobol":
            raise ValueError("'sobol' is not available: raybatch samples with Ray Tune's random search; "
                             "use rule: random (or leave it out)")
        return v

    @field_validator("logbase")
    @classmethod
    def _logbase(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and (v <= 0 or v == 1):
            raise ValueError("must be a positive number other than 1, or 'e'")
        return v

    @property
    def base(self) -> float:
        return math.e if self.logbase in (None, "e") else float(self.logbase)


class Objective(_Strict):
    primary_metric: str = Field(min_length=1, description="the metric the trials report (log_metric, "
                                "RAYBATCH_METRIC lines, mlflow.log_metric)")
    goal: Literal["maximize", "minimize"]


class _Interval(_Strict):
    evaluation_interval: int = Field(1, ge=0, description="apply the policy every this many reports "
                                     "of the primary metric (0: every report)")
    delay_evaluation: int = Field(0, ge=0, description="reports before the first evaluation")


class Bandit(_Interval):
    """Stop a trial whose metric is worse than the best trial's by more than the slack."""

    type: Literal["bandit"]
    slack_factor: Optional[float] = Field(None, gt=0)
    slack_amount: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _slack(self) -> "Bandit":
        if (self.slack_factor is None) == (self.slack_amount is None):
            raise ValueError("give exactly one of slack_factor and slack_amount")
        return self


class MedianStopping(_Interval):
    """Stop a trial whose best metric is worse than the median of the trials' running averages."""

    type: Literal["median_stopping"]


class TruncationSelection(_Interval):
    """At each evaluation, stop the trials in the worst truncation_percentage %."""

    type: Literal["truncation_selection"]
    truncation_percentage: int = Field(ge=1, le=99)
    exclude_finished_jobs: bool = False


class Asha(_Strict):
    """Asynchronous successive halving (Ray Tune's ASHAScheduler); raybatch's own."""

    type: Literal["asha"]
    max_t: int = Field(100, ge=1, description="reports a trial may make at most")
    grace_period: int = Field(1, ge=1, description="reports before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1)


EarlyTermination = Annotated[Union[Bandit, MedianStopping, TruncationSelection, Asha], Field(discriminator="type")]


class Limits(_Strict):
    max_total_trials: int = Field(1000, ge=1, le=100_000)
    max_concurrent_trials: int = Field(1, ge=1, le=1000, description="slots: trials running at once")
    timeout: Optional[float] = Field(None, description=f"the whole sweep ({DURATION_HELP})")
    trial_timeout: float = Field(3600.0, description=f"one trial; a slot is leased this long ({DURATION_HELP})")

    @field_validator("timeout", "trial_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Optional[float]:
        return None if v is None else parse_duration(v)


class SweepSpec(_Strict):
    """A job's ``sweep:`` block: the job is the trial; the rest says what to try (a sweep
    file's and Azure ML's sweep YAML's fields of the same names: ``SWEEP_FIELDS``)."""

    search_space: dict[str, Param] = Field(min_length=1)
    sampling_algorithm: SamplingAlgorithm = Field(default_factory=SamplingAlgorithm)
    objective: Objective
    early_termination: Optional[EarlyTermination] = None
    limits: Limits = Field(default_factory=Limits)

    @field_validator("sampling_algorithm", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @field_validator("search_space")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not PARAM_NAME.fullmatch(name):
                raise ValueError(f"'{name}' is not a parameter name (letters, digits and '_', not starting "
                                 "with a digit: it becomes RAYBATCH_PARAM_<NAME>)")
        return v

    @model_validator(mode="after")
    def _rules(self) -> "SweepSpec":
        kind = self.sampling_algorithm.type
        allowed = {"grid": ("choice",), "bayesian": ("choice", "uniform", "quniform")}.get(kind)
        if allowed:
            bad = {n: p.type for n, p in self.search_space.items() if p.type not in allowed}
            if bad:
                name, t = next(iter(bad.items()))
                raise ValueError(f"search_space.{name}: {kind} sampling takes {' and '.join(allowed)} "
                                 f"parameters, not {t}")
        if kind == "bayesian" and self.early_termination is not None:
            raise ValueError("early_termination: bayesian sampling cannot be combined with early termination "
                             "(Azure ML's rule): remove one of them")
        if kind != "random" and (self.sampling_algorithm.seed is not None or self.sampling_algorithm.logbase):
            raise ValueError(f"sampling_algorithm: seed and logbase apply to random sampling, not {kind}")
        return self

    @property
    def grid_size(self) -> int:
        """Grid: how many combinations (each is one trial)."""
        n = 1
        for p in self.search_space.values():
            n *= len(p.values)  # type: ignore[union-attr]
        return n

    @property
    def total_trials(self) -> int:
        """Trials the sweep runs at most: a grid runs each combination once."""
        if self.sampling_algorithm.type == "grid":
            return min(self.grid_size, self.limits.max_total_trials)
        return self.limits.max_total_trials


def param_value(p: Any, raw: Any, base: float = math.e) -> Any:
    """A parameter's value from what the search algorithm drew: the draw is uniform or
    normal, and the log and q kinds transform it (Azure ML's definitions)."""
    t = p.type
    if t in ("choice", "randint"):
        return raw
    value = float(raw)
    if t in ("loguniform", "qloguniform", "lognormal", "qlognormal"):
        value = base ** value
    if t.startswith("q"):
        value = round(value / p.q) * p.q
    return value


SWEEP_FIELDS = tuple(SweepSpec.model_fields)  # search_space, sampling_algorithm, objective, ...
