"""Where an attempt's files go.

Job directory (under the job's output root; users read it)::

    <job_dir>/stdouterr/attempt-<n>/rank-<r>/stdout.txt, stderr.txt
    <job_dir>/checkpoints/              RAYBATCH_CHECKPOINT_DIR, kept across attempts
    <job_dir>/outputs/<id>/             RAYBATCH_OUTPUT_<ID> unless the job file says otherwise
    <job_dir>/shared/                   AZ_BATCHAI_SHARED_JOB_TEMP

Control directory (under the server's state dir; the driver and the server
share it on the head node)::

    <state>/attempts/<job_id>/<n>/attempt.json   what the driver must run
    <state>/attempts/<job_id>/<n>/status.json    what the driver reports back
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def stdouterr_dir(job_dir: str | Path, attempt: int, rank: int) -> Path:
    return Path(job_dir) / "stdouterr" / f"attempt-{attempt}" / f"rank-{rank}"


def log_file(job_dir: str | Path, attempt: int, rank: int, stream: str) -> Path:
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
    return stdouterr_dir(job_dir, attempt, rank) / f"{stream}.txt"


def checkpoint_dir(job_dir: str | Path) -> Path:
    return Path(job_dir) / "checkpoints"


def output_dir(job_dir: str | Path, ident: str, configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else Path(job_dir) / "outputs" / ident


def control_dir(state_dir: str | Path, job_id: str, attempt: int) -> Path:
    return Path(state_dir) / "attempts" / job_id / str(attempt)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
