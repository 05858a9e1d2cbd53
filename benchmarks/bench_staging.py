"""Benchmark: staging a ``download`` input from Azure Blob (the Azurite emulator)
through raybatch's node cache, against a plain azure-storage-blob download of the
same blobs, in the same run, order alternating between repeats.

    python benchmarks/bench_staging.py [--mb 500] [--files 20] [--repeats 3]

The input is ``--files`` blobs, ``--mb`` MiB in all: a fifth of them large (80% of
the bytes), the rest small. Per repeat:

- plain SDK: ``BlobServiceClient.from_connection_string``, list the blobs, and
  ``download_blob(max_concurrency=4).readinto(file)`` each on 8 threads (the
  parallelism raybatch uses) into a fresh folder;
- raybatch cold: ``InputCache(<fresh cache>).stage(open_backend(access))``, exactly
  what a job's rank actor runs on its node before the user's process starts;
- raybatch warm: ``stage`` again on the same cache (a second job on the same node).

Each job's rank actor is a fresh process, so raybatch's per-process client cache is
emptied before each stage; the plain SDK builds its client inside its timing too. A
sequential plain-SDK download (one blob at a time) is measured once, for context."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, figure  # noqa: F401 - ROOT: puts the repo on sys.path

from raybatch.storage import backends
from raybatch.storage.backends import open_backend
from raybatch.storage.datastores import Access
from raybatch.storage.staging import InputCache
from tests.azurite import AZURITE_DIR, Azurite

MIB = 2**20
CONTAINER = "bench"
PREFIX = "datasets/staging"
THREADS = backends.TRANSFER_THREADS             # 8
PER_BLOB = backends.PER_BLOB_CONCURRENCY        # 4


def large_count(files: int) -> int:
    return files if files <= 1 else max(1, files // 5)


def blob_sizes(total: int, files: int) -> list[int]:
    """A few large blobs (first) holding 80% of ``total``, the rest small and uneven."""
    if files <= 1:
        return [total]
    n_large = large_count(files)
    n_small = files - n_large
    large = int(total * 0.8) // n_large
    weights = [1 + i % 4 for i in range(n_small)]   # 1, 2, 3, 4, 1, 2, ... parts
    rest = total - large * n_large
    small = [rest * w // sum(weights) for w in weights]
    small[-1] += rest - sum(small)
    return [large] * n_large + small


def upload_input(azurite: Azurite, sizes: list[int]) -> dict[str, int]:
    """Upload the blobs; each has its own header before a shared random block, so
    no two have the same content (the cache would download duplicates once)."""
    container = azurite.create_container(CONTAINER)
    block = os.urandom(MIB)
    names: dict[str, int] = {}
    n_large = large_count(len(sizes))
    for i, size in enumerate(sizes):
        rel = f"shards/train-{i:02d}.bin" if i < n_large else f"meta/part-{i - n_large:03d}.bin"
        head = f"raybatch bench_staging blob {i} of {len(sizes)}\n".encode()
        data = (head + block * (size // MIB + 1))[:size]
        container.upload_blob(f"{PREFIX}/{rel}", data, overwrite=True, max_concurrency=PER_BLOB)
        names[rel] = size
    return names


# ---- the two ways -------------------------------------------------------------------------
def plain_sdk(azurite: Azurite, dest: Path, threads: int) -> tuple[float, int]:
    from azure.storage.blob import BlobServiceClient

    t0 = time.monotonic()
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(CONTAINER)
    blobs = [b.name for b in container.list_blobs(name_starts_with=PREFIX + "/")]

    def fetch(name: str) -> int:
        target = dest / name[len(PREFIX) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            return container.get_blob_client(name).download_blob(max_concurrency=PER_BLOB).readinto(f)

    if threads > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(blobs))) as pool:
            got = sum(pool.map(fetch, blobs))
    else:
        got = sum(fetch(name) for name in blobs)
    return time.monotonic() - t0, got


def access_for(azurite: Azurite) -> Access:
    return Access(kind="blob", path=PREFIX, container=CONTAINER, account=azurite.account_name,
                  endpoint=azurite.endpoint, credential_kind="account_key", secret=azurite.account_key,
                  uri=f"az://{azurite.account_name}/{CONTAINER}/{PREFIX}")


def raybatch_stage(azurite: Azurite, cache: Path):
    backends._clients.clear()  # a job's rank actor is a fresh process: no cached client
    t0 = time.monotonic()
    res = InputCache(cache).stage(open_backend(access_for(azurite)), lambda done, total: None)
    return time.monotonic() - t0, res


# ---- the run ------------------------------------------------------------------------------
def warm_up(azurite: Azurite, names: dict[str, int], work: Path) -> None:
    """Both code paths once on the smallest blob (imports, first connections); untimed."""
    from azure.storage.blob import BlobServiceClient

    rel = min(names, key=names.get)
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(CONTAINER)
    with open(work / "warm-sdk", "wb") as f:
        container.get_blob_client(f"{PREFIX}/{rel}").download_blob(max_concurrency=PER_BLOB).readinto(f)
    backend = open_backend(access_for(azurite))
    backend.list()
    backend.download(rel, work / "warm-rb", lambda n: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=500, help="input size in MiB (default 500)")
    ap.add_argument("--files", type=int, default=20, help="number of blobs (default 20)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("$ python " + shlex.join(sys.argv))

    total = int(args.mb * MIB)
    sizes = blob_sizes(total, args.files)
    base = Path(tempfile.mkdtemp(prefix="raybatch-bench-staging-"))
    azurite = Azurite(base / "azurite")
    try:
        azurite.start()
        t0 = time.monotonic()
        names = upload_input(azurite, sizes)
        upload_s = time.monotonic() - t0
        assert sum(names.values()) == total
        work = base / "work"
        work.mkdir()
        warm_up(azurite, names, work)

        sdk, cold, warm = [], [], []

        def do_sdk(run: Path) -> None:
            s, got = plain_sdk(azurite, run / "sdk", THREADS)
            assert got == total, (got, total)
            sdk.append(s)

        def do_raybatch(run: Path) -> None:
            s, res = raybatch_stage(azurite, run / "cache")
            assert res.files == len(names) and res.bytes_downloaded == total, res
            cold.append(s)
            s, res = raybatch_stage(azurite, run / "cache")  # the next job on this node
            assert res.bytes_downloaded == 0 and res.bytes_total == total, res
            warm.append(s)

        for r in range(args.repeats):
            run = work / f"r{r}"
            for step in ((do_sdk, do_raybatch) if r % 2 == 0 else (do_raybatch, do_sdk)):
                step(run)
            shutil.rmtree(run)

        seq_s, got = plain_sdk(azurite, work / "seq", threads=1)
        assert got == total, (got, total)
        shutil.rmtree(work / "seq")
    finally:
        azurite.close()
        shutil.rmtree(base, ignore_errors=True)

    version = json.loads((AZURITE_DIR / "azurite" / "package.json").read_text()).get("version", "?")
    n_large = large_count(len(sizes))
    small = sizes[n_large:]
    mib = total / MIB
    print(f"input: {len(sizes)} blobs, {mib:.1f} MiB ({n_large} x {sizes[0] / MIB:.1f} MiB"
          + (f", {len(small)} from {min(small) / MIB:.2f} to {max(small) / MIB:.2f} MiB" if small else "")
          + f"); Azurite {version} on 127.0.0.1 (upload took {upload_s:.1f} s); "
          f"{args.repeats} repeats, order alternating; {THREADS} blobs at once x {PER_BLOB} ranged GETs each")

    def row(label: str, values: list[float]) -> str:
        return f"{figure(label, values, width=40):80s}{mib / statistics.median(values):8.1f} MiB/s"

    ratio = [(mib / c) / (mib / s) for c, s in zip(cold, sdk)]      # throughput, paired per repeat
    warm_cold = [w / c for w, c in zip(warm, cold)]
    r_med = statistics.median(ratio)
    label_seq = "plain SDK, sequential (1 run, context)"
    print(row(f"plain SDK, {THREADS} threads", sdk))
    print(row("raybatch cold (InputCache.stage)", cold))
    print(f"  {'raybatch warm (2nd job, same node)':40s} median {statistics.median(warm) * 1000:.1f} ms  "
          f"(min {min(warm) * 1000:.1f}, max {max(warm) * 1000:.1f})")
    print(f"{'  ' + f'{label_seq:40s} {seq_s:.2f} s':80s}{mib / seq_s:8.1f} MiB/s")
    print(figure("ratio raybatch cold / SDK throughput", ratio, "x", width=40)
          + f"  target >= 0.9x: {'met' if r_med >= 0.9 else 'NOT met'}")
    print(f"  {'raybatch warm / cold time':40s} median {statistics.median(warm_cold):.4f} x  "
          f"(warm median {statistics.median(warm) * 1000:.1f} ms)  target: near zero")


if __name__ == "__main__":
    main()
