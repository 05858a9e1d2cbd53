"""raybatch: Azure Batch AI, rebuilt on Ray.

Describe the compute, the job and its storage in one file; raybatch queues it by
priority, gang-schedules it on a Ray cluster, runs the user's unmodified script on
every rank and hands back logs and outputs.

``from raybatch import Client`` is resolved lazily: the attempt driver and the
rank actors import ``raybatch.runtime`` and must not pay for the SDK's HTTP stack.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "RaybatchError", "__version__", "log_metric"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "RaybatchError"):
        from raybatch import client  # noqa: PLC0415

        return getattr(client, name)
    if name == "log_metric":  # stdlib only: a rank's script pays nothing for it
        from raybatch.pylib.raybatch_metrics import log_metric  # noqa: PLC0415

        return log_metric
    raise AttributeError(f"module 'raybatch' has no attribute {name!r}")
