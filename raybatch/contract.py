"""Names of the environment contract that cross layers: set by a framework adapter
(``raybatch.frameworks``) and read by a process raybatch starts that must not import
the package's heavy parts (the MPI rsh agent, started by mpirun on every node). Stdlib
only, and nothing of raybatch's."""

MPI_AGENT_SOCKET_ENV = "RAYBATCH_MPI_AGENT_SOCKET"  # rank 0's agent server (frameworks.mpi sets it)
MPI_AGENT_KEY_ENV = "RAYBATCH_MPI_AGENT_KEY_FILE"  # the attempt's key file (rank 0's environment)


def mpi_agent_key_file(socket_path: str) -> str:
    """The attempt's MPI agent key, beside its socket (both in the per-user 0700 directory)."""
    return socket_path + ".key"

# Where `raybatch node-setup` mounts a cluster's file systems (Batch AI's mountVolumes) on
# every node, unless its mounts file says `root:`; converted Batch AI job files name it
# with --mount-root (the converter's error says so).
NODE_MOUNT_ROOT = "/mnt/raybatch"
