"""Job file models and loaders. ``JobSpec`` is the one definition of a job: the
YAML file format, the REST API's request body and ``show -o json`` all use it."""

from raybatch.spec.job import (
    JobSpec,
    NodeResources,
    OutputSpec,
    InputSpec,
    RetryPolicy,
    Placement,
    PRIORITY_NAMES,
)
from raybatch.spec.loader import SpecError, load_job_file, parse_job

__all__ = [
    "JobSpec",
    "NodeResources",
    "InputSpec",
    "OutputSpec",
    "RetryPolicy",
    "Placement",
    "PRIORITY_NAMES",
    "SpecError",
    "load_job_file",
    "parse_job",
]
