"""The driver of a sweep's attempt (its Ray Job's entrypoint):
``python -m raybatch.sweep.driver ATTEMPT_JSON``.

1. check the storage; start the slot pool (``pool.SlotPool``, an actor) and hand it the
   slots the scheduler has granted, so they start before Ray Tune is even imported;
2. run ``Tuner`` (``reuse_actors=True``, no loggers, ``verbose=0``) over thin trial
   proxies (``proxy.trial_proxy``): each holds one unit of ``raybatch_trial`` (a custom
   resource of the head node, which the scheduler's policy ignores), registers its trial with
   the pool and turns the trial's metric events into ``tune.report``. A callback tells the
   pool at once when Tune's scheduler stops a trial early; a stopper ends ``fit`` when the
   attempt must stop;
3. meanwhile, every tick: the scheduler's grants and revocations (``control.json``) to
   the pool, the pool's state (slots, trials, the best one, how many slots it can still
   use) to ``status.json``;
4. after a lost driver, the next attempt restores Tune's experiment
   (``Tuner.restore(..., resume_unfinished=True)``, the searcher included) from
   ``<state>/attempts/<job>/tune``; the pool replays trials the journal saw end."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raybatch.runtime.driver import Attempt, main
from raybatch.runtime.gang import cause_of
from raybatch.runtime.protocol import ItemCounts, Outcome, Phase, SlotReport
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import StorageError
from raybatch.sweep.pool import POOL_NAME, SlotPool

TICK_S = 0.5  # control file in, report out: the scheduler's own period
TRIAL_RESOURCE = "raybatch_trial"  # the head node declares 1000 units; one per trial proxy
EXPERIMENT = "sweep"


class SweepAttempt(Attempt):
    def __init__(self, attempt_file: str):
        super().__init__(attempt_file)
        self.sweep = self.spec.sweep
        self.pool: Any = None
        self.phase = Phase.PLACING
        self.sent: dict[int, tuple[str, bool]] = {}  # the slot states handed to the pool
        self.stop_sent = False  # the pool knows the attempt stops
        self.status: dict[str, Any] = {}
        self.sweep_start = time.time()  # the first trial's start, when an earlier attempt ran one
        self.over: Optional[str] = None  # limits.timeout reached: Tune stops, the trials are cancelled
        self._report_lock = threading.Lock()
        self._final = False  # DONE is reported: a late tick must not write over it

    # ---- control and reports --------------------------------------------------------------
    def check_control(self) -> bool:
        control = self.files.read_control()
        if control is not None and self.pool is not None:
            for k, grant in sorted(control.slots.items()):
                state = (grant.state, grant.preempt)
                if self.sent.get(k) == state:
                    continue
                self.sent[k] = state
                self.pool.apply.remote(k, grant)
        stop = control.requested_stop() if control is not None else None
        if stop is not None:
            self.stop_with(stop)
        if self.stop_reason is not None and self.pool is not None and not self.stop_sent:
            self.stop_sent = True  # (not from stop_with: a signal handler must not call Ray)
            self.pool.stop_with.remote(self.stop_reason)
        return self.stop.is_set()

    def report(self, phase: Optional[Phase] = None, **extra: Any) -> None:  # type: ignore[override]
        with self._report_lock:
            if self._final:
                return
            self._final = phase is Phase.DONE
            self._report(phase, **extra)

    def _report(self, phase: Optional[Phase], **extra: Any) -> None:
        st = self.status
        if st.get("running"):
            self.phase = Phase.RUNNING
        elif st.get("placed") and self.phase is Phase.PLACING:
            self.phase = Phase.PLACED
        fields: dict[str, Any] = {}
        if st:
            fields = {"slots": [SlotReport.model_validate(s) for s in st["slots"]],
                      "trials": ItemCounts.model_validate(st["trials"]), "best": st["best"],
                      "running_trials": st.get("running_trials", []),
                      "slots_wanted": 0 if self.stop.is_set() else st["wanted"]}
        super().report(phase or self.phase, **{**fields, **extra})

    def check_limits(self) -> None:
        """The pool stopped the attempt (a slot could not be set up); the job's
        max_wall_clock (this attempt) and the sweep's limits.timeout (since its first trial)."""
        stop = self.status.get("stop") or self.past_wall_clock()
        if stop is not None:
            self.stop_with(stop)
        limit = self.sweep.limits.timeout
        if limit and self.over is None and time.time() > self.sweep_start + limit:
            self.over = f"limits.timeout ({limit:g} s) reached: the sweep ends, its unfinished trials are cancelled"
            self.pool.cancel_trials.remote(self.over)

    def tick(self) -> None:
        """The control file to the pool, the pool's state to the report; until the end."""
        while not self._done.is_set():
            try:
                self.check_control()
                self.status = ray.get(self.pool.status.remote(), timeout=30)
                self.check_limits()
                self.report()
            except Exception:  # noqa: BLE001 - a missed tick is retried
                traceback.print_exc()
            self._done.wait(TICK_S)

    # ---- the attempt ----------------------------------------------------------------------
    def tune_dir(self) -> Path:
        return Path(self.info.control_dir).parent / "tune"

    def fit(self) -> None:
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # the experiment state, for a restore (the journal has every trial that ended since)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is quiet only with the classic output
        # trials report to raybatch's metric store, not to Tune's result files: its result
        # analysis finds none to read; a resumed trial's steps are reported again (optuna notes it)
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="The reported value is ignored because this")
        from ray import tune  # noqa: PLC0415

        from raybatch.sweep import space  # noqa: PLC0415
        from raybatch.sweep.policies import tune_scheduler  # noqa: PLC0415

        sweep = self.sweep
        metric, mode = sweep.objective.primary_metric, "max" if sweep.objective.goal == "maximize" else "min"
        from raybatch.sweep import proxy  # noqa: PLC0415

        proxy.ATTEMPT = self  # Tune pickles its stopper and callback: they find the attempt here
        policy = sweep.early_termination.type if sweep.early_termination else "Tune"
        trainable = tune.with_resources(
            tune.with_parameters(proxy.trial_proxy, pool_name=POOL_NAME, namespace=self.namespace, primary=metric),
            {"cpu": 0, TRIAL_RESOURCE: 1})
        run_config = tune.RunConfig(name=EXPERIMENT, storage_path=str(self.tune_dir()), verbose=0,
                                    stop=proxy.Stop(), callbacks=[proxy.EarlyStop(policy)],
                                    failure_config=tune.FailureConfig(max_failures=0))
        path = str(self.tune_dir() / EXPERIMENT)
        if self.n > 1 and tune.Tuner.can_restore(path):
            self.log(f"restoring the sweep's Tune experiment from {path} (unfinished trials resume)")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space.tune_space(sweep),
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, search_alg=space.search_alg(sweep, self.tune_concurrency()),
                    scheduler=tune_scheduler(sweep.early_termination, metric, mode),
                    num_samples=space.num_samples(sweep), reuse_actors=True),
                run_config=run_config)
        tuner.fit()

    def tune_concurrency(self) -> int:
        """Trials Tune keeps going at once: for random and grid sampling, one more per slot
        than the slots can run, so that the next trial is already waiting in the pool when a
        slot frees (Tune's own loop is then off the trial's path); the slots still run at
        most max_concurrent_trials. A bayesian searcher suggests with what has ended."""
        n = self.sweep.limits.max_concurrent_trials
        return n if self.sweep.sampling_algorithm.type == "bayesian" else 2 * n

    def run(self) -> int:
        self._done = threading.Event()
        self.namespace = f"raybatch-{self.job_id}-{self.n}"
        self.connect("sweep ", namespace=self.namespace)
        outcome: Optional[Outcome] = None
        ticker = None
        try:
            outcome = self.check_storage()
            if outcome is None and not ray.cluster_resources().get("raybatch_trial"):
                outcome = Outcome(AttemptOutcome.START_FAILED, None,
                                  "the Ray cluster declares no raybatch_trial resource: start its head node with "
                                  "--resources '{\"raybatch_trial\": 1000}' (raybatch up and raybatch's cluster "
                                  "configs do)")
            if outcome is None:
                # a thread per call: each running trial's proxy waits in one, the driver's ticks in others
                threads = 2 * self.sweep.limits.max_concurrent_trials + 32
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self.pool = SlotPool.options(name=POOL_NAME, max_concurrency=threads,
                                             scheduling_strategy=here).remote(self.info.model_dump_json())
                known = ray.get(self.pool.ready.remote(self.storage.to_dict(secrets=True), self.secret_env))
                self.sweep_start = min(self.sweep_start, known["first_start"] or self.sweep_start)
                self.check_control()  # the slots granted so far start now, before Tune is imported
                self.log(f"slot pool up ({known['ended']} trial(s) ended in earlier attempts)")
                ticker = threading.Thread(target=self.tick, name="tick", daemon=True)
                ticker.start()
                self.fit()
                if self.stop_reason is None:  # the trials cancelled by limits.timeout end first
                    self.lost_nodes |= set(ray.get(self.pool.finish.remote(self.spec.grace_period + 60)))
                outcome = self.stop_reason or self.result()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            cause = cause_of(e) if isinstance(e, RayError) else e
            if isinstance(cause, StorageError) and cause.transient:  # reading the journal, the logs
                kind = AttemptOutcome.STORAGE_UNAVAILABLE
            else:
                kind = AttemptOutcome.START_FAILED if not self.status.get("running") else AttemptOutcome.DRIVER_LOST
            outcome = self.stop_reason or Outcome(kind, None, f"driver error: {type(cause).__name__}: {cause}")
        finally:
            try:
                if self.pool is not None:
                    if outcome is not None and not outcome.succeeded:
                        ray.get(self.pool.stop_with.remote(outcome))
                    self.report(Phase.STOPPING, reason=outcome.message if outcome else "done")
                    self.lost_nodes |= set(ray.get(self.pool.finish.remote(self.spec.grace_period + 60)))
                    self.status = ray.get(self.pool.status.remote())
            except Exception:  # noqa: BLE001 - still report
                traceback.print_exc()
            self._done.set()
            if ticker is not None:
                ticker.join(timeout=5)
        assert outcome is not None
        return self.ended(outcome)

    def result(self) -> Outcome:
        """The sweep's outcome from its trials: it succeeds when one trial did."""
        st = ray.get(self.pool.status.remote())
        self.status = st
        c = ItemCounts.model_validate(st["trials"])
        best = st.get("best")
        note = f"{c.done + c.failed} trial(s): {c.done} done, {c.failed} failed, stopped early or cancelled"
        if best:
            note += f"; best {best['trial']} {self.sweep.objective.primary_metric}={best['value']:g}"
        if self.over:
            note = f"{self.over}; {note}"
        if c.done:
            return Outcome(AttemptOutcome.SUCCEEDED, 0, note)
        if self.over:
            return Outcome(AttemptOutcome.TIMEOUT, None, "no trial finished before " + note)
        return Outcome(AttemptOutcome.USER_ERROR, 1, "no trial finished; " + note)


if __name__ == "__main__":
    sys.exit(main(SweepAttempt, "raybatch.sweep.driver", sys.argv[1:]))
