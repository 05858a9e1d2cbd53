"""framework: chainer — ChainerMN over MPI (Batch AI's chainerSettings).

Launched exactly like ``mpi``: rank 0 runs mpirun over the gang, one process per slot;
the script calls ``chainermn.create_communicator(...)``, which reads its rank from
mpi4py. Chainer 7.8.1 (the last release) needs numpy < 2 and setuptools < 82, so jobs
give it its own environment: ``packages: {pip: [chainer==7.8.1, "numpy<2",
"setuptools<82"]}``. On CPU nodes use the 'naive' communicator (the default
'pure_nccl' needs CuPy and GPUs)."""

from raybatch.frameworks.base import RankContext
from raybatch.frameworks.mpi import MpiFramework
from raybatch.spec.job import JobSpec


class ChainerFramework(MpiFramework):
    name = "chainer"

    def environment(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        env = super().environment(spec, ctx)
        # Batch AI-era scripts pick the communicator from the GPUs they were given
        env["RAYBATCH_CHAINERMN_COMMUNICATOR"] = "pure_nccl" if spec.resources.gpus else "naive"
        return env
