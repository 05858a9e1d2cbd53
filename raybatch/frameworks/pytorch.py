"""framework: pytorch — the user's script with torch.distributed wired up.

Each rank gets what torchrun would set (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK), so
``init_process_group(init_method="env://")`` just works, plus Batch AI's
AZ_BATCHAI_PYTORCH_INIT_METHOD / AZ_BATCHAI_PYTORCH_BACKEND (pyTorchSettings)."""

from raybatch.frameworks.base import Framework, RankContext
from raybatch.spec.job import JobSpec


class PyTorchFramework(Framework):
    name = "pytorch"

    def environment(self, spec: JobSpec, ctx: RankContext) -> dict[str, str]:
        backend = "nccl" if spec.resources.gpus else "gloo"
        return {
            "AZ_BATCHAI_PYTORCH_INIT_METHOD": f"tcp://{ctx.master_addr}:{ctx.master_port}",
            "AZ_BATCHAI_PYTORCH_BACKEND": backend,
            "RAYBATCH_PYTORCH_BACKEND": backend,
            # one thread per process unless the user says otherwise: ranks share nodes' cores
            "OMP_NUM_THREADS": str(max(1, int(spec.resources.cpus // spec.processes_per_node))),
        }
