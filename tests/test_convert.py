"""Batch AI job.json and Azure ML command jobs converted to raybatch jobs: every field
mapped, unsupported ones an error or a warning (never silence), and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raybatch.spec.convert import ConversionError, convert, detect
from raybatch.spec.job import JobSpec
from raybatch.spec.loader import SpecError, load_job_document

RAYBATCH = str(Path(sys.executable).with_name("raybatch"))
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "pytorch-digits-ddp"


def batchai(**props):
    return {"name": "bai", "properties": {"nodeCount": 2, **props}}


PYTORCH = {"pythonScriptFilePath": "/mnt/code/train.py", "commandLineArgs": "--lr 0.1", "processCount": 4}


def test_detect():
    assert detect(batchai(pyTorchSettings=PYTORCH)) == "batchai"
    assert detect({"nodeCount": 1, "customToolkitSettings": {"commandLine": "x"}}) == "batchai"
    assert detect({"type": "command", "command": "python x.py"}) == "azureml"
    assert detect({"$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
                   "command": "x"}) == "azureml"
    assert detect({"name": "x", "command": "echo"}) == "raybatch"
    assert detect(["not", "a", "job"]) == "raybatch"


def test_batchai_pytorch_every_field():
    doc = batchai(
        pyTorchSettings={**PYTORCH, "pythonInterpreterPath": "/opt/py/bin/python", "communicationBackend": "Gloo"},
        schedulingPriority="High", constraints={"maxWallClockTime": "1.02:00:00"},
        environmentVariables=[{"name": "A", "value": "1"}, {"name": "B", "value": None}],
        inputDirectories=[{"id": "DATA", "path": "$AZ_BATCHAI_MOUNT_ROOT/data"}],
        outputDirectories=[{"id": "MODEL", "pathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/out", "pathSuffix": "m"}],
        stdOutErrPathPrefix="$AZ_BATCHAI_JOB_MOUNT_ROOT/logs",
        cluster={"id": "/subscriptions/x/clusters/c"},
    )
    out, warnings = convert(doc, mount_root="/mnt/shared/")
    assert out == {
        "name": "bai", "nodes": 2, "priority": "high", "max_wall_clock": "1.02:00:00",
        "framework": "pytorch", "command": "/opt/py/bin/python /mnt/code/train.py --lr 0.1",
        "processes_per_node": 2,
        "environment": {"A": "1", "B": "", "AZ_BATCHAI_PYTORCH_BACKEND": "gloo", "RAYBATCH_PYTORCH_BACKEND": "gloo",
                        "AZ_BATCHAI_MOUNT_ROOT": "/mnt/shared", "AZ_BATCHAI_JOB_MOUNT_ROOT": "/mnt/shared"},
        "inputs": {"DATA": "/mnt/shared/data"}, "outputs": {"MODEL": {}},
        "output_root": "/mnt/shared/logs",
    }
    assert any("cluster: ignored" in w for w in warnings)
    assert any("outputDirectories[0] (MODEL)" in w for w in warnings)


def test_batchai_problems_are_all_reported_with_their_fields():
    doc = batchai(caffeSettings={"pythonScriptFilePath": "x.py"}, secrets=[{"name": "K"}],
                  containerSettings={"imageSourceRegistry": {"image": "x", "credentials": {"username": "u"}}},
                  inputDirectories=[{"id": "D", "path": "$AZ_BATCHAI_MOUNT_ROOT/d"}, {"id": "E"}])
    with pytest.raises(ConversionError) as err:
        convert(doc)
    text = "\n".join(err.value.problems)
    assert "caffeSettings" not in text  # Caffe with an image runs in it (framework mpi)
    assert "properties.secrets[0] (K): value or valueSecretReference is required" in text
    assert "properties.containerSettings.imageSourceRegistry.credentials: registry credentials" in text
    assert "properties.inputDirectories[0].path: '$AZ_BATCHAI_MOUNT_ROOT/d' is under a Batch AI mount" in text
    assert "--mount-root" in text
    assert "properties.inputDirectories[1]: expected {id, path}" in text


def test_batchai_secrets_are_accepted_as_is():
    """Batch AI's properties.secrets (EnvironmentVariableWithSecretValue): a value, or a Key
    Vault reference {sourceVault: {id}, secretUrl}, which the server reads at each start."""
    url = "https://myvault.vault.azure.net/secrets/db-password/0123abcd"
    doc = batchai(pyTorchSettings=PYTORCH, secrets=[
        {"name": "API_KEY", "value": "s3cr3t-value"},
        {"name": "DB_PASSWORD", "valueSecretReference": {
            "sourceVault": {"id": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/myvault"},
            "secretUrl": url}}])
    out, _ = convert(doc)
    assert out["secrets"] == {"API_KEY": "s3cr3t-value", "DB_PASSWORD": {"keyvault": url}}
    spec = JobSpec.model_validate(out)
    assert spec.model_dump(mode="json")["secrets"] == {"API_KEY": "***", "DB_PASSWORD": {"keyvault": url}}
    assert "s3cr3t-value" not in spec.model_dump_json()


@pytest.mark.parametrize("props, problem", [
    ({}, "exactly one toolkit setting is required (got none)"),
    ({"pyTorchSettings": PYTORCH, "customToolkitSettings": {"commandLine": "x"}}, "exactly one toolkit"),
    ({"pyTorchSettings": {**PYTORCH, "processCount": 3}}, "processCount: must be a multiple of nodeCount (2)"),
    ({"pyTorchSettings": {"commandLineArgs": "x"}}, "pyTorchSettings.pythonScriptFilePath: required"),
    ({"customMpiSettings": {"processCount": 2}}, "customMpiSettings.commandLine: required"),
    ({"customMpiSettings": {"commandLine": "x", "processCount": 3}}, "processCount: must be a multiple of nodeCount (2)"),
    ({"horovodSettings": {"commandLineArgs": "x"}}, "horovodSettings.pythonScriptFilePath: required"),
    ({"pyTorchSettings": PYTORCH, "containerSettings": {"imageSourceRegistry": {}}},
     "containerSettings.imageSourceRegistry.image: required"),
    ({"cntkSettings": {"pythonScriptFilePath": "x"}}, "cntkSettings: CNTK has no wheel for today's Python: give "
     "the image it runs in (containerSettings.imageSourceRegistry.image"),
    ({"nodeCount": 0, "pyTorchSettings": PYTORCH}, "nodeCount: must be an integer >= 1"),
])
def test_batchai_rejections(props, problem):
    with pytest.raises(ConversionError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        convert(batchai(**props))


def test_batchai_custom_toolkit_and_job_preparation():
    out, warnings = convert({"nodeCount": 1, "customToolkitSettings": {"commandLine": "python x.py"},
                             "jobPreparation": {"commandLine": "pip install -r req.txt"}}, name_hint="my job")
    assert out["framework"] == "custom" and out["name"] == "my-job"
    assert out["command"] == "python x.py" and out["prepare"] == "pip install -r req.txt"
    assert warnings == []
    out, _ = convert(batchai(pyTorchSettings=PYTORCH, jobPreparation={"commandLine": "x"}))
    assert out["prepare"] == "x" and out["processes_per_node"] == 2


def test_azureml_command_job():
    doc = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command", "display_name": "Train Digits", "experiment_name": "exp 1", "code": "./src",
        "command": "python train.py --data ${{inputs.data}} --lr ${{inputs.lr}} --out ${{ outputs.model }}",
        "inputs": {"data": {"type": "uri_folder", "path": "azureml://datastores/blob/paths/digits", "mode": "ro_mount"},
                   "local": {"type": "uri_folder", "path": "/mnt/nfs/x"},
                   "lr": 0.01, "tag": {"type": "string", "default": "a b"}},
        "outputs": {"model": {"type": "uri_folder", "mode": "upload"}},
        "environment_variables": {"X": 1}, "environment": "azureml:pytorch@latest", "compute": "azureml:gpu",
        "distribution": {"type": "pytorch", "process_count_per_instance": 2},
        "resources": {"instance_count": 3}, "limits": {"timeout": 3600},
    }
    out, warnings = convert(doc)
    assert out == {
        "name": "Train-Digits", "experiment": "exp-1", "code": "./src", "environment": {"X": "1"},
        "nodes": 3, "max_wall_clock": 3600, "framework": "pytorch", "processes_per_node": 2,
        "inputs": {"data": {"path": "azureml://datastores/blob/paths/digits", "mode": "download"},
                   "local": {"path": "/mnt/nfs/x", "mode": "direct"}},
        "outputs": {"model": {}},
        "command": "python train.py --data ${RAYBATCH_INPUT_DATA} --lr 0.01 --out ${RAYBATCH_OUTPUT_MODEL}",
    }
    assert any(w.startswith("environment:") for w in warnings)
    assert any(w.startswith("compute:") for w in warnings)


@pytest.mark.parametrize("doc, problem", [
    ({"command": "x ${{inputs.nope}}", "type": "command"}, "names no input of the job"),
    ({"command": "x", "type": "command", "distribution": {"type": "deepspeed"}}, "distribution.type: 'deepspeed' is not supported"),
    ({"command": "x", "type": "sweep", "$schema": "azureml"}, "trial: required"),
    ({"command": "x", "type": "pipeline", "$schema": "azureml"}, "only command and sweep jobs"),
    ({"type": "command", "inputs": {"d": {"type": "uri_folder"}}, "command": "x"}, "inputs.d.path: required"),
    ({"type": "command", "outputs": {"o": {"mode": "ro_mount"}}, "command": "x"}, "outputs.o.mode"),
])
def test_azureml_rejections(doc, problem):
    with pytest.raises(ConversionError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        convert(doc)


def test_recipe_files_load_as_raybatch_jobs(tmp_path):
    spec, notes = load_job_document(RECIPE / "job.azureml.yml")
    assert spec.framework == "pytorch" and spec.nodes == 2 and spec.code == str(RECIPE)
    assert spec.command == "python train.py --epochs 30 --model-dir ${RAYBATCH_OUTPUT_MODEL}"
    assert spec.max_wall_clock == 1800
    spec, notes = load_job_document(RECIPE / "job.batchai.json", ["nodes=1"], mount_root="/repo")
    assert spec.nodes == 1  # --set applies after conversion
    assert spec.command.startswith("python /repo/recipes/pytorch-digits-ddp/train.py --epochs 30")
    with pytest.raises(SpecError, match="invalid Batch AI job file"):
        load_job_document(RECIPE / "job.batchai.json")


def test_cli_convert_and_submit_errors(tmp_path):
    p = subprocess.run([RAYBATCH, "convert", str(RECIPE / "job.batchai.json"), "--mount-root", "/repo"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    job = yaml.safe_load(p.stdout)
    assert job["framework"] == "pytorch" and job["outputs"] == {"MODEL": {}}
    assert "warning: properties.cluster: ignored" in p.stderr
    p = subprocess.run([RAYBATCH, "convert", str(RECIPE / "job.azureml.yml"), "-o", "json"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["nodes"] == 2
    bad = tmp_path / "job.json"
    bad.write_text(json.dumps(batchai(caffe2Settings={"pythonScriptFilePath": "x.py"})))
    p = subprocess.run([RAYBATCH, "submit", str(bad)], capture_output=True, text=True,
                       env={"RAYBATCH_ADDRESS": "http://127.0.0.1:9", "RAYBATCH_TOKEN": "x", "PATH": "/usr/bin"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "invalid Batch AI job file" in p.stderr and "caffe2Settings: Caffe2 has no wheel" in p.stderr


def test_batchai_mpi_horovod_custom_and_container_toolkits():
    job, warnings = convert(batchai(customMpiSettings={"commandLine": "python allreduce.py", "processCount": 4},
                                    containerSettings={"imageSourceRegistry": {
                                        "serverUrl": "https://myreg.azurecr.io", "image": "mpi/openmpi:5"},
                                        "shmSize": "2g"}))
    assert (job["framework"], job["command"], job["processes_per_node"]) == ("mpi", "python allreduce.py", 2)
    assert job["image"] == "myreg.azurecr.io/mpi/openmpi:5"
    assert any("shmSize: ignored" in w for w in warnings)
    job, _ = convert(batchai(horovodSettings={"pythonScriptFilePath": "train.py", "commandLineArgs": "--epochs 3",
                                              "processCount": 2}))
    assert (job["framework"], job["command"], job["processes_per_node"]) == (
        "horovod", "python train.py --epochs 3", 1)
    job, _ = convert(batchai(customToolkitSettings={"commandLine": "./start.sh"}))
    assert job["framework"] == "custom" and job["custom"] == {"run_on": "first_node"}
    job, _ = convert(batchai(nodeCount=1, customToolkitSettings={"commandLine": "./start.sh"}))
    assert "custom" not in job


def test_azureml_mpi_distribution_and_image_environment():
    job, warnings = convert({"type": "command", "command": "python allreduce.py", "resources": {"instance_count": 2},
                             "distribution": {"type": "mpi", "process_count_per_instance": 2},
                             "environment": {"image": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"}})
    assert (job["framework"], job["nodes"], job["processes_per_node"]) == ("mpi", 2, 2)
    assert job["image"] == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04"
    assert not any(w.startswith("environment:") for w in warnings)


TF_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_batchai_tensorflow_all_reduce_and_parameter_servers():
    settings = {"pythonScriptFilePath": "$AZ_BATCHAI_JOB_MOUNT_ROOT/tf/train.py", "pythonInterpreterPath": "python3",
                "masterCommandLineArgs": "--role master", "workerCommandLineArgs": "--role worker",
                "parameterServerCommandLineArgs": "--role ps"}
    # parameterServerCount 0: every process is a worker, the master is worker 0 (rank 0)
    job, warnings = convert(batchai(tensorFlowSettings={**settings, "workerCount": 4, "parameterServerCount": 0}),
                            mount_root="/mnt")
    assert (job["framework"], job["nodes"], job["processes_per_node"]) == ("tensorflow", 2, 2)
    assert job["command"] == "python3 /mnt/tf/train.py --role master"
    assert job["tensorflow"] == {"parameter_servers": 0, "worker_command": "python3 /mnt/tf/train.py --role worker"}
    assert not any("tensorFlowSettings" in w for w in warnings)
    # with parameter servers: master -> chief, then the ps, then the other workers
    job, _ = convert(batchai(tensorFlowSettings={**settings, "workerCount": 3, "parameterServerCount": 1}),
                     mount_root="/mnt")
    assert job["processes_per_node"] == 2 and job["command"] == "python3 /mnt/tf/train.py --role master"
    assert job["tensorflow"] == {"parameter_servers": 1, "worker_command": "python3 /mnt/tf/train.py --role worker",
                                 "parameter_server_command": "python3 /mnt/tf/train.py --role ps"}
    # Batch AI's default: 1 parameter server for a distributed job (3 workers + 1 ps on 2 nodes)
    job, warnings = convert(batchai(tensorFlowSettings={"pythonScriptFilePath": "/c/t.py", "workerCount": 3}))
    assert job["processes_per_node"] == 2 and job["tensorflow"]["parameter_servers"] == 1
    assert job["command"] == "python /c/t.py" and job["tensorflow"]["parameter_server_command"] == "python /c/t.py"
    assert any("tensorFlowSettings.parameterServerCount: not given: 1 parameter server" in w for w in warnings)
    # one machine, one worker: no parameter server, no worker command
    job, warnings = convert({"nodeCount": 1, "tensorFlowSettings": {"pythonScriptFilePath": "/c/t.py"}})
    assert job["tensorflow"] == {"parameter_servers": 0} and "processes_per_node" in job and warnings == []


@pytest.mark.parametrize("settings, problem", [
    ({"workerCount": 1, "parameterServerCount": 0}, "tensorFlowSettings.workerCount: workerCount (1) + "
     "parameterServerCount (0) = 1 processes leave some of nodeCount (2) nodes without a process"),
    ({"workerCount": 1, "parameterServerCount": 1}, "tensorFlowSettings.workerCount: with parameterServerCount 1, "
     "at least 2 workers are needed"),
    ({"workerCount": 0}, "tensorFlowSettings.workerCount: must be an integer >= 1"),
    ({"workerCount": 2, "parameterServerCount": -1}, "tensorFlowSettings.parameterServerCount: must be an integer"),
])
def test_batchai_tensorflow_rejections(settings, problem):
    with pytest.raises(ConversionError, match=re.escape(problem)):
        convert(batchai(tensorFlowSettings={"pythonScriptFilePath": "/c/train.py", **settings}))
    with pytest.raises(ConversionError, match=r"tensorFlowSettings.pythonScriptFilePath: required"):
        convert(batchai(tensorFlowSettings={"workerCount": 2, "parameterServerCount": 0}))


def test_tensorflow_recipes_batchai_files_load():
    spec, _ = load_job_document(TF_RECIPES / "tensorflow-digits-multiworker" / "job.batchai.json", mount_root="/repo")
    assert (spec.framework, spec.nodes, spec.processes_per_node) == ("tensorflow", 2, 1)
    assert spec.tensorflow.parameter_servers == 0
    assert spec.command == ("python /repo/recipes/tensorflow-digits-multiworker/train.py --epochs 20 "
                            "--model-dir $AZ_BATCHAI_OUTPUT_MODEL")
    spec, _ = load_job_document(TF_RECIPES / "tensorflow-digits-ps" / "job.batchai.json", mount_root="/repo")
    assert (spec.framework, spec.nodes, spec.processes_per_node) == ("tensorflow", 2, 2)
    assert spec.tensorflow.parameter_servers == 1
    assert spec.tensorflow.worker_command == spec.tensorflow.parameter_server_command == (
        "python /repo/recipes/tensorflow-digits-ps/train.py")


# ---- chainerSettings ---------------------------------------------------------------------
CHAINER = {"pythonScriptFilePath": "$AZ_BATCHAI_JOB_MOUNT_ROOT/chainer/train.py",
           "pythonInterpreterPath": "/usr/bin/python3", "commandLineArgs": "--epochs 5", "processCount": 4}


def test_batchai_chainer_settings():
    job, warnings = convert(batchai(chainerSettings=CHAINER), mount_root="/mnt")
    assert (job["framework"], job["nodes"], job["processes_per_node"]) == ("chainer", 2, 2)
    assert job["command"] == "/usr/bin/python3 /mnt/chainer/train.py --epochs 5"
    assert any("chainerSettings: the nodes' environment has no Chainer" in w and "numpy<2" in w for w in warnings)
    # no processCount: one process per node; no interpreter: python; with an image: no hint
    job, warnings = convert(batchai(chainerSettings={"pythonScriptFilePath": "/c/train.py"},
                                    containerSettings={"imageSourceRegistry": {"image": "chainer/chainer:v7.8.1"}}))
    assert job["command"] == "python /c/train.py" and "processes_per_node" not in job
    assert job["image"] == "chainer/chainer:v7.8.1" and warnings == []
    from raybatch.spec.loader import parse_job

    spec = parse_job(job)
    assert spec.framework == "chainer" and spec.processes_per_node == 1 and spec.image


@pytest.mark.parametrize("settings, problem", [
    ({**CHAINER, "processCount": 3}, "properties.chainerSettings.processCount: must be a multiple of nodeCount (2)"),
    ({**CHAINER, "processCount": 1}, "chainerSettings.processCount: must be a multiple of nodeCount (2)"),
    ({**CHAINER, "processCount": "4"}, "chainerSettings.processCount: must be a multiple"),
    ({"commandLineArgs": "x"}, "properties.chainerSettings.pythonScriptFilePath: required"),
])
def test_batchai_chainer_rejections(settings, problem):
    with pytest.raises(ConversionError, match=re.escape(problem)):
        convert(batchai(chainerSettings=settings), mount_root="/mnt")


def test_batchai_chainer_mount_path_needs_mount_root():
    with pytest.raises(ConversionError, match=re.escape("chainerSettings.pythonScriptFilePath: "
                                                        "'$AZ_BATCHAI_JOB_MOUNT_ROOT/chainer/train.py' is under")):
        convert(batchai(chainerSettings=CHAINER))


# ---- Microsoft's published recipes' patterns (tests/fixtures/batchai; issue 21) ------------
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "batchai"


def fixture(name, mount_root="/mnt/rb", **kw):
    return load_job_document(FIXTURES / name, mount_root=mount_root, **kw)


def test_cntk_brainscript_with_an_image_runs_cntk_under_mpirun():
    spec, notes = fixture("cntk-brainscript.json")
    assert (spec.framework, spec.nodes, spec.processes_per_node) == ("mpi", 2, 1)
    assert spec.image == "example/cntk:2.1-gpu-python3.5"
    assert spec.command == ('cntk configFile="$AZ_BATCHAI_INPUT_CONFIG/ConvNet.cntk" rootDir=. '
                            "dataDir=$AZ_BATCHAI_INPUT_DATASET outputDir=$AZ_BATCHAI_OUTPUT_MODEL parallelTrain=true")
    assert {k: v.path for k, v in spec.inputs.items()} == {"DATASET": "/mnt/rb/data", "CONFIG": "/mnt/rb/scripts"}
    assert spec.output_root == "/mnt/rb/logs"
    assert any("cntkSettings: runs in image example/cntk:2.1-gpu-python3.5 as framework mpi" in n and "BrainScript" in n
               for n in notes)


def test_cntk_python_under_mpirun_with_job_temp_arguments():
    spec, notes = fixture("cntk-python-mpi.json")
    assert (spec.framework, spec.nodes, spec.processes_per_node) == ("mpi", 2, 2)
    assert spec.command == "python /mnt/rb/scripts/standin.py --tag cntk --datadir $AZ_BATCHAI_JOB_TEMP"
    assert spec.prepare == "echo prepared > $AZ_BATCHAI_JOB_TEMP/prepared.txt"
    assert spec.environment == {"AZ_BATCHAI_MOUNT_ROOT": "/mnt/rb", "AZ_BATCHAI_JOB_MOUNT_ROOT": "/mnt/rb"}
    assert spec.image and spec.output_root == "/mnt/rb/logs"
    assert any("azureFileShares[1]" in n and "read at /mnt/rb/scripts" in n and "node-setup" in n for n in notes)


def test_caffe2_with_an_image_runs_its_script_on_every_node():
    spec, notes = fixture("caffe2-image.json")
    assert (spec.framework, spec.nodes, spec.processes_per_node, spec.custom) == ("custom", 2, 1, None)
    assert spec.image == "example/caffe2"
    assert spec.command == ("python /mnt/rb/scripts/standin.py --tag caffe2 --num-shards 2 --shard-id "
                            "$AZ_BATCHAI_TASK_INDEX --file-store $AZ_BATCHAI_SHARED_JOB_TEMP")


def test_job_temp_script_path_is_resolved_on_the_node():
    spec, _ = fixture("jobtemp-script.json")
    assert (spec.framework, spec.processes_per_node) == ("horovod", 1)
    assert spec.command == 'python "$AZ_BATCHAI_JOB_TEMP/benchmarks/standin.py" --tag bench'
    assert spec.prepare.startswith("mkdir -p $AZ_BATCHAI_JOB_TEMP/benchmarks && cp $AZ_BATCHAI_JOB_MOUNT_ROOT/")
    assert spec.code is None  # not a relative path: nothing shipped


def test_uneven_parameter_server_layout_as_batch_ai_placed_it():
    from raybatch.frameworks.tensorflow import TensorFlowFramework, cluster_of, task_of

    spec, notes = fixture("tf-uneven-ps.json")
    assert (spec.framework, spec.nodes, spec.processes_per_node) == ("tensorflow", 2, 2)
    assert (spec.tensorflow.parameter_servers, spec.tensorflow.workers) == (1, 2)
    assert [task_of(spec, r) for r in range(4)] == [("chief", 0), ("ps", 0), ("worker", 0), ("idle", -1)]
    assert cluster_of(spec, ["a:1", "a:2", "b:1", "b:2"]) == {"chief": ["a:1"], "ps": ["a:2"], "worker": ["b:1"]}
    fw = TensorFlowFramework()
    assert fw.role(spec, 3) == "idle" and fw.ends_with_rank0(spec)
    assert any("3 processes on 2 nodes: 2 slots per node, the last 1 idle" in n for n in notes)
    assert spec.tensorflow.parameter_server_command.endswith("--tag ps --task_index=$AZ_BATCHAI_TASK_INDEX")


def test_job_mount_volumes_blob_is_the_jobs_storage_and_shares_are_node_mounts(monkeypatch):
    monkeypatch.setenv("AZURE_BATCHAI_STORAGE_ACCOUNT", "mystorage")
    spec, notes = fixture("mount-volumes.json")
    blob = "az://data@mystorage"
    assert spec.output_root == "abfs://data@mystorage.dfs.core.windows.net/logs"
    assert {k: (v.path, v.mode) for k, v in spec.inputs.items()} == {
        "SCRIPT": ("/mnt/rb/scripts", "direct"),
        "MODEL": ("abfs://data@mystorage.dfs.core.windows.net/models", "download"),
        "mount_data": ("abfs://data@mystorage.dfs.core.windows.net", "download")}
    from raybatch.spec.location import parse

    assert parse(spec.inputs["mount_data"].path).uri == blob
    assert spec.command == ("python -u $AZ_BATCHAI_INPUT_SCRIPT/standin.py --tag score --datadir "
                            "${AZ_BATCHAI_INPUT_mount_data}/images --model $AZ_BATCHAI_INPUT_MODEL/model.ckpt")
    assert any("azureBlobFileSystems[0] (mystorage/data)" in n and "input cache" in n for n in notes)
    assert any("azureFileShares[0]" in n and "/mnt/rb/scripts" in n for n in notes)


@pytest.mark.parametrize("props, mount_root, problem", [
    ({"mountVolumes": {"azureFileShares": [{"azureFileUrl": "https://a.file.core.windows.net/s",
                                            "relativeMountPath": "s"}]}}, None,
     "properties.mountVolumes.azureFileShares[0] (https://a.file.core.windows.net/s): raybatch does not mount "
     "an Azure Files share per job; mount it on every node with `raybatch node-setup`"),
    ({"mountVolumes": {"azureBlobFileSystems": [{"accountName": "<AZURE_BATCHAI_STORAGE_ACCOUNT>",
                                                 "containerName": "data", "relativeMountPath": "data"}]}}, "/m",
     "properties.mountVolumes.azureBlobFileSystems[0]: '<AZURE_BATCHAI_STORAGE_ACCOUNT>'/'data' is a placeholder"),
    ({"mountVolumes": {"azureBlobFileSystems": [{"accountName": "acct", "containerName": "data",
                                                 "relativeMountPath": "data",
                                                 "credentials": {"accountKey": "k"}}]}}, "/m",
     "properties.mountVolumes.azureBlobFileSystems[0].credentials: account keys are not taken from job files"),
    ({"mountVolumes": {"azureBlobFileSystems": [{"accountName": "acct", "relativeMountPath": "data"}]}}, "/m",
     "properties.mountVolumes.azureBlobFileSystems[0].containerName: required"),
    ({"customMpiSettings": {"commandLine": "python $AZ_BATCHAI_JOB_MOUNT_ROOT/s/x.py"}}, None,
     "properties.customMpiSettings.commandLine: 'python $AZ_BATCHAI_JOB_MOUNT_ROOT/s/x.py' is under a Batch AI "
     "mount (AZ_BATCHAI_JOB_MOUNT_ROOT); give --mount-root DIR"),
    ({"caffe2Settings": {"pythonScriptFilePath": "/s/x.py"}, "customMpiSettings": None}, None,
     "properties.caffe2Settings: Caffe2 has no wheel for today's Python: give the image it runs in"),
    ({"cntkSettings": {"configFilePath": "/c.cntk", "pythonScriptFilePath": "/x.py"}, "customMpiSettings": None,
      "containerSettings": {"imageSourceRegistry": {"image": "i"}}}, None,
     "properties.cntkSettings: give configFilePath or pythonScriptFilePath, not both"),
    ({"cntkSettings": {"configFilePath": "/c.cntk", "languageType": "Python"}, "customMpiSettings": None,
      "containerSettings": {"imageSourceRegistry": {"image": "i"}}}, None,
     "properties.cntkSettings.languageType: 'Python' does not match the settings given (configFilePath)"),
    ({"inputDirectories": [{"id": "X", "path": "$AZ_BATCHAI_JOB_TEMP/x"}]}, None,
     "properties.inputDirectories[0].path: '$AZ_BATCHAI_JOB_TEMP/x': variables other than the mount roots"),
    # a key in the job file would travel with it (a relative script ships the job file's directory)
    ({"mountVolumes": {"azureFileShares": [{"azureFileUrl": "https://a.file.core.windows.net/s",
                                            "relativeMountPath": "s",
                                            "credentials": {"accountKey": "k"}}]}}, "/m",
     "properties.mountVolumes.azureFileShares[0].credentials: account keys are not taken from job files"),
])
def test_what_cannot_be_honoured_names_its_field(props, mount_root, problem, monkeypatch):
    monkeypatch.delenv("AZURE_BATCHAI_STORAGE_ACCOUNT", raising=False)
    doc = batchai(customMpiSettings={"commandLine": "true"})
    doc["properties"].update(props)
    doc["properties"] = {k: v for k, v in doc["properties"].items() if v is not None}
    with pytest.raises(ConversionError) as err:
        convert(doc, mount_root=mount_root)
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_relative_script_ships_the_job_files_directory(tmp_path):
    spec, notes = load_job_document(FIXTURES / "relative" / "job.json")
    assert spec.code == str((FIXTURES / "relative").resolve())
    assert spec.command == "python train.py --steps 3" and spec.framework == "pytorch"
    assert any("pyTorchSettings.pythonScriptFilePath: 'train.py' is relative: the job file's directory is shipped"
               in n for n in notes)
    job, _ = convert(batchai(pyTorchSettings={"pythonScriptFilePath": "src/train.py"}))
    assert job["code"] == "." and job["command"] == "python src/train.py"
    # an absolute or job-time path ships nothing
    assert "code" not in convert(batchai(pyTorchSettings={"pythonScriptFilePath": "/c/t.py"}))[0]
    assert "code" not in convert(batchai(pyTorchSettings={"pythonScriptFilePath": "$AZ_BATCHAI_JOB_TEMP/t.py"}))[0]


def test_tensorflow_workers_must_fill_the_nodes():
    from raybatch.spec.loader import parse_job

    base = {"name": "t", "framework": "tensorflow", "nodes": 2, "processes_per_node": 2, "command": "x"}
    assert parse_job({**base, "tensorflow": {"parameter_servers": 1, "workers": 2}}).tensorflow.workers == 2
    for tf, problem in (({"parameter_servers": 0, "workers": 2}, "2 ranks must fill the job's nodes"),
                        ({"parameter_servers": 1, "workers": 4}, "5 ranks must fill"),
                        ({"parameter_servers": 2, "workers": 1}, "parameter server(s) need at least")):
        with pytest.raises(SpecError, match=re.escape(problem)):
            parse_job({**base, "tensorflow": tf})


def test_a_mount_command_is_never_echoed(capsys):
    """An unmanaged file system's mountCommand may hold a password: the conversion's notes
    name the field, never the command."""
    doc = batchai(customMpiSettings={"commandLine": "true"})
    doc["properties"]["mountVolumes"] = {"unmanagedFileSystems": [
        {"mountCommand": "mount -t cifs //srv/s -o username=u,password=SECRET123", "relativeMountPath": "s"}]}
    _spec, notes = convert(doc, mount_root="/m")
    assert notes and not any("SECRET123" in n for n in notes)
    assert any("unmanagedFileSystems[0] (its mountCommand)" in n for n in notes)
