"""Benchmark (not a speed figure): how many of Microsoft's published Batch AI recipes
convert to raybatch jobs as they are.

    python benchmarks/bench_batchai_recipes.py --repo <a checkout of Azure/BatchAI>

Finds ``recipes/**/job*.json`` in the checkout (17 job files: the Keras recipe has two)
and loads each exactly as ``raybatch submit`` / ``raybatch convert`` would, the way the
recipes' instructions have a user submit them: with ``--mount-root`` (where `raybatch
node-setup` mounts the cluster's file systems, /mnt/raybatch) and the storage account
named in ``AZURE_BATCHAI_STORAGE_ACCOUNT`` (which the az CLI put in place of the recipes'
``<AZURE_BATCHAI_STORAGE_ACCOUNT>``). The job file is not edited. Prints ``converted
N/M`` and, for each file that does not convert, its first error.

The repository may also be a bare git directory (the search tools' fetched mirror):
the job files are then read from its HEAD."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raybatch.contract import NODE_MOUNT_ROOT  # noqa: E402
from raybatch.errors import SpecError  # noqa: E402
from raybatch.spec.loader import load_job_document  # noqa: E402


def job_files(repo: Path, into: Path) -> list[tuple[str, Path]]:
    """(name in the repository, readable path) of every recipe job file."""
    if (repo / "recipes").is_dir():
        return [(str(p.relative_to(repo)), p) for p in sorted((repo / "recipes").glob("**/job*.json"))]
    names = subprocess.run(["git", "--git-dir", str(repo), "ls-tree", "-r", "--name-only", "HEAD", "recipes"],
                           check=True, capture_output=True, text=True).stdout.split()
    out = []
    for name in sorted(n for n in names if Path(n).name.startswith("job") and n.endswith(".json")):
        dest = into / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{name}"], check=True,
                                        capture_output=True).stdout)
        out.append((name, dest))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="a checkout (or bare git directory) of Azure/BatchAI")
    ap.add_argument("--mount-root", default=NODE_MOUNT_ROOT, help="as `raybatch submit --mount-root`")
    ap.add_argument("--storage-account", default="mystorageaccount",
                    help="AZURE_BATCHAI_STORAGE_ACCOUNT, as the recipes' instructions have it set")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each job's framework, image and command")
    args = ap.parse_args()
    os.environ.setdefault("AZURE_BATCHAI_STORAGE_ACCOUNT", args.storage_account)
    with tempfile.TemporaryDirectory() as tmp:
        files = job_files(args.repo, Path(tmp))
        if not files:
            print(f"no recipes/**/job*.json under {args.repo}", file=sys.stderr)
            return 2
        ok = 0
        for name, path in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    spec, notes = load_job_document(path, (), args.mount_root)
            except SpecError as e:
                print(f"FAILED     {name}: {e.problems[0]}")
                continue
            ok += 1
            print(f"converted  {name}: {spec.framework}, {spec.nodes} node(s) x {spec.processes_per_node}"
                  + (f", image {spec.image}" if spec.image else "") + f", {len(notes)} warning(s)")
            if args.verbose:
                print(f"           command: {spec.command}")
    print(f"converted {ok}/{len(files)}")
    return 0 if ok == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
