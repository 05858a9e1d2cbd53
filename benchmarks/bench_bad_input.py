"""Benchmark: what refusing a bad job file costs (issue 18).

For each of the loader's limits (raybatch.spec.loader: file size, aliases, nesting; and
the spec's, raybatch.spec.job: the command, the environment) a file just inside it, which
loads, and files past it (and a file that is not UTF-8), which are refused. Each file is
read in a fresh process (``raybatch.spec.loader.load_job_document``, what ``raybatch
submit`` runs before it contacts any server); the child's peak RSS (ru_maxrss) and the
time of the load are measured, against two baselines in the same run: a bare
``python -c 'import yaml'`` process and one that only imports the loader. Target: every
refusal under 1 s and 200 MB.

    python benchmarks/bench_bad_input.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raybatch.spec.job import MAX_COMMAND_BYTES, MAX_COMMAND_ENV_BYTES  # noqa: E402
from raybatch.spec.loader import MAX_JOB_FILE_BYTES, MAX_YAML_ALIASES, MAX_YAML_DEPTH  # noqa: E402

HEAD = "name: bench\ncommand: echo hi\n"

# the child: load one file (or none: the loader's import alone), print what it saw
# Peak RSS of this process: /proc's VmHWM, not ru_maxrss, which Linux carries over exec from
# the parent (this benchmark, holding a 50 MB file's text, would be every child's peak).
PEAK_RSS = r"""
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
CHILD = PEAK_RSS + r"""
import json, sys, time
outcome, load_s = "-", 0.0
if len(sys.argv) > 1:
    from raybatch.spec.loader import SpecError, load_job_document
    t1 = time.perf_counter()
    try:
        load_job_document(sys.argv[1]); outcome = "loaded"
    except SpecError as e:
        outcome = "refused: " + e.problems[0].split(str(sys.argv[1]) + " ")[-1][:60]
    load_s = time.perf_counter() - t1
print(json.dumps({"outcome": outcome, "load_s": load_s, "rss_mb": peak_rss_mb()}))
"""


def files(d: Path) -> dict[str, bytes]:
    """name -> content: at the limit (loads) and past it (refused)."""
    out: dict[str, bytes] = {}
    pad = MAX_JOB_FILE_BYTES - len(HEAD) - 3
    out["size: at 1 MiB"] = (HEAD + "# " + "x" * pad + "\n").encode()
    out["size: 1 MiB + 1"] = (HEAD + "# " + "x" * (pad + 1) + "\n").encode()
    out["size: 50 MB"] = (HEAD + "# " + "x" * (50 * 10**6) + "\n").encode()
    # the slowest kind of file to parse and validate: 1 MiB of small values (an array job's)
    items = "".join(f"    - v{i:06d}\n" for i in range(MAX_JOB_FILE_BYTES // 14))
    text = "name: bench\ncommand: echo ${{item}}\narray:\n  values:\n" + items
    out["size: 1 MiB of 74k array values"] = text[:text.rindex("\n", 0, MAX_JOB_FILE_BYTES) + 1].encode()
    # an array job over 1000 values, each an alias of the first
    values = "".join("    - *v\n" for _ in range(MAX_YAML_ALIASES - 1))
    array = "name: bench\ncommand: echo ${{item}}\narray:\n  values:\n    - &v 1\n"
    out[f"aliases: {MAX_YAML_ALIASES}"] = f"{array}{values}    - *v\n".encode()
    out[f"aliases: {MAX_YAML_ALIASES + 1}"] = f"{array}{values}    - *v\n    - *v\n".encode()
    lol = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lol += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    out["aliases: billion laughs"] = (HEAD + "x:\n" + "".join(f"  {line}\n" for line in lol)).encode()
    big = "    - &v " + "x" * (512 << 10) + "\n" + "    - *v\n" * 100  # 50 MiB of values once expanded
    out["aliases: 100 x 512 KiB text"] = f"name: bench\ncommand: echo ${{{{item}}}}\narray:\n  values:\n{big}".encode()
    depth = MAX_YAML_DEPTH - 1  # the document's own mapping is one level
    out[f"nesting: {MAX_YAML_DEPTH}"] = f"{HEAD}x: {'[' * depth}{']' * depth}\n".encode()
    out[f"nesting: {MAX_YAML_DEPTH + 1}"] = f"{HEAD}x: {'[' * (depth + 1)}{']' * (depth + 1)}\n".encode()
    out["nesting: 100000"] = f"{HEAD}x: {'[' * 100000}{']' * 100000}\n".encode()
    cmd = "echo " + "x" * (MAX_COMMAND_BYTES - 5)
    out["command: 100 KiB"] = f"name: bench\ncommand: {cmd}\n".encode()
    out["command: 100 KiB + 1"] = f"name: bench\ncommand: {cmd}x\n".encode()
    # the environment: 10 entries of 99 KiB in the file, and aliases of one for 1 MiB + 1
    entry = 99 << 10
    env = "".join(f"  V{i}: {'x' * entry}\n" for i in range(9))
    out["environment: 900 KiB"] = f"{HEAD}environment:\n{env}".encode()
    first = f"  V0: &v {'x' * entry}\n" + "".join(f"  V{i}: *v\n" for i in range(1, 11))
    out["environment: > 1 MiB (aliases)"] = f"{HEAD}environment:\n{first}".encode()
    assert 11 * (entry + 4) > MAX_COMMAND_ENV_BYTES
    out["not UTF-8 (Latin-1)"] = f"{HEAD}environment: {{CITY: Zürich}}\n".encode("latin-1")
    return out


def run_child(arg: list[str], code: str) -> dict:
    """One fresh process: its outcome, load time, peak RSS, and its wall time."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *arg], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    info = json.loads(p.stdout.strip().splitlines()[-1])
    info["wall_s"] = wall
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per file (median shown)")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="raybatch-bench-bad-input-"))
    baseline_code = PEAK_RSS + "import json, yaml; print(json.dumps({'outcome': '-', 'load_s': 0.0, " \
                               "'rss_mb': peak_rss_mb()}))"
    loader_code = "import raybatch.spec.loader\n" + CHILD
    rows = []

    def measure(label: str, arg: list[str], code: str) -> dict:
        runs = [run_child(arg, code) for _ in range(args.runs)]
        row = {"file": label, "outcome": runs[0]["outcome"],
               **{k: statistics.median(r[k] for r in runs) for k in ("load_s", "rss_mb", "wall_s")}}
        rows.append(row)
        return row

    base = measure("baseline: python -c 'import yaml'", [], baseline_code)
    measure("baseline: import the loader", [], loader_code)
    for label, content in files(d).items():
        path = d / (label.replace(" ", "_").replace(":", "").replace("/", "_") + ".yaml")
        path.write_bytes(content)
        measure(f"{label} ({len(content)} B)", [str(path)], CHILD)
        path.unlink()
    print(f"bad-input refusal: {args.runs} fresh process(es) per file, medians; python {sys.version.split()[0]}")
    print(f"  {'file':48s} {'load s':>7s} {'peak RSS MB':>11s} {'x base':>7s} {'proc s':>7s}  outcome")
    for r in rows:
        print(f"  {r['file']:48s} {r['load_s']:7.3f} {r['rss_mb']:11.1f} {r['rss_mb'] / base['rss_mb']:7.2f} "
              f"{r['wall_s']:7.2f}  {r['outcome']}")
    worst_t = max(r["load_s"] for r in rows)
    worst_m = max(r["rss_mb"] for r in rows)
    ok = worst_t < 1 and worst_m < 200
    print(f"worst: load {worst_t:.3f} s, peak RSS {worst_m:.1f} MB -> {'PASS' if ok else 'FAIL'} "
          "(target: every file under 1 s and 200 MB)")
    os.rmdir(d)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
