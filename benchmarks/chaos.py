"""Benchmark (issue 19): the chaos run. For ``--minutes`` a seeded stream of jobs (the DDP
recipe with checkpoints, the MPI recipe, no-ops, failing, cancelled, and ones writing a
known payload and its sha256 to a blob datastore on Azurite or to the server's disk) runs
on a 3-node local Ray cluster with a real raybatch server, while faults are injected one at
a time: raylet SIGKILL, rank SIGKILL, driver SIGKILL, server ``kill -9`` + restart,
Azurite stop/start, and once a full state disk (a tmpfs; skipped, with the reason, where
it cannot be mounted). Then the invariants are checked; printed: jobs run, faults by kind,
invariants held/broken (with evidence), and the time from each fault to recovery.

The engine is tests/chaos_engine.py (the suite's short run, tests/test_chaos_e2e.py, runs
the same code). Loopback only.

    python benchmarks/chaos.py --seed 1 --minutes 30 --jobs-per-minute 8
    python benchmarks/chaos.py --faults raylet,rank,server,azurite --kinds noop,fail,blob
"""

from __future__ import annotations

import argparse
import sys

from common import ROOT  # noqa: F401  (puts the repository on sys.path)

from tests.chaos_engine import FAULT_KINDS, JOB_KINDS, ChaosConfig, run_chaos


def _kinds(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    got = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in got if k not in allowed]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"--{what}: {', '.join(bad) or 'nothing'} not allowed; "
                                         f"allowed: {', '.join(allowed)}")
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long jobs are submitted (then a drain)")
    ap.add_argument("--jobs-per-minute", type=float, default=6.0)
    ap.add_argument("--faults", default=",".join(FAULT_KINDS), help=f"fault kinds ({', '.join(FAULT_KINDS)})")
    ap.add_argument("--kinds", default=",".join(JOB_KINDS), help=f"job kinds ({', '.join(JOB_KINDS)})")
    ap.add_argument("--fault-every", type=float, default=30.0,
                    help="mean seconds between one fault's recovery and the next fault")
    ap.add_argument("--drain", type=float, default=300.0, help="seconds the jobs get to end after the stream")
    args = ap.parse_args(argv)
    try:
        faults = _kinds(args.faults, FAULT_KINDS, "faults")
        kinds = _kinds(args.kinds, JOB_KINDS, "kinds")
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    cfg = ChaosConfig(seed=args.seed, minutes=args.minutes, jobs_per_minute=args.jobs_per_minute,
                      faults=tuple(faults), fault_every_s=args.fault_every, drain_s=args.drain,
                      log=lambda m: print(m, flush=True))
    cfg.kinds = {k: w for k, w in cfg.kinds.items() if k in kinds}
    report = run_chaos(cfg)
    print(report.table(), flush=True)
    return 1 if report.broken else 0


if __name__ == "__main__":
    sys.exit(main())
