"""framework: horovod — Horovod over MPI (Batch AI's horovodSettings).

Launched like ``mpi``: rank 0 runs mpirun over the gang, one process per slot, and
``hvd.init()`` finds its rank through MPI. Horovod must be in the job's environment
(an image, or ``packages``); raybatch does not install it. Note: horovod 0.28.1, the
last release, does not build against torch >= 2.1 (C++17; horovod#3996), so on
current PyTorch prefer ``framework: pytorch`` (DDP) — see docs/frameworks.md."""

from raybatch.frameworks.base import RankContext
from raybatch.frameworks.mpi import MpiFramework
from raybatch.spec.job import JobSpec


class HorovodFramework(MpiFramework):
    name = "horovod"

    def mpirun_options(self, spec: JobSpec) -> list[str]:
        # Horovod's recommended Open MPI settings: TCP between nodes, no fork warnings
        return ["--mca", "pml", "ob1", "--mca", "btl", "^openib"]

    def environment(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        env = super().environment(spec, ctx)
        env["HOROVOD_CPU_OPERATIONS"] = env.get("HOROVOD_CPU_OPERATIONS", "mpi")
        return env
