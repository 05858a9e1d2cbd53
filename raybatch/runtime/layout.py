"""Where an attempt's control files go. (The job directory's tree, logs, checkpoints
and outputs, is ``raybatch.storage.plan``'s: it may be a path or blob storage.)

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
