"""raybatch: Azure Batch AI, rebuilt on Ray.

Describe the compute, the job and its storage in one file; raybatch queues it by
priority, gang-schedules it on a Ray cluster, runs the user's unmodified script on
every rank and hands back logs and outputs.
"""

__version__ = "0.1.0"

from raybatch.client import Client, RaybatchError  # noqa: E402

__all__ = ["Client", "RaybatchError", "__version__"]
