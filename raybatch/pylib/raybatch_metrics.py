"""Report a metric from any script raybatch runs: ``raybatch.log_metric`` or, where raybatch
is not installed (a container image, another Python), ``import raybatch_metrics`` (this
directory is on every rank's PYTHONPATH). Stdlib only.

    from raybatch_metrics import log_metric      # or: from raybatch import log_metric
    log_metric("accuracy", 0.93, step=5)

Each call appends one JSON line to ``$RAYBATCH_METRICS_FILE``; the rank's actor reads it
(so does a sweep's objective). Outside raybatch (the variable unset) it does nothing.
Two other ways reach the same place: a stdout line ``RAYBATCH_METRIC accuracy=0.93 step=5``,
and ``mlflow.log_metric`` (MLflow's tracking URI is a per-rank SQLite file unless
``MLFLOW_TRACKING_URI`` is set)."""

import json
import math
import os
import time

ENV = "RAYBATCH_METRICS_FILE"


def log_metric(name, value, step=None):
    """Record ``value`` (a number) of metric ``name`` at ``step`` (an integer, or None:
    the next one)."""
    path = os.environ.get(ENV)
    if not path:
        return
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"metric {name!r}: {value} is not a finite number")
    record = {"name": str(name), "value": value, "step": None if step is None else int(step), "t": time.time()}
    with open(path, "a") as f:  # one write of one line: lines of concurrent writers do not interleave
        f.write(json.dumps(record) + "\n")
