"""The embedded local default, as the README runs it: `raybatch submit` with no
server configured starts a 2-node local Ray cluster and the server under
RAYBATCH_HOME, later calls reuse them, `raybatch down` stops exactly those pids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raybatch.local.embedded import _alive
from tests.conftest import RECIPES

pytestmark = pytest.mark.timeout(300)
RAYBATCH = str(Path(sys.executable).with_name("raybatch"))


def test_submit_starts_local_default_then_down_stops_it(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAYBATCH_ADDRESS", "RAYBATCH_TOKEN")}
    env["RAYBATCH_HOME"] = str(home)

    def rb(*args, timeout=180):
        return subprocess.run([RAYBATCH, *args], capture_output=True, text=True, env=env, timeout=timeout)

    try:
        p = rb("submit", str(RECIPES / "hello-custom" / "job.yaml"), "--set", "nodes=2", "--wait")
        assert p.returncode == 0, p.stdout + p.stderr + (home / "logs" / "server.log").read_text()[-2000:]
        job_id = p.stdout.splitlines()[0]
        info = json.loads((home / "local.json").read_text())
        pids = [info["pids"]["head"], *info["pids"]["workers"], info["pids"]["server"]]
        assert len(info["pids"]["workers"]) == 1 and all(_alive(pid) for pid in pids)
        assert oct((home / "token").stat().st_mode & 0o777) == "0o600"
        # reused, not started again
        up = rb("up")
        assert up.returncode == 0 and info["url"] in up.stdout
        assert json.loads((home / "local.json").read_text())["pids"] == info["pids"]
        shown = json.loads(rb("show", job_id, "-o", "json").stdout)
        assert len({r["node_id"] for r in shown["attempts"][0]["ranks"]}) == 2
        status = json.loads(rb("status", "-o", "json").stdout)
        assert sum(1 for n in status["nodes"] if n["alive"]) == 2
    finally:
        down = rb("down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not any(_alive(pid) for pid in pids)
    assert not (home / "local.json").exists()
    # the store outlives the processes
    assert (home / "raybatch.db").exists()
