"""Benchmark: a sweep of N trials of S seconds each (sleep, then print a metric), 2 slots of
1 CPU on the embedded local default's 2 nodes, interleaved in one run:

- raybatch: a sweep job (submit -> SUCCEEDED), each trial an unmodified command in its own
  process (`sleep S; echo RAYBATCH_METRIC m=1`);
- raw Ray Tune with ``Tuner`` defaults (a placement group and a worker per trial), a function
  trainable doing the same in-process (sleep, ``tune.report``), 1 CPU per trial;
- raw Ray Tune with ``reuse_actors=True``.

The ideal is N x S / 2. Prints each wall time, its ratio to the ideal, raybatch against both
raw Tune runs, and raybatch's fixed start (submit -> its first trial starts) apart from its
per-trial overhead ((wall - fixed - ideal) / (N / 2)).

    python benchmarks/bench_sweep.py [--trials 100] [--seconds 1] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import time

from common import figure, local_default

from raybatch import Client
from raybatch.config import ray_client_env


def via_raybatch(client: Client, trials: int, seconds: float) -> tuple[float, float]:
    t0 = time.time()
    job = client.submit({
        "name": "bench-sweep", "experiment": "bench", "resources": {"cpus": 1},
        "command": f"sleep {seconds}; echo RAYBATCH_METRIC m=${{{{search_space.x}}}}",
        "sweep": {"search_space": {"x": {"type": "uniform", "min_value": 0, "max_value": 1}},
                  "objective": {"primary_metric": "m", "goal": "maximize"},
                  "limits": {"max_total_trials": trials, "max_concurrent_trials": 2}}})
    done = client.wait(job.id, poll=0.2)
    wall = time.time() - t0
    assert done.state == "SUCCEEDED", done.reason
    started = [t.started_at for t in client.trials(job.id) if t.started_at]
    return wall, min(started) - t0


def via_tune(trials: int, seconds: float, reuse: bool) -> float:
    from ray import tune

    def trainable(config):
        time.sleep(seconds)
        tune.report({"m": config["x"]})

    t0 = time.monotonic()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"x": tune.uniform(0, 1)},
                       tune_config=tune.TuneConfig(num_samples=trials, metric="m", mode="max", reuse_actors=reuse),
                       run_config=tune.RunConfig(verbose=0, storage_path=os.path.abspath("/tmp/raybatch-bench-tune")))
    tuner.fit()
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    ideal = args.trials * args.seconds / 2
    with local_default(nodes=2) as (info, client):
        ray_client_env()
        import ray

        ray.init(address=info["ray_address"], logging_level="WARNING", log_to_driver=False)
        via_raybatch(client, 4, 0.1), via_tune(4, 0.1, True)  # warm-up
        rb, fixed, default, reuse = [], [], [], []
        for _ in range(args.runs):
            wall, start = via_raybatch(client, args.trials, args.seconds)
            rb.append(wall)
            fixed.append(start)
            default.append(via_tune(args.trials, args.seconds, reuse=False))
            reuse.append(via_tune(args.trials, args.seconds, reuse=True))
        per_trial = [(w - f - ideal) / (args.trials / 2) for w, f in zip(rb, fixed)]
        print(f"{args.trials} trials of {args.seconds:g} s, 2 slots of 1 CPU, ideal {ideal:.0f} s, "
              f"{args.runs} interleaved run(s)")
        print(figure("raybatch sweep", rb))
        print(figure("raw Tune, defaults", default))
        print(figure("raw Tune, reuse_actors", reuse))
        print(figure("raybatch / ideal", [w / ideal for w in rb], "x") + "  target <= 1.3x")
        print(figure("raybatch / Tune defaults", [a / b for a, b in zip(rb, default)], "x") + "  target <= 0.5x")
        print(figure("raybatch / Tune reuse", [a / b for a, b in zip(rb, reuse)], "x") + "  target <= 1.2x")
        print(figure("Tune defaults / ideal", [w / ideal for w in default], "x"))
        print(figure("Tune reuse / ideal", [w / ideal for w in reuse], "x"))
        print(figure("raybatch fixed start", fixed) + "  (submit -> first trial starts)")
        print(figure("raybatch per trial", per_trial) + "  goal <= 0.15 s")
        ray.shutdown()  # before the local default goes down


if __name__ == "__main__":
    main()
