"""The tensorflow adapter without Ray: TF_CONFIG for both layouts, roles, commands,
Batch AI's variables and thread settings."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from raybatch import frameworks
from raybatch.frameworks.base import RankContext
from raybatch.spec.job import JobSpec

TF = frameworks.get("tensorflow")


def peers(n: int) -> list[str]:
    return [f"10.0.0.{1 + r // 2}:{7000 + r}" for r in range(n)]


def ctx(rank: int, ppn: int = 1, nodes: int = 2) -> RankContext:
    return RankContext(job_id="j1", attempt=1, rank=rank, local_rank=rank % ppn, node_rank=rank // ppn,
                       num_nodes=nodes, processes_per_node=ppn, master_addr="10.0.0.1", master_port=7000,
                       node_ip=f"10.0.0.{1 + rank // 2}", job_dir="/jobs/j1", stdouterr_dir="/so",
                       checkpoint_dir="/c", job_temp="/t", shared_job_temp="/s", workdir="/code",
                       peers=peers(nodes * ppn))


def spec(**kw) -> JobSpec:
    return JobSpec(**{"name": "tf", "command": "python train.py", "framework": "tensorflow", "nodes": 2, **kw})


def env_of(s: JobSpec, rank: int) -> dict[str, str]:
    return TF.rank_env(s, ctx(rank, s.processes_per_node, s.nodes))


def test_registered():
    assert TF.name == "tensorflow" and type(TF).__name__ == "TensorFlowFramework"


def test_all_reduce_layout_every_rank_is_a_worker():
    s = spec(processes_per_node=2)  # no tensorflow block: 0 parameter servers
    assert [TF.role(s, r) for r in range(4)] == ["worker"] * 4
    assert TF.ends_with_rank0(s) is False
    for r in range(4):
        env = env_of(s, r)
        assert json.loads(env["TF_CONFIG"]) == {"cluster": {"worker": peers(4)},
                                                "task": {"type": "worker", "index": r}}
        assert (env["RAYBATCH_TF_ROLE"], env["RAYBATCH_TF_TASK_INDEX"]) == ("worker", str(r))
        assert env["AZ_BATCHAI_WORKER_HOSTS"] == ",".join(peers(4))
        assert env["AZ_BATCHAI_PS_HOSTS"] == ""
        assert env["AZ_BATCHAI_TASK_INDEX"] == str(r)
        assert env["RANK"] == str(r) and env["WORLD_SIZE"] == "4"  # the contract is still there
        assert TF.command(s, ctx(r, 2)) == ["/bin/bash", "-c", "python train.py"]
    # rank 0's address is MASTER_PORT's
    assert json.loads(env_of(s, 0)["TF_CONFIG"])["cluster"]["worker"][0].endswith(":7000")


def test_all_reduce_layout_with_an_explicit_block_and_worker_command():
    s = spec(tensorflow={"parameter_servers": 0, "worker_command": "python train.py --worker"})
    assert [TF.role(s, r) for r in range(2)] == ["worker", "worker"]
    assert TF.ends_with_rank0(s) is False
    # rank 0 is Batch AI's master: it runs `command`; the other workers the worker command
    assert TF.command(s, ctx(0))[-1] == "python train.py"
    assert TF.command(s, ctx(1))[-1] == "python train.py --worker"


def test_parameter_server_layout():
    s = spec(processes_per_node=3, tensorflow={"parameter_servers": 2})
    n = 6
    roles = [TF.role(s, r) for r in range(n)]
    assert roles == ["chief", "ps", "ps", "worker", "worker", "worker"]
    assert TF.ends_with_rank0(s) is True
    cluster = {"chief": peers(n)[:1], "ps": peers(n)[1:3], "worker": peers(n)[3:]}
    expected = [("chief", 0), ("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1), ("worker", 2)]
    for r, (task_type, index) in enumerate(expected):
        env = env_of(s, r)
        assert json.loads(env["TF_CONFIG"]) == {"cluster": cluster, "task": {"type": task_type, "index": index}}
        assert (env["RAYBATCH_TF_ROLE"], env["RAYBATCH_TF_TASK_INDEX"]) == (task_type, str(index))
        assert env["AZ_BATCHAI_PS_HOSTS"] == ",".join(cluster["ps"])
        # Batch AI's master was worker 0: the chief heads the worker list
        assert env["AZ_BATCHAI_WORKER_HOSTS"] == ",".join(cluster["chief"] + cluster["worker"])
    assert [env_of(s, r)["AZ_BATCHAI_TASK_INDEX"] for r in range(n)] == ["0", "0", "1", "1", "2", "3"]


def test_parameter_server_layout_commands():
    s = spec(processes_per_node=2, tensorflow={"parameter_servers": 1})
    assert [TF.command(s, ctx(r, 2))[-1] for r in range(4)] == ["python train.py"] * 4
    s = spec(processes_per_node=2, tensorflow={"parameter_servers": 1, "worker_command": "python w.py",
                                               "parameter_server_command": "python ps.py"})
    assert [TF.command(s, ctx(r, 2)) for r in range(4)] == [
        ["/bin/bash", "-c", "python train.py"], ["/bin/bash", "-c", "python ps.py"],
        ["/bin/bash", "-c", "python w.py"], ["/bin/bash", "-c", "python w.py"]]


def test_thread_settings_follow_the_ranks_share_and_the_user_wins():
    env = env_of(spec(processes_per_node=2, resources={"cpus": 1}), 0)
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"], env["OMP_NUM_THREADS"]) == ("1", "2", "1")
    env = env_of(spec(processes_per_node=2, resources={"cpus": 16}), 1)
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"], env["OMP_NUM_THREADS"]) == ("8", "8", "8")
    env = env_of(spec(environment={"TF_NUM_INTRAOP_THREADS": "3", "TF_CONFIG": "{}"}), 0)
    assert env["TF_NUM_INTRAOP_THREADS"] == "3" and env["TF_CONFIG"] == "{}"


def test_too_few_ranks_for_the_parameter_servers_is_a_spec_error():
    with pytest.raises(ValidationError, match="need at least 3 ranks"):
        spec(tensorflow={"parameter_servers": 1})  # 2 ranks: a chief and a ps, no worker
    with pytest.raises(ValidationError, match="applies to framework tensorflow"):
        JobSpec(name="x", command="x", framework="pytorch", tensorflow={"parameter_servers": 0})


def test_recipe_job_files():
    from raybatch.spec.loader import load_job_file
    from tests.conftest import RECIPES

    s = load_job_file(RECIPES / "tensorflow-digits-multiworker" / "job.yaml")
    assert (s.framework, s.nodes, s.processes_per_node) == ("tensorflow", 2, 1)
    assert [TF.role(s, r) for r in range(s.world_size)] == ["worker", "worker"]
    s = load_job_file(RECIPES / "tensorflow-digits-ps" / "job.yaml")
    assert (s.framework, s.nodes, s.processes_per_node, s.tensorflow.parameter_servers) == ("tensorflow", 2, 2, 1)
    assert [TF.role(s, r) for r in range(s.world_size)] == ["chief", "ps", "worker", "worker"]


def test_uneven_layout_leaves_the_last_slots_idle():
    """Batch AI's 1 ps + 2 workers on 2 nodes: chief and ps on node 0, the worker and an
    idle slot on node 1; the idle rank runs nothing and is not in TF_CONFIG."""
    s = spec(processes_per_node=2, tensorflow={"parameter_servers": 1, "workers": 2, "worker_command": "w"})
    fw = TF
    assert [fw.role(s, r) for r in range(4)] == ["chief", "ps", "worker", "idle"]
    assert fw.command(s, ctx(3, ppn=2)) is None and fw.environment(s, ctx(3, ppn=2)) == {}
    assert fw.command(s, ctx(2, ppn=2)) == ["/bin/bash", "-c", "w"]
    env = fw.environment(s, ctx(2, ppn=2))
    config = json.loads(env["TF_CONFIG"])
    assert config["task"] == {"type": "worker", "index": 0}
    assert {k: len(v) for k, v in config["cluster"].items()} == {"chief": 1, "ps": 1, "worker": 1}
    assert env["AZ_BATCHAI_TASK_INDEX"] == "1" and len(env["AZ_BATCHAI_WORKER_HOSTS"].split(",")) == 2
    # all-reduce with an odd worker count: the idle rank does not hold the job open
    s = spec(processes_per_node=2, tensorflow={"parameter_servers": 0, "workers": 3})
    assert [fw.role(s, r) for r in range(4)] == ["worker", "worker", "worker", "idle"]
    assert not fw.ends_with_rank0(s)
