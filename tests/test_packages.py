"""``packages``: requirements files read at submit, the Ray runtime_env built from a
job, a failed build in words (without credentials), and the quick pip check."""

from __future__ import annotations

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
    """What RequirementsCheck runs on node 0 of the gang, run here."""
    items, options = environment.check_items(s)
    code, text = environment.dry_run(items, options, timeout)
    return code is not None, environment.pip_verdict(code, text)


def test_requirements_check_says_no_only_when_pip_is_sure():
    done, verdict = run_check(spec(packages={"pip": ["this-package-does-not-exist-raybatch==1.0"]}))
    assert done and verdict and "No matching distribution found" in verdict
    done, verdict = run_check(spec(packages={"pip": ["numpy<2"]}))
    assert done and verdict is None
    # an index that cannot be reached is no verdict (the nodes may reach it)
    done, verdict = run_check(spec(packages={"pip": ["--index-url http://127.0.0.1:9/simple", "nope==1"]}))
    assert done and verdict is None


@pytest.mark.parametrize("item, what", [
    ("-e ./src", "is a pip option (-e)"),
    ("--index-url https://pkgs.example.com/simple", "is a pip option (--index-url)"),
    ("--extra-index-url=https://pkgs.example.com/simple", "is a pip option"),
    ("-f /wheels", "is a pip option (-f)"),
    ("git+https://github.com/org/repo@v1", "is a VCS requirement"),
    ("pkg @ git+https://github.com/org/repo", "names its source (VCS"),
    ("pkg @ https://files.example.com/pkg-1.0.tar.gz", "names its source (URL"),
    ("./pkg", "is a local path"),
    ("/abs/pkg", "is a local path"),
    ("~/pkg", "is a local path"),
    ("file:///srv/pkg-1.0-py3-none-any.whl", "is a URL"),
    ("http://files.example.com/pkg-1.0-py3-none-any.whl", "is a URL"),
    ("pkg-1.0-py3-none-any.whl", "is a local path or archive"),
    # pip cuts off extras and a marker and installs what is left as a file, for any of its archive
    # extensions (pip's install_req_from_line gives a file:// link for each of these)
    ("x.tar.gz[a]", "is a local path or archive"),
    ("x.whl[foo]", "is a local path or archive"),
    ('x.zip[a]; python_version>"3"', "is a local path or archive"),
    ("x.WHL ; sys_platform == 'linux'", "is a local path or archive"),
    ("x.tar.lz", "is a local path or archive"),
    ("x.tbz", "is a local path or archive"),
    ("x.txz", "is a local path or archive"),
    ("x.tlz", "is a local path or archive"),
    ("x.tar.lzma", "is a local path or archive"),
    # pip would look x.whl up by name, but no project is named like an archive: refused all the same
    ("x.whl[a]>=1", "is a local path or archive"),
    ("numpy=1.0", "is not a requirement"),
])
def test_pip_sources_and_options_are_refused_unless_the_policy_allows_them(item, what):
    s = spec(packages={"pip": ["numpy<2", item]})
    problems = environment.pip_problems(s)
    assert len(problems) == 1 and problems[0].startswith(f"packages.pip: '{item}' {what}"), problems
    assert "allow_pip_sources: true" in problems[0]
    assert environment.pip_problems(s, allow_sources=True) == []


def test_named_requirements_pass_and_index_credentials_never_do():
    ok = ["numpy<2", "chainer==7.8.1", "requests[socks]; python_version >= '3.8'", "torch>=2,<3", "a.b-c_d"]
    assert environment.pip_problems(spec(packages={"pip": ok})) == []
    for item in ("--extra-index-url https://user:s3cr3t@pkgs.example.com/simple",
                 "pkg @ https://s3cr3t@files.example.com/pkg.whl",
                 "--index-url https://pkgs.example.com/simple?token=s3cr3t"):
        for allow in (False, True):
            problems = environment.pip_problems(spec(packages={"pip": [item]}), allow_sources=allow)
            assert len(problems) == 1 and ("credentials" in problems[0] or "token" in problems[0]), problems
            assert "s3cr3t" not in problems[0] and "***" in problems[0]
    # variables the nodes expand are no credentials (with the policy's consent to an index option)
    named = "--extra-index-url https://${PIP_USER}:${PIP_PASSWORD}@pkgs.example.com/simple"
    assert environment.pip_problems(spec(packages={"pip": [named]}), allow_sources=True) == []


def test_the_sdk_never_sends_index_credentials(tmp_path):
    from raybatch.client import Client, RaybatchError

    c = Client("http://127.0.0.1:9", "tok")  # nothing listens there: a request would say "cannot reach"
    with pytest.raises(RaybatchError) as err:
        c.submit({"name": "p", "command": "x",
                  "packages": {"pip": ["--extra-index-url https://me:s3cr3t@pkgs.example.com/simple"]}})
    assert "packages.pip" in str(err.value) and "credentials" in str(err.value)
    assert "s3cr3t" not in str(err.value) and "cannot reach" not in str(err.value)


def test_the_policy_file_takes_allow_pip_sources(tmp_path):
    from raybatch.spec.policy import SchedulerPolicy, load_policy

    assert SchedulerPolicy().allow_pip_sources is False
    (tmp_path / "policy.yaml").write_text("allow_pip_sources: true\n")
    assert load_policy(tmp_path / "policy.yaml").allow_pip_sources is True
