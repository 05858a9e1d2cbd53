"""Unit tests of the job file: raybatch.spec (models, loader, units) and the CLI's
refusal of bad files before anything is queued. Pure: no Ray, no server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raybatch.spec import JobSpec, SpecError, load_job_file, parse_job
from raybatch.spec.job import DEFAULT_MAX_WALL_CLOCK
from raybatch.spec.loader import apply_overrides
from raybatch.spec.units import parse_duration, parse_size

TOP_LEVEL_FIELDS = (
    "array, code, command, custom, deadline, environment, experiment, framework, grace_period, image, inputs, "
    "low_priority_nodes, max_wall_clock, metrics, mpi, name, nodes, output_root, outputs, packages, placement, "
    "preemptible, prefer_low_priority, prepare, priority, processes_per_node, resources, retries, runtime_estimate, "
    "secrets, stall_timeout, sweep, sync_interval, tensorflow, workspace"
)

FULL_JOB = """\
name: pytorch-digits-ddp
experiment: recipes
priority: high
framework: pytorch
nodes: 2
processes_per_node: 3
resources:
  cpus: 1.5
  gpus: 1
  memory: 2GiB
  custom: {lowpri: 1}
placement: {strategy: pack}
code: src
command: python train.py --epochs 30
environment:
  LR: 0.01
  DEBUG: true
  EMPTY:
inputs:
  digits: /data/digits
  extra: {path: /data/extra, mode: direct}
outputs:
  model: {}
  logs: /tmp/out/logs
output_root: /tmp/jobs
max_wall_clock: 2h
grace_period: 45s
retries: {infrastructure: 5, user: 1}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems_of(data, **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_job(data, check_paths=False, **kw)
    return info.value.problems


def one_problem(data) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def job(**extra):
    return {"name": "j", "command": "echo hi", **extra}


# ---- a valid file ----------------------------------------------------------

def test_full_job_file_loads_with_every_field(tmp_path):
    (tmp_path / "src").mkdir()
    spec = load_job_file(write(tmp_path, FULL_JOB))
    assert spec.name == "pytorch-digits-ddp"
    assert spec.experiment == "recipes"
    assert spec.priority == "high" and spec.priority_value == 750
    assert spec.framework == "pytorch"
    assert spec.nodes == 2 and spec.processes_per_node == 3 and spec.world_size == 6
    assert spec.resources.cpus == 1.5 and spec.resources.gpus == 1.0
    assert spec.resources.memory == 2 * 2**30
    assert spec.resources.custom == {"lowpri": 1.0}
    assert spec.resources.as_ray_bundle() == {
        "CPU": 1.5, "GPU": 1.0, "memory": float(2 * 2**30), "lowpri": 1.0}
    assert spec.placement.strategy == "pack"
    assert spec.code == str((tmp_path / "src").resolve())
    assert spec.command == "python train.py --epochs 30"
    assert spec.environment == {"LR": "0.01", "DEBUG": "true", "EMPTY": ""}
    assert spec.inputs["digits"].path == "/data/digits" and spec.inputs["digits"].mode == "direct"
    assert spec.inputs["extra"].path == "/data/extra"
    assert spec.outputs["model"].path is None
    assert spec.outputs["logs"].path == "/tmp/out/logs"
    assert spec.output_root == "/tmp/jobs"
    assert spec.max_wall_clock == 7200.0 and spec.grace_period == 45.0
    assert spec.retries.infrastructure == 5 and spec.retries.user == 1


def test_normalized_job_round_trips(tmp_path):
    (tmp_path / "src").mkdir()
    spec = load_job_file(write(tmp_path, FULL_JOB))
    # what `validate` prints is itself a valid job file that reads back the same
    dumped = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    again = load_job_file(write(tmp_path, dumped, "normalized.yaml"))
    assert again == spec
    # and the JSON the API carries too
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_minimal_job_gets_the_defaults(tmp_path):
    spec = load_job_file(write(tmp_path, "name: j\ncommand: echo hi\n"))
    assert spec.experiment == "default"
    assert spec.priority == "normal" and spec.priority_value == 500
    assert spec.framework == "custom"
    assert spec.nodes == 1 and spec.processes_per_node == 1
    assert spec.resources.as_ray_bundle() == {"CPU": 1.0}
    assert spec.placement.strategy == "spread"
    assert spec.code is None
    assert spec.max_wall_clock == DEFAULT_MAX_WALL_CLOCK == 7 * 86400
    assert spec.grace_period == 30.0
    assert (spec.retries.infrastructure, spec.retries.user) == (3, 0)


# ---- code ------------------------------------------------------------------

def test_code_is_resolved_relative_to_the_job_file_not_the_cwd(tmp_path, monkeypatch):
    jobdir = tmp_path / "recipes" / "digits"
    (jobdir / "src").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_job_file(write(jobdir, "name: j\ncommand: x\ncode: src\n"))
    assert spec.code == str((jobdir / "src").resolve())
    spec = load_job_file(write(jobdir, "name: j\ncommand: x\ncode: .\n"))
    assert spec.code == str(jobdir.resolve())


def test_absolute_code_dir_is_kept(tmp_path):
    code = tmp_path / "abs"
    code.mkdir()
    spec = load_job_file(write(tmp_path / "abs", f"name: j\ncommand: x\ncode: {code}\n"))
    assert spec.code == str(code.resolve())


def test_missing_code_dir_is_rejected_naming_code(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "name: j\ncommand: x\ncode: nope\n"))
    (problem,) = info.value.problems
    assert problem.startswith("code: ")
    assert "'nope' does not exist" in problem
    assert str(tmp_path.resolve() / "nope") in problem


def test_code_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "train.py").write_text("print(1)\n")
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "name: j\ncommand: x\ncode: train.py\n"))
    assert info.value.problems[0].startswith("code: directory 'train.py' does not exist")


# ---- unknown fields ----------------------------------------------------------

def test_unknown_top_level_field_lists_the_allowed_ones():
    assert one_problem(job(nodez=2)) == f"nodez: unknown field; allowed: {TOP_LEVEL_FIELDS}"


@pytest.mark.parametrize("data, expected", [
    ({"resources": {"cpu": 2}}, "resources.cpu: unknown field; allowed: cpus, custom, gpus, memory"),
    ({"retries": {"infra": 1}}, "retries.infra: unknown field; allowed: evictions, infrastructure, user, user_exit_codes"),
    ({"placement": {"strat": "pack"}}, "placement.strat: unknown field; allowed: strategy"),
    ({"inputs": {"data": {"path": "/d", "bogus": 1}}},
     "inputs.data.bogus: unknown field; allowed: mode, package, path"),
    ({"outputs": {"model": {"dir": "/o"}}}, "outputs.model.dir: unknown field; allowed: path"),
])
def test_unknown_nested_field_names_its_path_and_the_allowed_ones(data, expected):
    assert one_problem(job(**data)) == expected


def test_unknown_field_under_an_id_starting_with_int_keeps_the_id():
    assert one_problem(job(inputs={"interim": {"path": "/d", "bogus": 1}})) == (
        "inputs.interim.bogus: unknown field; allowed: mode, package, path")


# ---- types and values -----------------------------------------------------------

@pytest.mark.parametrize("data, field, words", [
    ({"nodes": "two"}, "nodes", "valid integer"),
    ({"nodes": 0}, "nodes", "greater than or equal to 1"),
    ({"nodes": 10001}, "nodes", "less than or equal to 10000"),
    ({"processes_per_node": 0}, "processes_per_node", "greater than or equal to 1"),
    ({"resources": {"cpus": 0}}, "resources.cpus", "greater than 0"),
    ({"resources": {"gpus": -1}}, "resources.gpus", "greater than or equal to 0"),
    ({"resources": {"custom": {"CPU": 1}}}, "resources.custom", "'CPU' is a built-in resource"),
    ({"resources": {"custom": {"lowpri": 0}}}, "resources.custom", "'lowpri' must be > 0"),
    ({"priority": 2000}, "priority", "out of range; allowed: low, normal, high or an integer 0-1000"),
    ({"priority": -1}, "priority", "out of range"),
    ({"priority": "urgent"}, "priority", "unknown priority; allowed: low, normal, high or an integer 0-1000"),
    ({"priority": True}, "priority", "allowed: low, normal, high"),
    ({"placement": {"strategy": "random"}}, "placement.strategy", "'spread' or 'pack'"),
    ({"retries": {"user": -1}}, "retries.user", "greater than or equal to 0"),
    ({"inputs": {"data": {"path": ""}}}, "inputs.data.path", "at least 1 character"),
    ({"inputs": {"data": {"path": "/d", "mode": "copy"}}}, "inputs.data.mode", "'direct'"),
])
def test_bad_value_names_the_field(data, field, words):
    problem = one_problem(job(**data))
    assert problem.startswith(f"{field}: "), problem
    assert words in problem


def test_problem_shows_the_value_given():
    assert one_problem(job(nodes="two")).endswith("(got 'two')")
    assert one_problem(job(priority=2000)).endswith("(got 2000)")


def test_missing_command_and_name():
    assert problems_of({"name": "j"}) == ["command: required field is missing"]
    assert problems_of({"command": "x"}) == ["name: required field is missing"]


@pytest.mark.parametrize("command, words", [
    ("", "at least 1 character"),
    ("   ", "the command is empty"),
    ("\n\t", "the command is empty"),
])
def test_blank_command_is_rejected(command, words):
    problem = one_problem(job(command=command))
    assert problem.startswith("command: ") and words in problem


@pytest.mark.parametrize("name", ["my job", "a/b", "", "x" * 65, "job!", "job.v2"])
def test_invalid_name_is_rejected(name):
    problem = one_problem(job(name=name))
    assert problem.startswith("name: "), problem
    assert "letters, digits" in problem or "at least" in problem


@pytest.mark.parametrize("name", ["a", "x" * 64, "pytorch-digits_ddp-2"])
def test_valid_names(name):
    assert parse_job(job(name=name), check_paths=False).name == name


def test_invalid_experiment_is_rejected():
    assert one_problem(job(experiment="my exp")).startswith("experiment: use 1-64 letters")


@pytest.mark.parametrize("data, field", [
    ({"name": "job\n"}, "name"),
    ({"environment": {"LR\n": "1"}}, "environment"),
    ({"inputs": {"data\n": "/d"}}, "inputs"),
])
def test_trailing_newline_is_not_a_valid_name(data, field):
    assert one_problem(job(**data)).startswith(f"{field}: ")


# ---- environment ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["1BAD", "MY-VAR", "A B", ""])
def test_invalid_env_var_name_is_rejected(name):
    problem = one_problem(job(environment={name: "1"}))
    assert problem.startswith("environment: ")
    assert f"'{name}' is not a valid environment variable name" in problem


def test_env_values_are_stringified():
    spec = parse_job(job(environment={"N": 3, "LR": 0.1, "ON": True, "OFF": False, "NONE": None}),
                     check_paths=False)
    assert spec.environment == {"N": "3", "LR": "0.1", "ON": "true", "OFF": "false", "NONE": ""}


def test_env_value_that_is_a_mapping_is_rejected():
    problem = one_problem(job(environment={"CFG": {"a": 1}}))
    assert problem.startswith("environment: ") and "value of 'CFG' must be a string" in problem


def test_batch_ai_style_environment_list_is_accepted(tmp_path):
    spec = load_job_file(write(tmp_path, (
        "name: j\ncommand: x\nenvironment:\n"
        "  - {name: LR, value: 0.1}\n  - {name: MODE, value: fast}\n")))
    assert spec.environment == {"LR": "0.1", "MODE": "fast"}


def test_malformed_environment_list_is_rejected():
    problem = one_problem(job(environment=[{"nam": "LR", "value": 1}]))
    assert problem.startswith("environment: ") and "{name, value}" in problem


# ---- inputs and outputs -----------------------------------------------------------

@pytest.mark.parametrize("field", ["inputs", "outputs"])
@pytest.mark.parametrize("key", ["my-data", "1st", "a b", "x" * 65, "dätä"])
def test_input_and_output_ids_must_be_identifiers(field, key):
    value = "/d" if field == "inputs" else {}
    problem = one_problem(job(**{field: {key: value}}))
    assert problem.startswith(f"{field}: "), problem
    assert f"id '{key}' is not allowed" in problem


def test_ids_differing_only_in_case_are_rejected():
    problem = one_problem(job(outputs={"model": {}, "MODEL": {}}))
    assert problem.startswith("outputs: ") and "differ only in case" in problem


def test_output_shorthands():
    spec = parse_job(job(outputs={"a": None, "b": "/x", "c": {}}), check_paths=False)
    assert [spec.outputs[k].path for k in "abc"] == [None, "/x", None]


# ---- durations and sizes ------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("30m", 1800.0), ("2h", 7200.0), ("7d", 7 * 86400.0), ("90s", 90.0), ("90", 90.0),
    (" 1.5h ", 5400.0), ("7.00:00:00", 7 * 86400.0), ("01:30:00", 5400.0), ("1.02:03:04", 93784.0),
    (90, 90.0), (2.5, 2.5),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value, words", [
    ("abc", "'abc' is not a duration"), ("-5", "is not a duration"), ("5x", "is not a duration"),
    (-5, "must be positive"), (0, "must be positive"), ("0m", "must be positive"),
    ("01:60:00", "below 60"), ("00:00:60", "below 60"), (True, "expected a duration"),
])
def test_parse_duration_rejects(value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_duration(value)


@pytest.mark.parametrize("value, seconds", [("30m", 1800.0), ("7.00:00:00", 604800.0),
                                            ("01:30:00", 5400.0), (90, 90.0)])
def test_max_wall_clock_accepts_durations(value, seconds):
    assert parse_job(job(max_wall_clock=value), check_paths=False).max_wall_clock == seconds


@pytest.mark.parametrize("value, words", [("abc", "'abc' is not a duration"), (-10, "must be positive")])
def test_bad_durations_name_the_field(value, words):
    problem = one_problem(job(max_wall_clock=value))
    assert problem.startswith("max_wall_clock: ") and words in problem
    problem = one_problem(job(grace_period=value))
    assert problem.startswith("grace_period: ") and words in problem


def test_grace_period_longer_than_wall_clock_is_rejected():
    problem = one_problem(job(max_wall_clock=10, grace_period="20s"))
    assert problem.startswith("grace_period: must not exceed max_wall_clock (10 s)"), problem


def test_default_grace_period_fits_a_short_wall_clock():
    assert parse_job(job(max_wall_clock=10)).grace_period == 10
    assert parse_job(job()).grace_period == 30


def test_nan_duration_is_rejected():
    with pytest.raises(ValueError):
        parse_duration(float("nan"))


@pytest.mark.parametrize("value, size", [
    ("1GiB", 2**30), ("512Mi", 512 * 2**20), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
    ("2g", 2 * 10**9), ("1.5Ki", 1536), ("100b", 100), ("1TiB", 2**40), (1073741824, 2**30),
    (" 4 GiB ", 4 * 2**30),
])
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value, words", [
    ("lots", "'lots' is not a size"), ("1GiBB", "is not a size"), ("1PB", "is not a size"),
    ("-1GiB", "is not a size"), (0, "must be positive"), (True, "expected a size"),
])
def test_parse_size_rejects(value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_size(value)


def test_memory_accepts_sizes_and_rejects_bad_ones():
    assert parse_job(job(resources={"memory": "512Mi"}), check_paths=False).resources.memory == 2**29
    problem = one_problem(job(resources={"memory": "lots"}))
    assert problem.startswith("resources.memory: ") and "'lots' is not a size" in problem


def test_infinite_memory_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "name: j\ncommand: x\nresources: {memory: .inf}\n"))
    assert info.value.problems[0].startswith("resources.memory: ")


# ---- frameworks ---------------------------------------------------------------------

def test_cntk_gets_the_explanatory_message():
    problem = one_problem(job(framework="cntk"))
    assert problem.startswith("framework: CNTK has no wheel for modern Python")
    assert "framework 'mpi'" in problem and "image" in problem


def test_unknown_framework_lists_the_allowed_ones():
    assert one_problem(job(framework="caffe2")) == (
        "framework: unknown framework 'caffe2'; allowed: custom, pytorch, tensorflow, mpi, chainer, horovod "
        "(got 'caffe2')")


@pytest.mark.parametrize("fw", ["custom", "pytorch", "tensorflow", "mpi", "chainer", "horovod"])
def test_known_frameworks(fw):
    assert parse_job(job(framework=fw), check_paths=False).framework == fw


# ---- priority -------------------------------------------------------------------------

@pytest.mark.parametrize("given, value", [
    ("low", 250), ("normal", 500), ("high", 750), ("HIGH", 750), (0, 0), (1000, 1000),
    (42, 42), ("600", 600),
])
def test_priority_value(given, value):
    assert parse_job(job(priority=given), check_paths=False).priority_value == value


# ---- several problems at once -------------------------------------------------------------

def test_all_problems_are_reported_together_one_line_per_field(tmp_path):
    text = ("name: bad name\ncommand: x\nnodes: 0\nprocesses_per_node: 0\n"
            "resources: {cpus: 0, cpu: 1}\npriority: urgent\nframework: cntk\nnodez: 1\n"
            "environment: {1X: a}\nmax_wall_clock: abc\n")
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, text))
    problems = info.value.problems
    fields = sorted(p.split(": ", 1)[0] for p in problems)
    assert fields == sorted(["name", "nodes", "processes_per_node", "resources.cpus",
                             "resources.cpu", "priority", "framework", "nodez", "environment",
                             "max_wall_clock"])
    # every line is in the message too, under the file's name
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'job.yaml'}: invalid job file\n")
    for p in problems:
        assert f"  - {p}" in message


# ---- --set overrides ------------------------------------------------------------------------

def test_apply_overrides_nested_and_typed():
    data = {"name": "j", "resources": {"gpus": 1}}
    out = apply_overrides(data, ["nodes=3", "resources.cpus=2", "environment.LR=0.1",
                                 "priority=high", "command=python train.py --lr 0.1",
                                 "placement.strategy=pack"], "<t>")
    assert out == {"name": "j", "nodes": 3, "resources": {"gpus": 1, "cpus": 2},
                   "environment": {"LR": 0.1}, "priority": "high",
                   "command": "python train.py --lr 0.1", "placement": {"strategy": "pack"}}


def test_overrides_on_load(tmp_path):
    p = write(tmp_path, "name: j\ncommand: x\nnodes: 1\nresources: {gpus: 1}\nenvironment: {A: b}\n")
    spec = load_job_file(p, overrides=["nodes=4", "resources.cpus=2", "environment.LR=0.1",
                                       "priority=low"])
    assert spec.nodes == 4
    assert spec.resources.cpus == 2.0 and spec.resources.gpus == 1.0
    assert spec.environment == {"A": "b", "LR": "0.1"}
    assert spec.priority_value == 250
    # the later --set wins
    assert load_job_file(p, overrides=["nodes=2", "nodes=5"]).nodes == 5


def test_override_can_supply_missing_fields_of_an_empty_file(tmp_path):
    spec = load_job_file(write(tmp_path, ""), overrides=["name=j", "command=echo hi"])
    assert (spec.name, spec.command) == ("j", "echo hi")


def test_overridden_value_is_validated(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "name: j\ncommand: x\n"), overrides=["nodes=zero"])
    assert info.value.problems[0].startswith("nodes: ")


def test_malformed_override_without_equals():
    with pytest.raises(SpecError) as info:
        apply_overrides({}, ["nodes"], "job.yaml")
    assert info.value.problems == ["--set 'nodes': expected key=value, e.g. --set nodes=2"]
    assert info.value.source == "job.yaml"


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(SpecError) as info:
        apply_overrides({"nodes": 2}, ["nodes.x=1"], "<t>")
    assert info.value.problems == ["--set nodes.x: 'nodes' is not a mapping"]


def test_override_with_empty_key_is_rejected():
    with pytest.raises(SpecError) as info:
        apply_overrides({}, ["=3"], "<t>")
    assert "empty key" in info.value.problems[0]


# ---- the file itself ------------------------------------------------------------------------

def test_invalid_yaml_reports_the_line(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "name: j\ncommand: x\nresources: {cpus: 1\nnodes: 2\n"))
    (problem,) = info.value.problems
    assert re.match(r"line \d+, column \d+: not valid YAML", problem), problem
    line = int(re.match(r"line (\d+)", problem).group(1))
    assert 3 <= line <= 5


def test_invalid_yaml_indentation_reports_line_3(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "name: j\ncommand: x\n  nodes: 2\n"))
    assert info.value.problems[0].startswith("line 3, column ")


def test_empty_file_reports_the_missing_required_fields(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, ""))
    assert sorted(info.value.problems) == ["command: required field is missing",
                                           "name: required field is missing"]


def test_non_mapping_file_is_rejected(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(write(tmp_path, "- a\n- b\n"))
    assert info.value.problems == ["(top level): a job file must be a YAML mapping of fields"]


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_job_file(tmp_path / "nope.yaml")
    assert info.value.problems == [f"no such job file: {tmp_path / 'nope.yaml'}"]


# ---- the CLI refuses bad files before anything is queued ---------------------------------------

# Port 9 (discard): nothing listens, so a CLI that tried the server would say it cannot reach it.
NOWHERE = "http://127.0.0.1:9"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cli_app(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAYBATCH_ADDRESS", raising=False)
    monkeypatch.delenv("RAYBATCH_TOKEN", raising=False)
    from raybatch.cli.main import app
    return app


@pytest.mark.parametrize("text, field", [
    ("name: j\ncommand: x\nnodez: 2\n", "nodez: unknown field"),
    ("name: j\ncommand: x\nresources: {cpu: 2}\n", "resources.cpu: unknown field"),
    ("name: j\ncommand: x\nnodes: two\n", "nodes: "),
    ("name: j\n", "command: required field is missing"),
    ("name: j\ncommand: x\ncode: missing-dir\n", "code: directory 'missing-dir' does not exist"),
])
def test_submit_rejects_a_bad_file_with_exit_2(runner, cli_app, tmp_path, text, field):
    bad = write(tmp_path, text)
    result = runner.invoke(cli_app, ["--address", NOWHERE, "submit", str(bad)])
    assert result.exit_code == 2, result.output
    out = flat(result.output)
    assert "invalid job file" in out
    assert field in out
    assert "cannot reach" not in out


def test_submit_rejects_a_bad_override_with_exit_2(runner, cli_app, tmp_path):
    good = write(tmp_path, "name: j\ncommand: x\n")
    result = runner.invoke(cli_app, ["--address", NOWHERE, "submit", str(good), "--set", "nodes=0"])
    assert result.exit_code == 2, result.output
    assert "nodes: Input should be greater than or equal to 1" in flat(result.output)


def test_submit_of_a_good_file_does_contact_the_server(runner, cli_app, tmp_path):
    """The control for the tests above: a valid file gets past validation and only then
    fails on the unreachable address (exit 1, not 2)."""
    good = write(tmp_path, "name: j\ncommand: x\n")
    result = runner.invoke(cli_app, ["--address", NOWHERE, "submit", str(good)])
    assert result.exit_code == 1, result.output
    assert "cannot reach the raybatch server at http://127.0.0.1:9" in flat(result.output)


def test_validate_prints_the_normalized_yaml(runner, cli_app, tmp_path):
    good = write(tmp_path, "name: j\ncommand: echo hi\nmax_wall_clock: 30m\npriority: high\n"
                           "resources: {memory: 1GiB}\n")
    result = runner.invoke(cli_app, ["validate", str(good), "--set", "nodes=2"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert doc["name"] == "j" and doc["command"] == "echo hi"
    assert doc["nodes"] == 2
    assert doc["max_wall_clock"] == 1800.0
    assert doc["grace_period"] == 30.0
    assert doc["priority"] == "high"
    assert doc["resources"] == {"cpus": 1.0, "gpus": 0.0, "memory": 2**30, "custom": {}}
    assert doc["framework"] == "custom" and doc["experiment"] == "default"
    assert list(doc) == list(JobSpec.model_fields)


def test_validate_json(runner, cli_app, tmp_path):
    good = write(tmp_path, "name: j\ncommand: echo hi\nnodes: 3\n")
    result = runner.invoke(cli_app, ["validate", "-o", "json", str(good)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "j" and doc["nodes"] == 3
    assert doc["max_wall_clock"] == 7 * 86400.0
    assert doc["placement"] == {"strategy": "spread"}


def test_validate_rejects_a_bad_file_with_exit_2(runner, cli_app, tmp_path):
    bad = write(tmp_path, "name: j\ncommand: x\nframework: tensorfloww\n")
    result = runner.invoke(cli_app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "framework: unknown framework 'tensorfloww'; allowed: custom, pytorch, tensorflow" in flat(result.output)


def test_retry_policy_exit_codes_and_stall_timeout():
    spec = parse_job({"name": "r", "command": "x", "stall_timeout": "5m",
                      "retries": {"user": 2, "user_exit_codes": [3, 75]}}, check_paths=False)
    assert spec.stall_timeout == 300.0
    assert spec.retries.retries_user_error(75) and not spec.retries.retries_user_error(1)
    assert parse_job({"name": "r", "command": "x"}, check_paths=False).retries.retries_user_error(1)
    problems = problems_of({"name": "r", "command": "x", "retries": {"user_exit_codes": [0, 300]}})
    assert problems[0].startswith("retries.user_exit_codes: exit codes must be 1-255")


def test_preemptible_and_low_priority_nodes():
    spec = parse_job(job(preemptible=False, low_priority_nodes="require"))
    assert spec.preemptible is False and spec.low_priority_nodes == "require"
    assert parse_job(job()).preemptible is True
    assert one_problem(job(low_priority_nodes="sometimes")).startswith("low_priority_nodes: Input should be")


# ---- the scheduler's policy file --------------------------------------------------------

def test_policy_file_defaults_and_quotas(tmp_path):
    from raybatch.spec.policy import load_policy

    assert load_policy(tmp_path / "missing.yaml").backfill is True
    p = tmp_path / "policy.yaml"
    p.write_text("backfill: false\nquotas:\n  vision: {max_nodes: 4, max_gpus: 8, share: 2}\n"
                 "  default: {max_nodes: 2}\n")
    cfg = load_policy(p)
    assert cfg.backfill is False and cfg.preemption is True
    assert cfg.quota("vision").max_nodes == 4 and cfg.quota("vision").share == 2
    assert cfg.quota("anything-else").max_nodes == 2


@pytest.mark.parametrize("text,problem", [
    ("quotas: {vision: {max_nodez: 1}}", "quotas.vision.max_nodez: unknown field; allowed: max_gpus, max_nodes, share"),
    ("quotas: {vision: {share: 0}}", "quotas.vision.share: Input should be greater than 0"),
    ("quotas: {'bad name': {}}", "quotas: 'bad name' is not an experiment name"),
    ("backfil: true", "backfil: unknown field; allowed: allow_pip_sources, audit_retention_days, backfill, fair_share, "
     "key_vaults, preemption, quotas, workspaces"),
    ("- a list", "(top level): the policy file must be a YAML mapping"),
])
def test_policy_file_errors_name_the_field(tmp_path, text, problem):
    from raybatch.spec.policy import load_policy

    p = tmp_path / "policy.yaml"
    p.write_text(text + "\n")
    with pytest.raises(SpecError) as e:
        load_policy(p)
    assert "invalid policy file" in str(e.value)
    assert e.value.problems[0].startswith(problem), e.value.problems
