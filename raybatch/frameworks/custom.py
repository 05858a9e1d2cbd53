"""framework: custom — any shell command. By default every rank runs it; with
``custom: {run_on: first_node}`` rank 0 alone runs it while the other nodes stay
reserved for it (Batch AI's customToolkitSettings ran the command on the first node)."""

from typing import Optional

from raybatch.frameworks.base import Framework, RankContext
from raybatch.spec.job import JobSpec


def _first_node_only(spec: JobSpec) -> bool:
    return spec.custom is not None and spec.custom.run_on == "first_node"


class CustomFramework(Framework):
    name = "custom"

    def role(self, spec: JobSpec, rank: int) -> str:
        if _first_node_only(spec):
            return "launcher" if rank == 0 else "idle"
        return "rank"

    def ends_with_rank0(self, spec: JobSpec) -> bool:
        return _first_node_only(spec)

    def command(self, spec: JobSpec, ctx: RankContext) -> Optional[list[str]]:
        if _first_node_only(spec) and ctx.rank != 0:
            return None
        return super().command(spec, ctx)
