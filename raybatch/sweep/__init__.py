"""Hyperparameter sweeps on Ray Tune, on the slots of one queued job (docs/sweeps.md).

- ``space``: the sweep file's search space, sampling and policies as Ray Tune's;
- ``policies``: Azure ML's early-termination rules (bandit, truncation selection), as
  pure functions and as Tune schedulers;
- ``trials``: each trial's record and the sweep's journal in the job directory, ranking;
- ``pool``: the slots of a sweep's attempt and the trials that run on them (a Ray actor);
- ``driver``: the attempt's Ray Job: ``Tuner`` over thin trial proxies;
- ``plot``: a sweep as a picture (metric vs step per trial, parallel coordinates).

Modules that need Ray Tune import it themselves, and only once the slots are starting."""


def trial_id(job_id: str, n: int) -> str:
    """A sweep's trial as users name it: ``<sweep id>.t<n>``."""
    return f"{job_id}.t{n}"


def split_trial_id(text: str) -> "tuple[str, int | None]":
    """``rb-1a2b.t3`` -> (``rb-1a2b``, 3); a plain job id -> (it, None)."""
    job, sep, n = text.rpartition(".t")
    if sep and n.isdigit() and job:
        return job, int(n)
    return text, None
