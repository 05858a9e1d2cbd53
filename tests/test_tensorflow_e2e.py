"""framework: tensorflow end to end on a real 2-node Ray cluster with a real raybatch
server: TF_CONFIG on the gang, the multi-worker (all-reduce) recipe, the parameter-server
recipe (the job ends with its chief), and the recipe's Batch AI job.json as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import RECIPES

pytestmark = pytest.mark.timeout(300)


def accuracy(client, job_id: str) -> float:
    log = client.logs(job_id, rank=0)
    m = re.search(r"test accuracy: ([0-9.]+)", log)
    assert m, log[-2000:] + client.logs(job_id, rank=0, stream="stderr")[-3000:]
    return float(m.group(1))


def test_tf_config_on_the_gang_and_the_chief_ends_the_job(client, tmp_path):
    """No TensorFlow: each rank writes its environment; the ps and workers then wait
    forever, like TF2 servers, and the job ends when the chief exits."""
    out = tmp_path / "envs"
    dump = ('env | grep -E "^(TF_CONFIG|RAYBATCH_TF_[A-Z_]+|AZ_BATCHAI_(PS_HOSTS|WORKER_HOSTS|TASK_INDEX)|RANK|'
            'TF_NUM_[A-Z_]+|OMP_NUM_THREADS)=" | sort > "$RAYBATCH_OUTPUT_ENVS/.rank-$RANK"; '
            'mv "$RAYBATCH_OUTPUT_ENVS/.rank-$RANK" "$RAYBATCH_OUTPUT_ENVS/rank-$RANK.env"')
    sub = client.submit({
        "name": "tf-env", "experiment": "tests", "framework": "tensorflow", "nodes": 2, "processes_per_node": 2,
        "resources": {"cpus": 1}, "outputs": {"envs": {"path": str(out)}},
        "tensorflow": {"parameter_servers": 1, "parameter_server_command": f"echo ps up; {dump}; sleep 300",
                       "worker_command": f"echo worker up; {dump}; sleep 300"},
        # the chief waits until the others are up, as a coordinator would
        "command": f'{dump}; while [ "$(ls "$RAYBATCH_OUTPUT_ENVS"/*.env 2>/dev/null | wc -l)" -lt 4 ]; '
                   "do sleep 0.2; done; echo chief done",
    })
    done = client.wait(sub.id, timeout=120)
    assert done.state == "SUCCEEDED", done.reason
    assert "rank 0 (chief) exited 0" in done.reason
    ranks = done.attempts[-1].ranks
    assert [r.role for r in ranks] == ["chief", "ps", "worker", "worker"]
    assert ranks[0].exit_code == 0
    assert [r.exit_code for r in ranks[1:]] == [143, 143, 143]  # stopped once the chief was done
    assert done.ended_at - done.started_at < 60
    envs = {}
    for r in range(4):
        envs[r] = dict(line.split("=", 1) for line in (out / f"rank-{r}.env").read_text().splitlines())
    configs = [json.loads(envs[r]["TF_CONFIG"]) for r in range(4)]
    cluster = configs[0]["cluster"]
    assert all(c["cluster"] == cluster for c in configs)
    assert [c["task"] for c in configs] == [{"type": "chief", "index": 0}, {"type": "ps", "index": 0},
                                           {"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    addresses = cluster["chief"] + cluster["ps"] + cluster["worker"]
    assert len(set(addresses)) == 4  # a port of its own for every rank
    for rank, address in zip(ranks, addresses):
        assert address.rsplit(":", 1)[0] == rank.node_ip
    assert [envs[r]["RAYBATCH_TF_ROLE"] for r in range(4)] == ["chief", "ps", "worker", "worker"]
    assert [envs[r]["RAYBATCH_TF_TASK_INDEX"] for r in range(4)] == ["0", "0", "0", "1"]
    assert [envs[r]["AZ_BATCHAI_TASK_INDEX"] for r in range(4)] == ["0", "0", "1", "2"]
    assert envs[1]["AZ_BATCHAI_PS_HOSTS"] == cluster["ps"][0]
    assert envs[2]["AZ_BATCHAI_WORKER_HOSTS"] == ",".join(cluster["chief"] + cluster["worker"])
    assert (envs[3]["TF_NUM_INTRAOP_THREADS"], envs[3]["TF_NUM_INTEROP_THREADS"]) == ("1", "2")
    assert "ps up" in client.logs(sub.id, rank=1) and "worker up" in client.logs(sub.id, rank=3)


def test_multiworker_recipe_on_two_nodes(client):
    sub = client.submit(RECIPES / "tensorflow-digits-multiworker" / "job.yaml",
                        overrides=["command=python train.py --epochs 10"])
    done = client.wait(sub.id, timeout=240)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(sub.id, stream="stderr")[-3000:])
    ranks = done.attempts[-1].ranks
    assert [(r.rank, r.role, r.exit_code) for r in ranks] == [(0, "worker", 0), (1, "worker", 0)]
    assert len({r.node_id for r in ranks}) == 2, "ranks must run on distinct nodes"
    assert accuracy(client, sub.id) > 0.95
    model_dir = Path(done.outputs["model"])
    assert (model_dir / "model.keras").stat().st_size > 0
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["replicas"] == 2
    assert "worker 1 of 2" in client.logs(sub.id, rank=1)
    assert sorted(p.name for p in model_dir.iterdir()) == ["metrics.json", "model.keras"]  # only the chief's


def test_parameter_server_recipe_ends_with_its_chief(client):
    sub = client.submit(RECIPES / "tensorflow-digits-ps" / "job.yaml", overrides=["command=python train.py --epochs 6"])
    done = client.wait(sub.id, timeout=240)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(sub.id, stream="stderr")[-3000:])
    assert "rank 0 (chief) exited 0" in done.reason
    ranks = done.attempts[-1].ranks
    assert [r.role for r in ranks] == ["chief", "ps", "worker", "worker"]
    assert ranks[0].exit_code == 0 and all(r.exit_code == 143 for r in ranks[1:])
    assert len({r.node_id for r in ranks}) == 2
    assert accuracy(client, sub.id) > 0.9
    assert "ps 0: serving at" in client.logs(sub.id, rank=1)
    assert "worker 1: serving at" in client.logs(sub.id, rank=3)
    metrics = json.loads((Path(done.outputs["model"]) / "metrics.json").read_text())
    assert (metrics["workers"], metrics["parameter_servers"]) == (2, 1)


def test_batchai_job_json_of_the_multiworker_recipe_runs_as_is(client):
    sub = client.submit(RECIPES / "tensorflow-digits-multiworker" / "job.batchai.json",
                        mount_root=str(RECIPES.parent))
    done = client.wait(sub.id, timeout=240)
    assert done.state == "SUCCEEDED", (done.reason, client.logs(sub.id, stream="stderr")[-3000:])
    assert done.name == "tensorflow-digits-multiworker-batchai" and done.spec.framework == "tensorflow"
    assert len({r.node_id for r in done.attempts[-1].ranks}) == 2
    assert accuracy(client, sub.id) > 0.95
    assert (Path(done.outputs["MODEL"]) / "model.keras").stat().st_size > 0
