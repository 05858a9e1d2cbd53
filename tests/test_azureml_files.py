"""Azure ML command jobs as Azure ML's users have them, without a cluster: files written the
way the CLI v2 docs write them (relative code, local uri_folder / uri_file inputs,
literal inputs) and files azure-ai-ml 1.35 itself dumps (``command(...).dump()``: no
$schema, the command under ``component:``, ``azureml:./data``, typed inputs with string
defaults). Local inputs become ``mode: upload`` inputs: checked at load (missing, too
big), zipped by content, kept by the server under their own limit, and staged on a node
through the input cache."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from raybatch.runtime.code import package_input
from raybatch.spec.convert import ConversionError, convert, detect
from raybatch.spec.loader import SpecError, load_job_document, parse_job
from raybatch.storage.staging import InputCache, UploadedInput

ROOT = Path(__file__).resolve().parents[1]
AZURE_AI_ML = ROOT / ".tools" / "azure-ai-ml" / "bin" / "python"
RAYBATCH = str(Path(sys.executable).with_name("raybatch"))

CLI_JOB = """\
$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json
type: command
display_name: local-inputs
experiment_name: azureml-files
code: ./src
command: >-
  python train.py --data ${{inputs.training_data}} --labels ${{inputs.labels}}
  --epochs ${{inputs.epochs}} --lr ${{inputs.lr}} --tag ${{inputs.tag}}
  --out ${{outputs.model}}
inputs:
  training_data:
    type: uri_folder
    path: ./data
  labels:
    type: uri_file
    path: ./labels.csv
  epochs: 3
  lr: 0.05
  tag: two words
outputs:
  model:
    type: uri_folder
environment: azureml:AzureML-sklearn-1.5@latest
compute: azureml:cpu-cluster
resources:
  instance_count: 2
"""


def project(tmp_path: Path) -> Path:
    """A job directory as Azure ML's docs lay one out: src/, data/, a file beside them."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("print('hi')\n")
    (tmp_path / "data" / "part").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("alpha\n")
    (tmp_path / "data" / "part" / "b.txt").write_text("beta\n")
    (tmp_path / "labels.csv").write_text("id,label\n1,7\n")
    (tmp_path / "job.yml").write_text(CLI_JOB)
    return tmp_path / "job.yml"


def test_a_cli_v2_file_with_local_inputs_converts_to_uploaded_inputs(tmp_path):
    f = project(tmp_path)
    doc = yaml.safe_load(f.read_text())
    out, notes = convert(doc, base_dir=tmp_path)
    assert out["inputs"] == {"training_data": {"path": "./data", "mode": "upload"},
                             "labels": {"path": "./labels.csv", "mode": "upload"}}
    assert out["command"] == ("python train.py --data ${RAYBATCH_INPUT_TRAINING_DATA} --labels "
                              "${RAYBATCH_INPUT_LABELS} --epochs 3 --lr 0.05 --tag 'two words' "
                              "--out ${RAYBATCH_OUTPUT_MODEL}")
    assert (out["name"], out["experiment"], out["nodes"], out["code"]) == ("local-inputs", "azureml-files", 2, "./src")
    spec, notes = load_job_document(f)
    assert spec.code == str(tmp_path / "src")
    assert {k: (i.mode, i.path) for k, i in spec.inputs.items()} == {
        "training_data": ("upload", str(tmp_path / "data")), "labels": ("upload", str(tmp_path / "labels.csv"))}
    assert any(n.startswith("environment:") for n in notes) and any(n.startswith("compute:") for n in notes)


def test_raybatch_convert_prints_the_upload_inputs(tmp_path):
    f = project(tmp_path)
    p = subprocess.run([RAYBATCH, "convert", str(f)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    job = yaml.safe_load(p.stdout)
    assert job["inputs"]["training_data"] == {"path": "./data", "mode": "upload"}
    # the printed job, saved next to the original, is the same job
    (tmp_path / "converted.yaml").write_text(p.stdout)
    spec, _ = load_job_document(tmp_path / "converted.yaml")
    assert spec.inputs["labels"].path == str(tmp_path / "labels.csv") and spec.inputs["labels"].mode == "upload"


def test_a_missing_local_input_is_an_error_naming_the_field(tmp_path):
    f = project(tmp_path)
    f.write_text(CLI_JOB.replace("path: ./data", "path: ./no-such-dir"))
    with pytest.raises(SpecError) as err:
        load_job_document(f)
    assert "inputs.training_data.path: './no-such-dir' does not exist" in str(err.value)
    assert str(tmp_path / "no-such-dir") in str(err.value)
    # the raybatch spelling: an upload input that is not there is refused at load too
    (tmp_path / "rb.yaml").write_text(yaml.safe_dump({"name": "x", "command": "true",
                                                      "inputs": {"d": {"path": "gone", "mode": "upload"}}}))
    with pytest.raises(SpecError, match=r"inputs\.d\.path: 'gone' does not exist"):
        load_job_document(tmp_path / "rb.yaml")


@pytest.mark.parametrize("change, problem", [
    (("type: uri_file\n    path: ./labels.csv", "type: uri_file\n    path: ./data"),
     "inputs.labels.path: './data' is a folder; an input of type uri_file is one file"),
    (("type: uri_folder\n    path: ./data", "type: uri_folder\n    path: ./labels.csv"),
     "inputs.training_data.path: './labels.csv' is a file; an input of type uri_folder is a folder"),
    (("path: ./data", "path: azureml:digits:3"), "inputs.training_data.path: 'azureml:digits:3' is a registered "
     "data asset"),
    (("epochs: 3", "epochs: {type: integer, default: three}"), "inputs.epochs: 'three' is not an integer"),
    (("code: ./src", "code: azureml:train-code:1"), "code: 'azureml:train-code:1' is a registered code asset"),
])
def test_local_input_mistakes_are_refused_with_the_field(tmp_path, change, problem):
    f = project(tmp_path)
    f.write_text(CLI_JOB.replace(*change))
    with pytest.raises(SpecError) as err:
        load_job_document(f)
    assert problem in str(err.value)


def test_the_upload_limit_is_checked_before_anything_is_sent(tmp_path, monkeypatch):
    f = project(tmp_path)
    (tmp_path / "data" / "big.bin").write_bytes(os.urandom(30_000))
    monkeypatch.setenv("RAYBATCH_MAX_UPLOAD_INPUT_MB", "0.02")  # 20971 bytes
    with pytest.raises(SpecError) as err:
        load_job_document(f)
    text = str(err.value)
    assert "inputs.training_data.path: './data'" in text and "holds more than 0.02 MiB, the limit for an input " \
        "uploaded with the job (RAYBATCH_MAX_UPLOAD_INPUT_MB)" in text and "blob storage or a datastore" in text
    assert "inputs.labels" not in text  # the small file is within the limit
    # the CLI says so and exits 2 before contacting any server
    p = subprocess.run([RAYBATCH, "submit", str(f)], capture_output=True, text=True,
                       env={**os.environ, "RAYBATCH_ADDRESS": "http://127.0.0.1:9", "RAYBATCH_TOKEN": "x"})
    assert p.returncode == 2 and "holds more than 0.02 MiB" in p.stderr, p.stderr
    monkeypatch.setenv("RAYBATCH_MAX_UPLOAD_INPUT_MB", "lots")
    with pytest.raises(SpecError, match="RAYBATCH_MAX_UPLOAD_INPUT_MB: 'lots' is not a number of MiB"):
        load_job_document(f)


def test_the_server_keeps_uploaded_inputs_under_their_own_limit(tmp_path, monkeypatch):
    from tests.test_storage_review import _app

    client = _app(tmp_path)
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "x.bin").write_bytes(os.urandom(40_000))
    sha, data, name = package_input(data_dir)
    assert name is None and package_input(data_dir)[0] == sha  # content-addressed: same bytes, same sha
    monkeypatch.setenv("RAYBATCH_MAX_UPLOAD_INPUT_MB", "0.02")
    r = client.put(f"/api/v1/inputs/{sha}", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 413 and "uploaded input" in r.text and "0.02 MiB" in r.text, r.text
    assert client.get(f"/api/v1/inputs/{sha}").status_code == 404
    # sent in chunks without a Content-Length: the server stops reading at the limit
    r = client.put(f"/api/v1/inputs/{sha}", content=(data[i:i + 4096] for i in range(0, len(data), 4096)),
                   headers={"Content-Type": "application/zip"})
    assert r.status_code == 413 and "0.02 MiB" in r.text, r.text
    assert not list((tmp_path / "code").glob(".upload-*"))  # nothing half-received is left
    monkeypatch.delenv("RAYBATCH_MAX_UPLOAD_INPUT_MB")
    r = client.put(f"/api/v1/inputs/{'1' * 64}", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 400 and "sha256 of the body does not match" in r.text
    r = client.put(f"/api/v1/inputs/{sha}", content=data, headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    assert client.get(f"/api/v1/inputs/{sha}").status_code == 200
    assert (tmp_path / "code" / f"{sha}.zip").read_bytes() == data
    # a job naming an upload input that was not uploaded is refused, naming the input
    job = {"name": "u", "command": "true", "inputs": {"d": {"path": "/anywhere", "mode": "upload"}}}
    r = client.post("/api/v1/jobs", json={"spec": job})
    assert r.status_code == 400 and "inputs.d: mode upload, but no package was uploaded" in r.text
    job["inputs"]["d"]["package"] = "0" * 64
    r = client.post("/api/v1/jobs", json={"spec": job})
    assert r.status_code == 400 and f"inputs.d.package: {'0' * 64} was not uploaded" in r.text
    job["inputs"]["d"]["package"] = sha
    assert client.post("/api/v1/jobs", json={"spec": job}).status_code == 201


def test_a_node_stages_an_uploaded_input_once_through_its_cache(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "sub").mkdir(parents=True)
    (data_dir / "a.txt").write_text("alpha\n")
    (data_dir / "sub" / "b.txt").write_text("beta\n")
    sha, data, _ = package_input(data_dir)
    cache = InputCache(tmp_path / "cache")
    fetched = []

    def fetch():
        fetched.append(1)
        return data

    uri = f"upload://{sha}"
    assert cache.stage_upload(uri, None) is None  # not on the node: the driver must send it
    res = cache.stage_upload(uri, fetch)
    assert fetched == [1] and res.files == 2 and res.bytes_downloaded == 11
    assert Path(res.path) == tmp_path / "cache" / "inputs" / "trees" / f"upload-{sha[:40]}"
    assert (Path(res.path) / "sub" / "b.txt").read_text() == "beta\n"
    assert (Path(res.path) / "a.txt").stat().st_mode & 0o222 == 0  # staged files are read-only
    warm = cache.stage_upload(uri, None)  # warm: no byte of the zip is needed
    assert warm.path == res.path and warm.bytes_downloaded == 0 and fetched == [1]
    # a job that deleted its staged copy gets it back (from the zip again)
    (Path(res.path) / "a.txt").unlink()
    assert cache.stage_upload(uri, None) is None
    assert cache.stage_upload(uri, fetch).files == 2 and fetched == [1, 1]
    # one file: the input is that file, under its own name
    fsha, fdata, name = package_input(data_dir / "a.txt")
    assert name == "a.txt"
    staged = cache.stage_upload(f"upload://{fsha}/a.txt", lambda: fdata)
    assert Path(staged.path).name == "a.txt" and Path(staged.path).read_text() == "alpha\n"
    assert cache.stage_upload(f"upload://{fsha}/a.txt", None).path == staged.path
    # a folder holding just that file zips to the same bytes, yet is a folder
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.txt").write_text("alpha\n")
    assert package_input(lone)[0] == fsha
    folder = cache.stage_upload(f"upload://{fsha}", lambda: fdata)
    assert Path(folder.path).is_dir() and (Path(folder.path) / "a.txt").read_text() == "alpha\n"
    assert cache.stage_upload(f"upload://{fsha}/a.txt", None).path == staged.path


def test_an_uploaded_zip_with_an_unsafe_name_is_refused_on_the_node(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil", b"x")
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    from raybatch.storage.backends import StorageError

    with pytest.raises(StorageError, match=r"unsafe entry .\.\./evil. in the uploaded input: a .\.\.. part"):
        UploadedInput(f"upload://{sha}", buf.getvalue())


def test_detection_by_type_and_the_sdk_dump_form():
    dumped = {"type": "command", "component": {"command": "python x.py --n ${{inputs.n}}", "code": "/src",
                                               "inputs": {"n": {"type": "integer", "default": "6"}}}}
    assert detect(dumped) == "azureml"
    assert detect({"type": "sweep"}) == "azureml"
    assert detect({"name": "x", "command": "true"}) == "raybatch"
    out, _ = convert(dumped)
    assert out["command"] == "python x.py --n 6" and out["code"] == "/src"
    # the job's value wins over the component's default, checked against its type
    out, _ = convert({**dumped, "inputs": {"n": 8}})
    assert out["command"] == "python x.py --n 8"
    with pytest.raises(ConversionError, match=r"inputs\.n: 2\.5 is not an integer \(the input's type is integer\)"):
        convert({**dumped, "inputs": {"n": 2.5}})
    with pytest.raises(ConversionError, match="component: 'azureml:train:1' refers to a component elsewhere"):
        convert({"type": "command", "component": "azureml:train:1"})
    with pytest.raises(ConversionError, match=r"command: required \(under component:"):
        convert({"type": "command", "component": {"code": "/src"}})


def test_optional_inputs_and_their_command_parts():
    doc = {"type": "command", "command": "python x.py $[[--seed ${{inputs.seed}}]] $[[--flag ${{inputs.flag}}]]",
           "inputs": {"seed": {"type": "integer", "optional": True},
                      "flag": {"type": "boolean", "optional": True, "default": 1}}}
    out, _ = convert(doc)
    assert out["command"] == "python x.py  --flag True"
    with pytest.raises(ConversionError, match=r"command: \$\{\{inputs\.seed\}\} is optional and has no value"):
        convert({**doc, "command": "python x.py --seed ${{inputs.seed}}"})
    with pytest.raises(ConversionError, match="inputs.seed: no value"):
        convert({**doc, "inputs": {"seed": {"type": "integer"}}})


def test_an_upload_input_of_a_trial_file_is_relative_to_that_file(tmp_path):
    trial = tmp_path / "trial"
    (trial / "data").mkdir(parents=True)
    (trial / "data" / "x.txt").write_text("x")
    (trial / "job.yaml").write_text(yaml.safe_dump({
        "name": "t", "command": "python -c 1 ${{search_space.lr}}",
        "inputs": {"d": {"path": "data", "mode": "upload"}}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "trial": "trial/job.yaml", "search_space": {"lr": {"type": "choice", "values": [1]}},
        "objective": {"primary_metric": "m", "goal": "minimize"}}))
    spec, _ = load_job_document(tmp_path / "s.yaml")
    assert spec.inputs["d"].path == str(trial / "data")


def test_upload_inputs_in_the_raybatch_spec():
    with pytest.raises(SpecError, match=r"inputs\.d\.path: './d' is a relative path; .*add `mode: upload`"):
        parse_job({"name": "x", "command": "true", "inputs": {"d": "./d"}}, check_paths=False)
    with pytest.raises(SpecError, match=r"inputs\.d\.path: 'az://c/x' is a URI; mode upload takes a file or folder"):
        parse_job({"name": "x", "command": "true", "inputs": {"d": {"path": "az://c/x", "mode": "upload"}}},
                  check_paths=False)
    with pytest.raises(SpecError, match=r"package: only an input with mode upload has one"):
        parse_job({"name": "x", "command": "true", "inputs": {"d": {"path": "/d", "package": "a" * 64}}},
                  check_paths=False)


# ---- files azure-ai-ml writes itself -------------------------------------------------------
SDK_GEN = """\
from azure.ai.ml import Input, Output, command
job = command(
    code="./src",
    command="python train.py --data ${{inputs.training_data}} --labels ${{inputs.labels}} "
            "--epochs ${{inputs.epochs}} --lr ${{inputs.lr}} --tag ${{inputs.tag}} "
            "$[[--seed ${{inputs.seed}}]] --out ${{outputs.model}}",
    inputs={"training_data": Input(type="uri_folder", path="./data"),
            "labels": Input(type="uri_file", path="./labels.csv"),
            "epochs": Input(type="integer", default=6), "lr": 0.05, "tag": "two words",
            "seed": Input(type="integer", optional=True)},
    outputs={"model": Output(type="uri_folder")},
    environment="azureml:AzureML-sklearn-1.5@latest", compute="cpu-cluster",
    display_name="sdk-local-inputs", instance_count=2)
job.dump("job.sdk.yml")
"""


def sdk_dump(directory: Path) -> Path:
    """``command(...).dump()`` run by azure-ai-ml 1.35 in its own venv, in ``directory``
    (its relative paths are relative to the working directory, as in the SDK)."""
    (directory / "gen.py").write_text(SDK_GEN)
    subprocess.run([str(AZURE_AI_ML), "gen.py"], cwd=directory, check=True, capture_output=True, timeout=120)
    return directory / "job.sdk.yml"


@pytest.mark.skipif(not AZURE_AI_ML.exists(), reason="scripts/setup-env --tests installs azure-ai-ml in .tools")
def test_the_sdk_dump_with_local_and_typed_inputs_converts(tmp_path):
    project(tmp_path)
    dumped = yaml.safe_load(sdk_dump(tmp_path).read_text())
    # the form this converter must accept, as the SDK writes it
    assert "$schema" not in dumped and dumped["type"] == "command" and "command" not in dumped
    comp = dumped["component"]
    assert comp["code"] == str(tmp_path / "src") and "${{inputs.training_data}}" in comp["command"]
    assert comp["inputs"]["epochs"] == {"type": "integer", "default": "6"}
    assert dumped["inputs"]["training_data"] == {"type": "uri_folder", "path": "azureml:./data"}
    spec, notes = load_job_document(tmp_path / "job.sdk.yml")
    assert (spec.name, spec.nodes, spec.code) == ("sdk-local-inputs", 2, str(tmp_path / "src"))
    assert {k: (i.mode, i.path) for k, i in spec.inputs.items()} == {
        "training_data": ("upload", str(tmp_path / "data")), "labels": ("upload", str(tmp_path / "labels.csv"))}
    assert spec.command == ("python train.py --data ${RAYBATCH_INPUT_TRAINING_DATA} --labels "
                            "${RAYBATCH_INPUT_LABELS} --epochs 6 --lr 0.05 --tag 'two words'  "
                            "--out ${RAYBATCH_OUTPUT_MODEL}")
    assert any(n.startswith("environment:") for n in notes)


@pytest.mark.parametrize("package", ["a" * 64 + "/..", "a" * 64 + "/.", "a" * 64 + "/a/b", "../x"])
def test_a_crafted_package_name_is_refused(package):
    from pydantic import ValidationError

    from raybatch.spec.job import InputSpec

    with pytest.raises(ValidationError, match="package"):
        InputSpec(path="/x", mode="upload", package=package)
