"""The slots of a sweep's attempt, and the trials that run on them: one Ray actor
(threaded) that the driver feeds with the scheduler's grants and that Tune's trial
proxies call.

A proxy ``register``s its trial (Tune's id and config) and gets the trial's number; the
trial waits in the pool's queue until a slot (``runtime.slots.Slot``: a warm gang) takes
it, runs its command with the trial's parameters, and forwards its metric events, which the
proxy reads with ``events`` (a blocking call: no polling tick on a trial's path) and turns
into ``tune.report``. ``early_stop`` (Tune's scheduler decided, through the driver's
callback) SIGTERMs the trial's process groups: the trial ends EARLY_TERMINATED and its
slot is reused once its processes are gone. A trial whose slot is preempted or whose node
is lost runs again in another slot (its run number goes up, its checkpoint dir stays): Tune
never sees it fail. A trial whose command fails ends failed (only that trial).

Every trial that ends is appended to the sweep's journal (``trials.TrialJournal``) before
the proxy hears of it; a trial the journal has seen end (an earlier attempt) is replayed,
not run again."""

from __future__ import annotations

import collections
import shlex
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import ray
from ray.exceptions import RayError

from raybatch import frameworks
from raybatch.runtime.launch import RankLaunch, UnitPlan, plan_ranks
from raybatch.runtime.protocol import AttemptFile, ItemCounts, Outcome, RankReport, SlotGrant, SlotReport
from raybatch.runtime.slots import Slot, SlotOwner, reruns_free
from raybatch.spec.sweep import PARAM_PLACEHOLDER
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import open_backend
from raybatch.storage.plan import AttemptStorage, past_runs, trial_logs
from raybatch.sweep.space import params_of
from raybatch.sweep.trials import FINAL_STATES, TrialJournal, TrialRecord, trial_id

POOL_NAME = "raybatch-sweep-pool"


class Trial:
    """A trial while this attempt runs it: its record, and its metric events so far."""

    def __init__(self, record: TrialRecord):
        self.record = record
        self.events: list[dict[str, Any]] = list(record.events)
        self.cond = threading.Condition()
        self.stop_reason: Optional[str] = None  # early termination (or limits.timeout) asked
        self.stop_state = "early_terminated"     # ... and the state it then ends in
        self.infra_reruns = 0                   # runs lost to a node or the storage
        self.forwarder: Optional[threading.Thread] = None  # rank 0's metric events -> events

    @property
    def index(self) -> int:
        return self.record.n

    @property
    def key(self) -> str:
        return f"t{self.record.n}"

    @property
    def ended(self) -> bool:
        return self.record.state in FINAL_STATES


@ray.remote(num_cpus=0, max_restarts=0)
class SlotPool(SlotOwner):
    """Created by the driver, on its node (``ready`` hands it the storage credentials: a
    method call's arguments, unlike an actor's, are not kept in Ray's control store)."""

    def __init__(self, attempt_json: str):
        self.info = AttemptFile.model_validate_json(attempt_json)
        self.spec = self.unit_spec = self.info.spec
        self.sweep = self.spec.sweep
        self.framework = frameworks.get(self.spec.framework)
        self.job_id, self.n = self.info.job_id, self.info.attempt
        self.cache_dir = self.info.cache_dir
        self.secret_env: dict[str, str] = {}  # ready() brings them
        self.maximize = self.sweep.objective.goal == "maximize"
        self.primary = self.sweep.objective.primary_metric
        self.stop = threading.Event()
        self.stop_reason: Optional[Outcome] = None
        self.lock = threading.RLock()
        self.queued = threading.Condition(self.lock)  # a trial joined the queue
        self.slots: dict[int, Slot] = {}
        self.gone: dict[int, SlotReport] = {}
        self.trials: dict[int, Trial] = {}
        self.queue: collections.deque[int] = collections.deque()
        self.no_more = False           # Tune has finished: slots with nothing to run go
        self.cancelled: Optional[str] = None  # limits.timeout: every trial not ended ends cancelled
        self.placed = self.running = False
        self.lost_nodes: set[str] = set()
        self.t0 = time.monotonic()

    # ---- the driver's side ------------------------------------------------------------------
    def ready(self, storage: dict[str, Any], secret_env: Optional[dict[str, str]] = None) -> dict[str, Any]:
        """Read the journal (trials ended in earlier attempts) and the runs trials had there.
        What is known; a storage error is raised to the driver (transient or not).
        ``secret_env``: the job's secrets, for every trial's processes."""
        self.storage = AttemptStorage.from_dict(storage)
        self.secret_env = dict(secret_env or {})
        self.journal = TrialJournal(open_backend(self.storage.trials))
        self.ended: dict[int, TrialRecord] = self.journal.records()  # earlier attempts included
        self.by_tune: dict[str, int] = self.journal.ids()
        self.next_n = max([*self.ended, *self.by_tune.values(), -1]) + 1
        self.past_runs = past_runs(open_backend(self.storage.logs), "trials") if self.n > 1 else {}
        starts = [r.started_at for r in self.ended.values() if r.started_at]
        return {"ended": len(self.ended), "first_start": min(starts) if starts else None}

    def apply(self, k: int, grant: SlotGrant) -> None:
        """The scheduler's word on slot k, as the driver read it in control.json."""
        with self.lock:
            self.apply_grant(k, grant)

    def cancel_trials(self, reason: str) -> None:
        """The sweep's limits.timeout: no new trial; queued ones end cancelled now, running
        ones get SIGTERM and their grace period and end cancelled."""
        with self.lock:
            self.no_more, self.cancelled = True, reason
            for trial in self.trials.values():
                if trial.ended or trial.stop_reason is not None:
                    continue
                trial.stop_reason, trial.stop_state = reason, "cancelled"
                if trial.index in self.queue:
                    self.queue.remove(trial.index)
                    self._end(trial, "cancelled", None, reason)
        self.log(reason)
        self._wake_all()

    def stop_with(self, outcome: Outcome) -> None:
        """Stop the attempt (the first reason given is how it ends): every slot's unit stops."""
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason = outcome
            self.stop.set()
        self._wake_all()

    def finish(self, timeout: float) -> list[str]:
        """Tune is done (or the attempt stops): no new trial; every slot drains and gives its
        nodes back. The nodes where a rank was lost."""
        self.no_more = True
        for slot in list(self.slots.values()):
            slot.drain.set()
        for slot in list(self.slots.values()):
            slot.thread.join(timeout=timeout)
            self.lost_nodes |= slot.lost_nodes
        self._wake_all()
        return sorted(self.lost_nodes)

    def status(self) -> dict[str, Any]:
        with self.lock:
            trials = list(self.trials.values())
            slots = self.slot_reports()
            ended = {**self.ended, **{t.index: t.record for t in trials if t.ended}}
            running = sum(1 for t in trials if t.record.state == "running")
            pending = len(self.queue)
            wanted = self._wanted()
        total = self.sweep.total_trials
        counts = ItemCounts(total=total, done=sum(1 for r in ended.values() if r.state == "done"),
                            failed=sum(1 for r in ended.values() if r.state != "done"), running=running)
        best = None
        scored = [r for r in ended.values() if r.best is not None] + \
                 [t.record for t in trials if not t.ended and t.record.best is not None]
        if scored:
            top = max(scored, key=lambda r: r.best) if self.maximize else min(scored, key=lambda r: r.best)
            best = {"trial": trial_id(self.job_id, top.n), "n": top.n, "value": top.best, "params": top.params}
        live = [t.record for t in trials if not t.ended and t.record.state == "running"]
        return {"slots": [s.model_dump(mode="json") for s in slots], "trials": counts.model_dump(),
                "stop": self.stop_reason,
                "wanted": wanted, "best": best, "placed": self.placed, "running": self.running,
                "pending": pending, "lost_nodes": sorted(self.lost_nodes),
                "running_trials": [{k: v for k, v in asdict(r).items() if k != "events"} for r in live]}

    # ---- the trial proxies' side ------------------------------------------------------------
    def register(self, tune_id: str, config: dict[str, Any]) -> int:
        """A trial Tune starts: its number (the same again for a trial Tune restored)."""
        params = params_of(self.sweep, config)
        with self.lock:
            n = self.by_tune.get(tune_id)
            if n is None:
                n = self.by_tune[tune_id] = self.next_n
                self.next_n += 1
                self.journal.started(tune_id, n)
            trial = self.trials.get(n)
            if trial is not None and not trial.ended:
                return n  # the same proxy again (Tune retried the call)
            done = self.ended.get(n)
            if done is not None:  # ended in an earlier attempt: replay what it reported
                self.trials[n] = Trial(done)
                self.log(f"trial {n} ended in attempt {done.attempt} ({done.state}): replayed, not run again")
                return n
            record = TrialRecord(n=n, params=params, tune_id=tune_id, attempt=self.n, runs=self.past_runs.get(n, 0))
            trial = self.trials[n] = Trial(record)
            if self.cancelled is not None:  # Tune started it as the sweep's time ran out
                self._end(trial, "cancelled", None, self.cancelled)
                return n
            self.queue.append(n)
            self.queued.notify()
        return n

    def events(self, n: int, cursor: int, timeout: float) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
        """The trial's metric events past ``cursor`` (waiting up to ``timeout`` for one) and,
        once it has ended and every event is out, how it ended."""
        trial = self.trials[n]
        with trial.cond:
            if len(trial.events) <= cursor and not trial.ended:
                trial.cond.wait(timeout)
            end = None
            if trial.ended:
                r = trial.record
                end = {"state": r.state, "message": r.message, "exit_code": r.exit_code}
            return trial.events[cursor:], end

    def early_stop(self, tune_id: str, reason: str) -> bool:
        """Tune's scheduler stopped this trial: SIGTERM, grace, SIGKILL to its processes."""
        with self.lock:
            n = self.by_tune.get(tune_id)
            trial = self.trials.get(n) if n is not None else None
            if trial is None or trial.ended:
                return False
            trial.stop_reason = reason
            if n in self.queue:  # not started yet: it ends now
                self.queue.remove(n)
                self._end(trial, "early_terminated", None, reason)
        self.log(f"trial {n}: {reason}")
        return True

    # ---- slots.UnitSource --------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[raybatch pool +{time.monotonic() - self.t0:.2f}s] {msg}", flush=True)

    def changed(self) -> None:
        pass  # the driver asks for status() on its own tick

    def check_control(self) -> bool:
        return self.stop.is_set()

    def slot_placed(self, slot: Slot) -> None:
        self.placed = True

    def next_unit(self, slot: Slot, wait: float) -> Optional[Trial]:
        """The next queued trial, as soon as one is (a proxy registers it): a slot never
        polls for its next trial."""
        with self.queued:
            if not self.queue:
                self.queued.wait(wait)
            while self.queue:
                trial = self.trials[self.queue.popleft()]
                if trial.ended:
                    continue
                trial.record.state = "running"
                trial.record.started_at = trial.record.started_at or time.time()
                return trial
        return None

    def _wanted(self) -> int:
        """Slots this sweep can use now: its queued and running trials, and (while Tune may
        still start trials) those it has yet to start; never more than max_concurrent_trials."""
        if self.stop.is_set():
            return 0
        queued = len(self.queue)
        running = sum(1 for t in self.trials.values() if t.record.state == "running")
        wanted = queued + running
        if not self.no_more:
            ended = len({*self.ended, *(t.index for t in self.trials.values() if t.ended)})
            wanted += max(0, self.sweep.total_trials - ended - queued - running)
        return min(self.sweep.limits.max_concurrent_trials, wanted)

    def wants_more(self) -> bool:
        """Is there, or may there come, a trial for one more idle slot?"""
        with self.lock:
            if self.queue:
                return True
            running = sum(1 for t in self.trials.values() if t.record.state == "running")
            return self._wanted() > running

    def runs(self, trial: Trial) -> int:
        return trial.record.runs + 1

    def unit_checkpoints(self, trial: Trial) -> str:
        return f"trials/{trial.index}"

    def unit_timeout(self, trial: Trial) -> tuple[float, str]:
        t = self.sweep.limits.trial_timeout
        return t, f"exceeded limits.trial_timeout ({t:g} s)"

    def unit_stop(self, trial: Trial) -> Optional[Outcome]:
        if trial.stop_reason is not None:
            return Outcome(AttemptOutcome.CANCELLED, None, trial.stop_reason)
        return None

    def plan_unit(self, slot: Slot, trial: Trial, run: int, ports: list[int]) -> list[RankLaunch]:
        """The trial's ranks: the job's, with its parameters, its own logs, checkpoints,
        outputs and copy of the code, and a fresh MASTER_PORT."""
        n, params = trial.index, trial.record.params
        command = PARAM_PLACEHOLDER.sub(lambda m: shlex.quote(str(params[m.group(1)])), self.spec.command)
        spec = self.spec.model_copy(update={"command": command})
        env = {"RAYBATCH_TRIAL_ID": trial_id(self.job_id, n), "RAYBATCH_TRIAL": str(n),
               "RAYBATCH_TRIAL_RUN": str(run)}
        for name, value in params.items():
            env[f"RAYBATCH_PARAM_{name.upper()}"] = env[f"AZUREML_SWEEP_{name}"] = str(value)
        code_dirs = slot.code_dirs
        if code_dirs:  # each trial its own copy: what one writes next to its script, no other sees
            copies = {k: str(Path(slot.dirs.job_temp(k)) / "trials" / str(n) / "code") for k in code_dirs}
            ray.get([slot.gang.first_actors()[k].copy_tree.remote(code_dirs[k], copies[k]) for k in code_dirs])
            code_dirs = copies
        unit = UnitPlan(logs_rel=lambda rank: trial_logs(n, run, rank), checkpoint_rel=f"trials/{n}",
                        output_rel=f"trials/{n}", env=env)
        return plan_ranks(spec, self.framework, self.storage, slot.dirs, job_dir=self.info.job_dir,
                          infos=slot.infos, ports=ports, code_dirs=code_dirs, staged_inputs=slot.staged,
                          gpus_per_rank=slot.gang.per_rank_resources().get("GPU", 0.0), unit=unit)

    def unit_started(self, slot: Slot, trial: Trial, run: int, ranks: list[RankReport]) -> None:
        trial.record.runs = run
        self.running = True
        trial.forwarder = threading.Thread(target=self._forward, args=(trial, slot.gang.actors[0]), daemon=True)
        trial.forwarder.start()

    def _forward(self, trial: Trial, actor: Any) -> None:
        """Rank 0's metric events, into the trial's stream, as they come."""
        cursor = 0
        while True:
            try:
                events, done = ray.get(actor.metric_events.remote(cursor, 30.0))
            except RayError:
                return
            cursor += len(events)
            if events:
                with trial.cond:
                    for e in events:
                        if e["name"] == self.primary:
                            trial.record.note(float(e["value"]), self.maximize)
                    trial.events.extend(events)
                    trial.cond.notify_all()
            if done:
                return

    def unit_ended(self, slot: Slot, trial: Trial, run: int, outcome: Outcome, seconds: float) -> None:
        r = trial.record
        if trial.forwarder is not None:  # the last events (read once the process ended) first
            trial.forwarder.join(timeout=15)
            trial.forwarder = None
        if trial.stop_reason is not None:
            self._end(trial, trial.stop_state, outcome.exit_code, trial.stop_reason)
        elif outcome.succeeded:
            self._end(trial, "done", 0, outcome.message)
        elif self.stop_reason is not None and (outcome is self.stop_reason or outcome.kind in (
                AttemptOutcome.CANCELLED, AttemptOutcome.DRIVER_LOST)):
            r.state = "pending"  # the attempt ends: the trial did not
        elif reruns_free(outcome, trial.infra_reruns, self.spec.retries.infrastructure):
            if not outcome.kind.keeps_place:  # a preempted or evicted trial is never charged
                trial.infra_reruns += 1
            self.log(f"trial {trial.index} run {run}: {outcome.kind.value}: {outcome.message}; it runs again")
            with self.lock:
                r.state = "pending"
                self.queue.appendleft(trial.index)
                self.queued.notify()
        else:  # its own failure, or one infrastructure failure more than retries.infrastructure
            self._end(trial, "failed", outcome.exit_code, f"{outcome.kind.value}: {outcome.message}")

    def _end(self, trial: Trial, state: str, exit_code: Optional[int], message: str) -> None:
        """Journal the trial's end, then tell its proxy: a crash in between replays it."""
        r = trial.record
        r.state, r.exit_code, r.message, r.ended_at = state, exit_code, message, time.time()
        with trial.cond:
            r.events = list(trial.events)
            try:
                self.journal.ended(r)
            except Exception:  # noqa: BLE001 - the trial still ends for Tune
                traceback.print_exc()
            trial.cond.notify_all()
        self.log(f"trial {r.n} {state}" + (f": {message}" if message else "")
                 + (f"; {self.primary} best {r.best:g}" if r.best is not None else ""))

    def _wake_all(self) -> None:
        with self.queued:
            self.queued.notify_all()
        for trial in list(self.trials.values()):
            with trial.cond:
                trial.cond.notify_all()
