"""Batch AI job files in the patterns of Microsoft's published recipes
(tests/fixtures/batchai), run as they are on a real 2-node Ray cluster with a real
raybatch server: CNTK Python under mpirun, Caffe2 on every node, a script fetched into
$AZ_BATCHAI_JOB_TEMP by jobPreparation, TensorFlow's uneven parameter-server layout, and
a script next to its job file submitted through the CLI from another directory.

The CNTK and Caffe2 jobs name container images, which cannot be pulled here (no network,
no podman): the test converts the job file as it is (image included) and submits the
converted job without its image, and the training scripts are plain-Python stand-ins
(fixtures/batchai/scripts/standin.py) started the way Batch AI started the toolkits
(mpirun for CNTK, one process per node for Caffe2). The conversions with the image are
asserted in tests/test_convert.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from raybatch.spec.loader import load_job_document
from tests.conftest import RAYBATCH

pytestmark = pytest.mark.timeout(300)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "batchai"


@pytest.fixture(scope="module")
def mount_root(tmp_path_factory):
    """A copy of the fixtures: the node mounts (`scripts`, `logs`) of --mount-root."""
    root = tmp_path_factory.mktemp("mounts")
    shutil.copytree(FIXTURES / "scripts", root / "scripts")
    (root / "logs").mkdir()
    return root


def submit(client, name: str, mount_root: Path, strip_image: bool = True):
    """Convert the job file as it is (with its image, as a user's submit would), then, since
    the image cannot be pulled here, submit the converted job without its image."""
    path = mount_root / name
    shutil.copy(FIXTURES / name, path)
    spec, _notes = load_job_document(path, [], str(mount_root))
    if strip_image:
        spec = spec.model_copy(update={"image": None})
    return client.submit(spec)


def records(done, output: str = "OUT") -> dict[str, dict]:
    out = Path(done.outputs[output])
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def explain(client, job_id):
    return client.logs(job_id, rank=0)[-2000:] + client.logs(job_id, rank=0, stream="stderr")[-3000:]


def test_cntk_python_stand_in_under_mpirun(client, mount_root):
    sub = submit(client, "cntk-python-mpi.json", mount_root)
    done = client.wait(sub.id, timeout=180)
    assert done.state == "SUCCEEDED", (done.reason, explain(client, sub.id))
    assert done.spec.framework == "mpi" and done.spec.image is None
    recs = records(done)
    assert sorted(recs) == ["cntk-0", "cntk-1", "cntk-2", "cntk-3"]  # processCount 4 under one mpirun
    assert {r["env"]["OMPI_COMM_WORLD_SIZE"] for r in recs.values()} == {"4"}
    assert {r["env"]["RAYBATCH_NODE_RANK"] for r in recs.values()} == {"0", "1"}
    assert all(r["script"] == str(mount_root / "scripts" / "standin.py") for r in recs.values())
    for r in recs.values():  # --datadir $AZ_BATCHAI_JOB_TEMP: the node's own, prepared by jobPreparation
        assert r["datadir"] == r["env"]["AZ_BATCHAI_JOB_TEMP"] and f"raybatch-{os.getuid()}/jobs/" in r["datadir"]
    assert str(done.job_dir).startswith(str(mount_root / "logs"))  # stdOutErrPathPrefix on the logs share


def test_caffe2_stand_in_on_every_node_meets_in_the_shared_job_temp(client, mount_root):
    sub = submit(client, "caffe2-image.json", mount_root)
    done = client.wait(sub.id, timeout=180)
    assert done.state == "SUCCEEDED", (done.reason, explain(client, sub.id))
    assert done.spec.framework == "custom"
    recs = records(done)
    assert sorted(recs) == ["caffe2-0", "caffe2-1"]
    assert len({r["env"]["RAYBATCH_NODE_RANK"] for r in recs.values()}) == 2
    stores = {r["env"]["AZ_BATCHAI_SHARED_JOB_TEMP"] for r in recs.values()}
    assert len(stores) == 1 and sorted(os.listdir(stores.pop())) == ["shard-0", "shard-1"]


def test_script_fetched_into_job_temp_by_job_preparation(client, mount_root):
    sub = submit(client, "jobtemp-script.json", mount_root)
    done = client.wait(sub.id, timeout=180)
    assert done.state == "SUCCEEDED", (done.reason, explain(client, sub.id))
    recs = records(done)
    assert sorted(recs) == ["bench-0", "bench-1"]
    for r in recs.values():  # each ran the copy jobPreparation put in its own node's job temp
        assert r["script"] == os.path.join(r["env"]["AZ_BATCHAI_JOB_TEMP"], "benchmarks", "standin.py")
    assert len({r["script"] for r in recs.values()}) == 2


def test_one_ps_and_two_workers_on_two_nodes(client, mount_root):
    sub = submit(client, "tf-uneven-ps.json", mount_root)
    done = client.wait(sub.id, timeout=180)
    assert done.state == "SUCCEEDED", (done.reason, explain(client, sub.id))
    ranks = done.attempts[-1].ranks
    assert [r.role for r in ranks] == ["chief", "ps", "worker", "idle"]
    assert ranks[0].node_id == ranks[1].node_id != ranks[2].node_id  # the ps beside the master, as on Batch AI
    recs = records(done)
    assert sorted(recs) == ["master-0", "ps-0", "worker-1"]  # Batch AI's task indexes: master 0, worker 1, ps 0
    cluster = json.loads(recs["master-0"]["env"]["TF_CONFIG"])["cluster"]
    assert [len(cluster[k]) for k in ("chief", "ps", "worker")] == [1, 1, 1]
    assert recs["worker-1"]["env"]["AZ_BATCHAI_PS_HOSTS"] == cluster["ps"][0]
    assert "--ps_hosts=" + cluster["ps"][0] in recs["master-0"]["argv"]


def test_relative_script_next_to_the_job_file_through_the_cli(server, tmp_path):
    job_dir = tmp_path / "project"
    shutil.copytree(FIXTURES / "relative", job_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "RAYBATCH_ADDRESS": server.url, "RAYBATCH_TOKEN": server.token}
    p = subprocess.run([RAYBATCH, "submit", str(job_dir / "job.json"), "--wait", "--timeout", "150"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "'train.py' is relative: the job file's directory is shipped with the job" in p.stderr
    client = server.client()
    done = client.get(p.stdout.split()[0])  # submit prints the job's id first
    assert done.state == "SUCCEEDED"
    logs = client.logs(done.id, rank=0) + client.logs(done.id, rank=1)
    assert "relative script rank 0 of 2" in logs and "relative script rank 1 of 2" in logs
    assert "hello from helper.py --steps 3" in logs
