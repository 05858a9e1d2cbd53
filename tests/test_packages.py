"""``packages``: requirements files read at submit, the Ray runtime_env built from a
job, a failed build in words (without credentials), and the quick pip check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from raybatch.runtime import environment
from raybatch.spec.job import JobSpec
from raybatch.spec.loader import SpecError, load_job_file, parse_job


def write_job(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "command": "python x.py", **fields}))
    return path


def test_requirements_file_is_read_at_submit_into_pip(tmp_path):
    (tmp_path / "reqs").mkdir()
    (tmp_path / "reqs" / "base.txt").write_text("scipy>=1.10  # inline comment\n")
    (tmp_path / "reqs" / "requirements.txt").write_text(
        "# comment\n\nnumpy<2\n-r base.txt\n--extra-index-url https://example.org/simple\n"
        "pandas \\\n  ==2.2.3\nrequests[socks]; python_version >= '3.8'\n")
    spec = load_job_file(write_job(tmp_path, packages={"requirements": "reqs/requirements.txt",
                                                       "pip": ["chainer==7.8.1"]}))
    assert spec.packages.pip == ["numpy<2", "scipy>=1.10", "--extra-index-url https://example.org/simple",
                                 "pandas   ==2.2.3", "requests[socks]; python_version >= '3.8'", "chainer==7.8.1"]
    assert spec.packages.requirements is None  # the stored spec needs no file
    # a spec already read (re-submitted as an object) is unchanged
    again = parse_job(spec.model_dump(mode="json"))
    assert again.packages.pip == spec.packages.pip


def test_dash_r_items_of_pip_are_read_relative_to_the_job_file(tmp_path):
    (tmp_path / "r.txt").write_text("numpy<2\n")
    spec = load_job_file(write_job(tmp_path, packages={"pip": ["-r r.txt", "chainer==7.8.1"]}))
    assert spec.packages.pip == ["numpy<2", "chainer==7.8.1"]


@pytest.mark.parametrize("content, problem", [
    ("-c constraints.txt\n", "line 1: constraints files (-c) are not supported"),
    ("numpy\n-e ./src\n", "line 2: editable installs (-e) need the source on every node"),
    ("./dist/pkg-1.0.whl\n", "is a local path, which the nodes do not have"),
    ("--no-deps\n", "pip option '--no-deps' is not supported here"),
    ("-r requirements.txt\n", "includes itself"),
])
def test_requirements_file_problems_name_the_field_and_line(tmp_path, content, problem):
    (tmp_path / "requirements.txt").write_text(content)
    with pytest.raises(SpecError) as err:
        load_job_file(write_job(tmp_path, packages={"requirements": "requirements.txt"}))
    assert "packages.requirements" in str(err.value) and problem in str(err.value), str(err.value)


def test_missing_requirements_file_is_a_spec_error_naming_the_field(tmp_path):
    with pytest.raises(SpecError, match=r"packages.requirements: file 'nope.txt' does not exist"):
        load_job_file(write_job(tmp_path, packages={"requirements": "nope.txt"}))
    with pytest.raises(SpecError, match=r"packages.pip: '-r other.txt': file 'other.txt' does not exist"):
        load_job_file(write_job(tmp_path, packages={"pip": ["-r other.txt"]}))


def test_image_and_packages_exclude_each_other(tmp_path):
    (tmp_path / "r.txt").write_text("numpy<2\n")
    with pytest.raises(SpecError, match="image and packages cannot be combined"):
        load_job_file(write_job(tmp_path, image="python:3.11", packages={"requirements": "r.txt"}))


def spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"name": "p", "command": "x", **fields})


def test_runtime_env_from_the_job():
    assert environment.runtime_env(spec()) is None
    assert environment.runtime_env(spec(packages={"pip": []})) is None
    renv = environment.runtime_env(spec(packages={"pip": ["chainer==7.8.1", "numpy<2", "setuptools<82"]}))
    pip = renv["pip"]
    assert pip["packages"] == ["chainer==7.8.1", "numpy<2", "setuptools<82"] and pip["pip_check"] is False
    assert pip["pip_install_options"][:2] == ["--disable-pip-version-check", "--no-cache-dir"]
    if environment._pip_has_build_constraints():  # the job's pins hold in sdist builds too
        assert pip["pip_install_options"][2:] == ["--build-constraint",
                                                  "../ray_runtime_env_internal_pip_requirements.txt"]
    # not only pins (an option, a URL): a constraints file could not hold them
    renv = environment.runtime_env(spec(packages={"pip": ["--extra-index-url https://x/simple", "numpy"]}))
    assert "--build-constraint" not in renv["pip"]["pip_install_options"]
    assert environment.runtime_env(spec(packages={"pip": ["numpy"], "installer": "uv"})) == {
        "uv": {"packages": ["numpy"]}}
    assert environment.runtime_env(spec(image="python:3.11")) == {"image_uri": "python:3.11"}
    assert environment.describe(spec(packages={"pip": ["a", "b"]})) == "pip: 2 packages"
    assert environment.describe(spec(image="python:3.11")) == "image: python:3.11"
    # one key per distinct env
    assert environment.env_key(spec(packages={"pip": ["a"]})) == environment.env_key(spec(packages={"pip": ["a"]}))
    assert environment.env_key(spec(packages={"pip": ["a"]})) != environment.env_key(spec(packages={"pip": ["b"]}))


def test_redact_hides_credentials():
    text = ("Looking in indexes: https://user:tok3n@pkgs.example.com/simple, https://tok3n@h/simple "
            "https://acct.blob.core.windows.net/c/x?sv=1&sig=abc%2Bdef&se=2 PIP_TOKEN=tok3n ok")
    out = environment.redact(text)
    assert "tok3n" not in out and "abc%2Bdef" not in out
    assert "https://***@pkgs.example.com/simple" in out and "sig=***" in out and out.endswith(" ok")


RAY_ERROR = """Failed to set up runtime environment.
Could not create the actor because its associated runtime env failed to be created.
Traceback (most recent call last):
  File "/x/pip.py", line 252, in _install_pip_packages
ray._private.runtime_env.utils.SubprocessCalledProcessError: Run cmd[9] failed with the following details.
Last 50 lines of stdout:
    Looking in indexes: https://pypi.org/simple, https://me:pw@private/simple
    ERROR: Could not find a version that satisfies the requirement nope==1.0 (from versions: none)
    ERROR: No matching distribution found for nope==1.0
"""


def test_failure_summary_keeps_pips_error_lines():
    s = environment.failure_summary(RAY_ERROR, spec(packages={"pip": ["nope==1.0"]}))
    assert s == ("ERROR: Could not find a version that satisfies the requirement nope==1.0 (from versions: none)"
                 " | ERROR: No matching distribution found for nope==1.0")
    podman = "FileNotFoundError: [Errno 2] No such file or directory: 'podman'"
    assert "podman is not installed on this node" in environment.failure_summary(podman, spec(image="x"))


def run_check(s: JobSpec, timeout: float = 120) -> tuple[bool, str | None]:
    check = environment.RequirementsCheck(s).start()
    try:
        deadline = time.monotonic() + timeout
        while not check.done and time.monotonic() < deadline:
            check.poll()
            time.sleep(0.2)
        return check.done, check.verdict
    finally:
        check.stop()


def test_requirements_check_says_no_only_when_pip_is_sure():
    done, verdict = run_check(spec(packages={"pip": ["this-package-does-not-exist-raybatch==1.0"]}))
    assert done and verdict and "No matching distribution found" in verdict
    done, verdict = run_check(spec(packages={"pip": ["numpy<2"]}))
    assert done and verdict is None
    # an index that cannot be reached is no verdict (the nodes may reach it)
    done, verdict = run_check(spec(packages={"pip": ["--index-url http://127.0.0.1:9/simple", "nope==1"]}))
    assert done and verdict is None
