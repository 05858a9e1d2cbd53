"""What the benchmarks share: a throw-away embedded local default, and one way to
print a figure (median, min, max)."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
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


def recipe_walltime(client: Client, job_file: Path, command: str) -> float:
    """Submit a recipe's job with ``command`` and wait: seconds from submit to SUCCEEDED,
    as the user waits for it."""
    t0 = time.monotonic()
    job = client.submit(job_file, overrides=[f"command={command}"])
    done = client.wait(job.id, poll=0.1)
    elapsed = time.monotonic() - t0
    assert done.state == "SUCCEEDED", done.reason
    return elapsed


def compare(title: str, runs: int, raybatch_run, raybatch_label: str, baseline_run, baseline_label: str) -> None:
    """Run raybatch and the raw baseline alternately (after one warm-up of each) and print
    both, their ratio against the 1.05x target, and the fixed cost (the difference)."""
    raybatch_run(warmup=True), baseline_run(warmup=True)  # page cache, worker pools
    rb, base = [], []
    for _ in range(runs):
        rb.append(raybatch_run(warmup=False))
        base.append(baseline_run(warmup=False))
    print(f"{title}, {runs} interleaved runs")
    print(figure(raybatch_label, rb))
    print(figure(baseline_label, base))
    print(figure(f"ratio raybatch / {baseline_label.split(' (')[0]}", [a / b for a, b in zip(rb, base)], "x")
          + "  target <= 1.05x")
    print(figure("fixed cost (difference)", [a - b for a, b in zip(rb, base)]))
