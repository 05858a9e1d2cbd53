"""One module per framework: a job spec and a rank's place in the gang become
that rank's command and environment. ``get(name)`` returns the adapter."""

from raybatch.frameworks.base import Framework, RankContext, contract_env
from raybatch.frameworks.chainer import ChainerFramework
from raybatch.frameworks.custom import CustomFramework
from raybatch.frameworks.horovod import HorovodFramework
from raybatch.frameworks.mpi import MpiFramework
from raybatch.frameworks.pytorch import PyTorchFramework
from raybatch.frameworks.tensorflow import TensorFlowFramework

_REGISTRY: dict[str, Framework] = {
    f.name: f for f in (CustomFramework(), PyTorchFramework(), MpiFramework(), ChainerFramework(),
                        HorovodFramework(), TensorFlowFramework())
}


def names() -> list[str]:
    """Every framework a job file may name."""
    return list(_REGISTRY)


def get(name: str) -> Framework:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown framework '{name}'; allowed: {', '.join(sorted(_REGISTRY))}") from None


__all__ = ["Framework", "RankContext", "contract_env", "get", "names"]
