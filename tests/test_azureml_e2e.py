"""Azure ML command jobs with local inputs, end to end on a real 2-node Ray cluster and a
real raybatch server, through the CLI as users run it (``raybatch submit job.yml --wait``):
a file as Azure ML's CLI v2 docs write it, and the file azure-ai-ml itself dumps. Each
node's ranks read the uploaded folder and file from the node's input cache; the server
keeps each upload once, by its content."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raybatch.runtime.code import package_code, package_input
from tests.conftest import ServerProcess, run_cli, stop_everything
from tests.test_azureml_files import AZURE_AI_ML, project, sdk_dump

pytestmark = pytest.mark.timeout(300)

TRAIN = """\
import argparse, os, pathlib
p = argparse.ArgumentParser()
for a in ("--data", "--labels", "--epochs", "--lr", "--tag", "--out", "--seed"):
    p.add_argument(a)
a = p.parse_args()
data = pathlib.Path(a.data)
files = sorted(str(f.relative_to(data)) for f in data.rglob("*") if f.is_file())
words = [(data / f).read_text().strip() for f in files]
label = pathlib.Path(a.labels).read_text().splitlines()[1]
cached = "/inputs/trees/upload-" in a.data and "/inputs/trees/upload-" in a.labels
rank = os.environ["RANK"]
print(f"rank={rank} files={','.join(files)} words={','.join(words)} label={label} epochs={a.epochs} "
      f"lr={a.lr} tag={a.tag} seed={a.seed} cached={cached}", flush=True)
pathlib.Path(a.out, f"rank{rank}.txt").write_text(label)
"""


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("server")
    s = ServerProcess(ray_cluster, state, env={"RAYBATCH_CACHE_DIR": str(state / "cache")}).start()
    yield s
    try:
        stop_everything(s)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("azureml-job")
    project(d)
    (d / "src" / "train.py").write_text(TRAIN)
    return d


def run(server, job_file: Path) -> str:
    p = run_cli(server, "submit", str(job_file), "--wait", "--timeout", "150", timeout=200)
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = p.stdout.split()[0]
    for rank in (0, 1):
        log = run_cli(server, "logs", job_id, "--rank", str(rank), check=True).stdout
        assert f"rank={rank} files=a.txt,part/b.txt words=alpha,beta label=1,7" in log, log
        assert "tag=two words" in log and "cached=True" in log, log
    return log


def test_a_cli_v2_job_with_local_inputs_runs_on_two_nodes(server, job_dir):
    log = run(server, job_dir / "job.yml")
    assert "epochs=3 lr=0.05" in log and "seed=None" in log


@pytest.mark.skipif(not AZURE_AI_ML.exists(), reason="scripts/setup-env --tests installs azure-ai-ml in .tools")
def test_the_job_azure_ai_ml_dumps_runs_on_two_nodes(server, job_dir):
    log = run(server, sdk_dump(job_dir))
    assert "epochs=6 lr=0.05" in log and "seed=None" in log  # the component's default; no optional part
    # content-addressed: whatever was submitted, the server holds the code, the folder and
    # the file once each (the SDK's absolute code path zips to the same package)
    expected = {package_code(job_dir / "src")[0], package_input(job_dir / "data")[0],
                package_input(job_dir / "labels.csv")[0]}
    assert {p.stem for p in (server.state_dir / "code").glob("*.zip")} == expected
    trees = [p.name for p in (server.state_dir / "cache" / "inputs" / "trees").iterdir()
             if re.fullmatch(r"upload-[0-9a-f]{40}(-f)?", p.name)]  # -f: a file's
    assert sorted(trees) == sorted([f"upload-{package_input(job_dir / 'data')[0][:40]}",
                                    f"upload-{package_input(job_dir / 'labels.csv')[0][:40]}-f"])
