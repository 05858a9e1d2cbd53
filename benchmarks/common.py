"""What the benchmarks share: a throw-away embedded local default, and one way to
print a figure (median, min, max)."""

from __future__ import annotations

import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raybatch import Client  # noqa: E402
from raybatch.local.embedded import LocalCluster  # noqa: E402


@contextmanager
def local_default(nodes: int = 2) -> Iterator[tuple[dict, Client]]:
    """``raybatch up`` under a fresh RAYBATCH_HOME; ``down`` afterwards."""
    local = LocalCluster(Path(tempfile.mkdtemp(prefix="raybatch-bench-")))
    info = local.up(nodes=nodes)
    info = {**info, "token": local.token()}
    try:
        yield info, Client(info["url"], info["token"])
    finally:
        local.down()


def figure(label: str, values: list[float], unit: str = "s", width: int = 24) -> str:
    return (f"  {label:{width}s} median {statistics.median(values):.2f} {unit}  "
            f"(min {min(values):.2f}, max {max(values):.2f})")
