"""Bad input is refused with a clear error, never a 500 or a traceback (issue 18, part 1):
job files over the loader's limits (alias bombs, nesting, size, non-UTF-8, unreadable),
fields over the spec's (a 400-digit memory, NaN or infinite resources, a command or an
environment past Linux's argument limits), a log offset past any file, and rich markup in
what the CLI prints. Through the real CLI and a real server on a real Ray cluster."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
import yaml

from raybatch.config import API_PREFIX
from raybatch.server.routes.jobs import MAX_LOG_OFFSET
from raybatch.spec.job import MAX_COMMAND_BYTES
from raybatch.spec.loader import (MAX_JOB_FILE_BYTES, MAX_YAML_ALIASES, MAX_YAML_DEPTH, SpecError, apply_overrides,
                                  load_job_document)
from tests.conftest import RayTestCluster, ServerProcess, run_cli, stop_everything

GOOD = "name: bad-input\ncommand: echo hi\n"


def billion_laughs(levels: int = 9) -> str:
    """Ten times more values per level: 10^9 strings once expanded, 1 KiB as text."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return GOOD + "environment: {}\nx:\n" + "\n".join("  " + line for line in lines) + "\n"


def flow_bomb(levels: int = 7) -> str:
    """The same on one line (a `--set` value): 10^levels values once expanded."""
    parts = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "{" + ", ".join(parts) + "}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cluster = RayTestCluster(nodes=1, cpus=1)
    s = ServerProcess(cluster, tmp_path_factory.mktemp("bad-input")).start()
    try:
        yield s
    finally:
        try:
            stop_everything(s)
        finally:
            s.stop()
            cluster.shutdown()


def _refused(p: subprocess.CompletedProcess, *phrases: str) -> str:
    """A CLI refusal: exit 2, an ``error:`` line with every phrase, no traceback."""
    err = p.stderr
    assert p.returncode == 2, (p.returncode, p.stdout, err[-2000:])
    assert "Traceback" not in err and err.startswith("error:"), err[-2000:]
    for phrase in phrases:
        assert phrase in err, (phrase, err[-2000:])
    return err


# ---- job files, through `raybatch submit` ------------------------------------------------

def test_submit_refuses_job_files_over_the_limits_quickly(server, tmp_path):
    files = {
        "bomb.yaml": (billion_laughs().encode(), ["expands to more than", "values (aliases expanded)"]),
        # 100 aliases of a 512 KiB value: an array job of 50 MiB (it went into the request)
        "text-bomb.yaml": (("name: x\ncommand: echo ${{item}}\narray:\n  values:\n    - &v " + "x" * (512 << 10)
                            + "\n" + "    - *v\n" * 100).encode(), ["MiB of text (aliases expanded)"]),
        "latin1.yaml": (f"{GOOD}environment: {{CITY: Zürich}}\n".encode("latin-1"),
                        ["is not UTF-8 text: byte 0xfc", "line 3"]),
        "huge.yaml": (GOOD.encode() + b"# " + b"x" * (2 * MAX_JOB_FILE_BYTES) + b"\n",
                      ["larger than 1 MiB", "MAX_JOB_FILE_BYTES"]),
        "long-command.yaml": (f"name: x\ncommand: echo {'x' * (MAX_COMMAND_BYTES + 10)}\n".encode(),
                              ["command:", "at most 100 KiB", "more characters)"]),
        "markup.yaml": (f"{GOOD}environment: {{'[/x]': 1}}\n".encode(), ["'[/x]' is not a valid environment"]),
    }
    for name, (data, phrases) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        started = time.monotonic()
        err = _refused(run_cli(server, "submit", str(path)), *phrases)
        assert time.monotonic() - started < 10, name  # a CLI start (~0.5 s) and the refusal, on a busy machine
        assert len(err) < 5000, f"{name}: the error quotes too much: {len(err)} characters"
    assert server.client().list() == []  # nothing reached the server


def test_submit_of_an_unreadable_job_file_is_a_clean_error(server, tmp_path):
    _refused(run_cli(server, "submit", str(tmp_path / "missing.yaml")), "no such job file")
    _refused(run_cli(server, "submit", str(tmp_path)), "is a directory; give a job file")
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    _refused(run_cli(server, "submit", str(loop)), "cannot read job file", "Too many levels of symbolic links")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would block until a writer comes: refused before it is opened
    _refused(run_cli(server, "submit", str(fifo), timeout=30), "is not a regular file")
    if os.geteuid() != 0:  # root reads a file whatever its mode
        locked = tmp_path / "locked.yaml"
        locked.write_text(GOOD)
        locked.chmod(0)
        _refused(run_cli(server, "submit", str(locked)), "cannot read job file", "Permission denied")


def test_loader_limits(tmp_path):
    """The limits the CLI test does not walk, in process: nesting, cycles, alias counts,
    an integer YAML cannot read, a `--set` alias bomb, a large environment."""
    def problem(text: str | bytes) -> str:
        path = tmp_path / "job.yaml"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        with pytest.raises(SpecError) as e:
            load_job_document(path)
        return "\n".join(e.value.problems)

    assert f"nested deeper than {MAX_YAML_DEPTH}" in problem(GOOD + "x: " + "[" * 200 + "]" * 200 + "\n")
    assert "a cycle" in problem(GOOD + "x: &a [1, *a]\n")
    many = "".join("  - *v\n" for _ in range(MAX_YAML_ALIASES + 1))
    assert f"more than {MAX_YAML_ALIASES} aliases" in problem(GOOD + "v: &v 1\nx:\n" + many)
    assert "integer" in problem(GOOD + "nodes: " + "1" * 5000 + "\n")
    assert f"'BIG' is {4 + (200 << 10)} bytes (NAME=value); at most 100 KiB" in problem(
        GOOD + f"environment: {{BIG: {'x' * (200 << 10)}}}\n")
    # aliases of one 90 KiB value: a small file, 1.1 MiB of environment
    env = f"  V0: &v {'x' * (90 << 10)}\n" + "".join(f"  V{i}: *v\n" for i in range(1, 12))
    assert "command and environment:" in problem(GOOD + "environment:\n" + env)
    values = "".join("  - *v\n" for _ in range(60))
    assert "MiB of text (aliases expanded)" in problem(f"{GOOD}v: &v {'x' * (90 << 10)}\nx:\n{values}")
    with pytest.raises(SpecError, match="expands to more than"):  # not taken as text either
        apply_overrides({}, ["x=" + flow_bomb()], "--set")
    # a sweep's bound given as text is a float once parsed: checked then
    sweep = ("name: s\ncommand: python t.py --lr ${{search_space.lr}}\nsweep:\n  search_space:\n"
             "    lr: {type: uniform, min_value: 'nan', max_value: 1}\n  objective: {primary_metric: acc, goal: maximize}\n"
             "  sampling_algorithm: random\n  limits: {max_total_trials: 2}\n")
    assert "sweep.search_space.lr.min_value: nan is not allowed" in problem(sweep)
    # a foreign job file is read within the same limits (Batch AI's job.json, Azure ML's YAML)
    assert "larger than 1 MiB" in problem(b'{"properties": {"nodeCount": 1, "x": "' + b"x" * (2 << 20) + b'"}}')
    assert "is not UTF-8 text" in problem(b"$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema"
                                          b".json\ncommand: echo \xff\n")
    # the limits leave room for every real file: a job at the file size limit loads
    path = tmp_path / "big-ok.yaml"
    values = yaml.safe_dump({"name": "ok", "command": "echo ${{item}}",
                             "array": {"values": [f"v{i:06d}" for i in range(70000)]}})
    path.write_text(values)
    assert len(values) < MAX_JOB_FILE_BYTES
    assert len(load_job_document(path)[0].array.values) == 70000


# ---- the spec's numbers and sizes, through the server -----------------------------------------

def test_server_refuses_non_finite_and_huge_numbers_with_422(server):
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    big = "9" * 400
    cases = {  # raw JSON: NaN and Infinity are what Python's json reads and writes
        '"resources": {"cpus": NaN}': "resources.cpus",
        '"resources": {"cpus": Infinity}': "resources.cpus",
        '"resources": {"custom": {"gpu_a100": NaN}}': "resources.custom.gpu_a100",
        f'"resources": {{"memory": {big}}}': "the size is far too large",
        f'"max_wall_clock": {big}': "the duration is far too large",
        '"max_wall_clock": "1e400"': "max_wall_clock",
        f'"command": "{"x" * (MAX_COMMAND_BYTES + 1)}"': "at most 100 KiB",
    }
    with httpx.Client(base_url=server.url + API_PREFIX, headers=headers, timeout=30) as http:
        for fields, expected in cases.items():
            body = '{"spec": {"name": "bad", "command": "echo", %s}}' % fields if '"command"' not in fields \
                else '{"spec": {"name": "bad", %s}}' % fields
            r = http.post("/jobs", content=body)
            assert r.status_code == 422, (fields[:80], r.status_code, r.text[:500])
            assert expected in r.text, (fields[:80], r.text[:500])
    assert server.client().list() == []


# ---- a real job whose command and files hold rich markup; its log past the end ---------------

def test_markup_in_commands_and_paths_and_a_huge_log_offset(server, tmp_path):
    job = tmp_path / "markup.yaml"
    job.write_text(yaml.safe_dump({
        "name": "markup", "outputs": {"out": {}},
        # a file "b].txt" in a folder "[": its listed path holds the closing tag [/b]
        "command": "echo '[/x] [bold]' && mkdir \"$RAYBATCH_OUTPUT_OUT/[\" && touch \"$RAYBATCH_OUTPUT_OUT/[/b].txt\"",
    }))
    job_id = run_cli(server, "submit", str(job), check=True).stdout.strip()
    assert server.client().wait(job_id, timeout=120).state.value == "SUCCEEDED"
    shown = run_cli(server, "show", job_id, check=True).stdout
    assert "echo '[/x] [bold]'" in shown
    files = run_cli(server, "files", job_id, check=True).stdout
    assert "[/b].txt" in files
    headers = {"Authorization": f"Bearer {server.token}"}
    url = f"{server.url}{API_PREFIX}/jobs/{job_id}/logs"
    r = httpx.get(url, params={"offset": 2**63}, headers=headers, timeout=30)
    assert r.status_code == 422 and "offset" in r.text, r.text
    r = httpx.get(url, params={"offset": 2**53}, headers=headers, timeout=30)  # EINVAL on ext4
    assert r.status_code == 422 and "offset" in r.text, r.text
    r = httpx.get(url, params={"offset": MAX_LOG_OFFSET}, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["data"] == "", r.text
    assert "[/x] [bold]" in httpx.get(url, headers=headers, timeout=30).json()["data"]


# ---- durations past any calendar; the web view's times and log offsets ---------------------

def test_wall_clock_and_grace_period_are_bounded():
    """1e300 s of wall clock made the queue's estimates now + 1e300, and the web queue page a 500."""
    from raybatch.spec.job import JobSpec
    from raybatch.spec.loader import parse_job

    def problem(**fields) -> str:
        with pytest.raises(SpecError) as info:
            parse_job({"name": "j", "command": "echo", **fields}, check_paths=False)
        assert len(info.value.problems) == 1, info.value.problems
        return info.value.problems[0]

    for value in (1e300, "99999999999d", "3651d", 10 * 365 * 86400 + 1):
        p = problem(max_wall_clock=value)
        assert p.startswith("max_wall_clock: must be at most 10 years (315360000 s)"), p
    for value in (1e300, "99999999999d", "2d", 86401):
        p = problem(max_wall_clock="30d", grace_period=value)
        assert p.startswith("grace_period: must be at most 1 day (86400 s)"), p
    spec = JobSpec(name="j", command="echo", max_wall_clock="3650d", grace_period="1d")
    assert (spec.max_wall_clock, spec.grace_period) == (10 * 365 * 86400, 86400)
    # a deadline is a time, not a duration the server adds to now: 2e22 s stays allowed
    spec = JobSpec(name="j", command="echo", deadline=2e22, runtime_estimate="1h")
    assert spec.deadline == "20000000000000000000000s"


def test_web_times_tolerate_any_float():
    from raybatch.server.web.routes import _dur, _ts

    assert _ts(0) == "" and _ts(None) == ""
    assert _ts(1_700_000_000) == "2023-11-14 22:13:20Z"
    for t in (1e300, 2e22, -1e20, float("inf"), float("-inf"), float("nan"), 253402300800.0):
        assert "(epoch s)" in _ts(t), t
    assert _dur(float("inf")) == "" and _dur(float("nan")) == "" and _dur(90) == "1m30s"


def test_web_log_offset_is_bounded(server):
    """The web view's log endpoint, like the API's: an offset past MAX_LOG_OFFSET is a 422,
    not a seek that fails with a 500."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/web/login", data={"token": server.token, "next": "/web/"})
        assert r.status_code == 303, r.text[:500]
        assert http.get("/web/").status_code == 200  # the queue page, logged in
        url = "/web/jobs/no-such-job/logs"
        for offset in (2**62, MAX_LOG_OFFSET + 1):
            r = http.get(url, params={"offset": offset})
            assert r.status_code == 422 and "offset" in r.text, (offset, r.status_code, r.text[:500])
        assert http.get(url, params={"offset": MAX_LOG_OFFSET}).status_code == 404  # past the bound check
