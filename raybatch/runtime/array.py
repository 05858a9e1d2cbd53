"""The driver of an array job's attempt (its Ray Job's entrypoint):
``python -m raybatch.runtime.array ATTEMPT_JSON``.

1. check the storage (the listing's location too) and freeze the listing into
   ``items/manifest.jsonl`` (a retry, or ``resume_from``, reuses the frozen one); tasks
   already recorded done in ``items/<task>.json`` are skipped;
2. serve: every slot the scheduler grants (``control.json``) becomes a warm gang
   (``slots.Slot``) that takes one task after another from the ``Dispatcher``; a slot it
   revokes drains (preempted: its task gets SIGTERM and its grace period and runs again
   in another slot). The report says how many slots the driver can still use;
3. a task is done once its command exited 0 and its outputs are out; a failing task
   runs again up to ``array.retries`` times; more failed items than
   ``array.error_threshold`` fail the attempt;
4. when every task has ended (or the attempt is stopped), the slots are released and
   DONE is reported."""

from __future__ import annotations

import collections
import shlex
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import ray
from ray.exceptions import RayActorError

from raybatch.runtime.driver import Attempt, main
from raybatch.runtime.items import ItemStore, Record, Task, list_items, tasks_of
from raybatch.runtime.launch import RankLaunch, UnitPlan, plan_ranks
from raybatch.runtime.protocol import Control, ItemCounts, Outcome, Phase, SlotReport
from raybatch.runtime.slots import Slot, SlotOwner, reruns_free
from raybatch.spec.job import ITEM_PLACEHOLDER
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import StorageError, open_backend
from raybatch.storage.plan import item_logs, past_runs

TICK_S = 0.25          # the serving loop's period: control file, reports
REPORT_EVERY_S = 2.0   # a report at least this often (progress, rate)
RATE_WINDOW_S = 60.0

# how a task's run ended -> what happens to the task (slots.reruns_free: it runs again, free)
_STOPPED = (AttemptOutcome.CANCELLED, AttemptOutcome.DRIVER_LOST)


class Dispatcher:
    """Which task runs next: each task is handed to one slot at a time, a task whose
    slot was taken back goes to the front, a failed one to the back."""

    def __init__(self, tasks: list[Task], done: set[int], skipped: set[int], retries: int,
                 past_runs: Optional[dict[int, int]] = None):
        self.lock = threading.Lock()
        self.tasks = {t.index: t for t in tasks}
        self.total = len(tasks)
        self.retries = retries
        self.done = set(done)
        self.skipped = set(skipped) - self.done
        self.failed: dict[int, Record] = {}
        self.running: dict[int, int] = {}  # task -> slot
        self.pending = collections.deque(t.index for t in tasks if t.index not in self.done | self.skipped)
        self._runs: dict[int, int] = collections.Counter(past_runs or {})  # earlier attempts' runs too
        self.failures: dict[int, int] = collections.Counter()
        self.infra_reruns: dict[int, int] = collections.Counter()  # lost node, storage out
        self.finished_at: collections.deque[float] = collections.deque()

    def take(self, slot: int) -> Optional[Task]:
        with self.lock:
            if not self.pending:
                return None
            index = self.pending.popleft()
            self.running[index] = slot
            self._runs[index] += 1
            return self.tasks[index]

    def peek(self) -> Optional[Task]:
        with self.lock:
            return self.tasks[self.pending[0]] if self.pending else None

    def runs(self, task: int) -> int:
        """Runs of the task started so far, the current one included."""
        with self.lock:
            return self._runs[task] - 1

    def more_for_slots(self, _live: int) -> bool:
        with self.lock:
            return bool(self.pending)

    def requeue(self, task: int, front: bool) -> None:
        with self.lock:
            self.running.pop(task, None)
            (self.pending.appendleft if front else self.pending.append)(task)

    def release(self, task: int) -> None:
        """The attempt stops: the task is neither done nor failed."""
        with self.lock:
            self.running.pop(task, None)

    def finish(self, task: int, record: Record) -> None:
        with self.lock:
            self.running.pop(task, None)
            if record.state == "done":
                self.done.add(task)
                self.failed.pop(task, None)
            else:
                self.failed[task] = record
            self.finished_at.append(time.monotonic())

    def failed_items(self) -> int:
        with self.lock:
            return sum(len(self.tasks[t].items) for t in self.failed)

    @property
    def complete(self) -> bool:
        with self.lock:
            return not self.pending and not self.running

    def wanted(self, max_concurrent: int) -> int:
        with self.lock:
            return min(max_concurrent, len(self.pending) + len(self.running))

    def counts(self) -> ItemCounts:
        with self.lock:
            now = time.monotonic()
            while self.finished_at and now - self.finished_at[0] > RATE_WINDOW_S:
                self.finished_at.popleft()
            recent = len(self.finished_at)
            window = min(RATE_WINDOW_S, max(1.0, now - (self.finished_at[0] if recent else now)))
            rate = recent / window if recent else 0.0
            left = len(self.pending) + len(self.running)
            return ItemCounts(total=self.total, done=len(self.done), failed=len(self.failed),
                              running=len(self.running), skipped=len(self.skipped), rate=round(rate, 3),
                              eta_s=round(left / rate, 1) if rate > 0 and left else None)


class ArrayAttempt(Attempt, SlotOwner):
    def __init__(self, attempt_file: str):
        super().__init__(attempt_file)
        self.unit_spec = self.spec
        self.slots: dict[int, Slot] = {}
        self.gone: dict[int, SlotReport] = {}  # slots revoked before they started
        self.dispatcher: Optional[Dispatcher] = None
        self.items: Optional[ItemStore] = None
        self.phase = Phase.PLACING
        self._wake = threading.Event()
        self._lock = threading.Lock()

    # ---- events from the slots' threads -------------------------------------------------
    def changed(self) -> None:
        self._wake.set()

    def live_slots(self) -> int:
        return sum(1 for s in list(self.slots.values()) if s.state not in ("released", "lost"))

    def slot_placed(self, slot: Slot) -> None:
        if self.phase is Phase.PLACING:
            self.phase = Phase.PLACED
        self.changed()

    # ---- the units of its slots: tasks (slots.UnitSource) ----------------------------------
    def next_unit(self, slot: Slot, wait: float) -> Optional[Task]:
        assert self.dispatcher is not None
        task = self.dispatcher.take(slot.index)
        if task is None:  # only a task a failing slot gives back can come: no need to be quick
            time.sleep(wait)
        return task

    def wants_more(self) -> bool:
        assert self.dispatcher is not None
        return self.dispatcher.more_for_slots(self.live_slots())

    def runs(self, task: Task) -> int:
        """This run's number (1 for the task's first)."""
        assert self.dispatcher is not None
        return self.dispatcher.runs(task.index) + 1

    def unit_checkpoints(self, task: Task) -> str:
        return f"items/{task.index}"

    def unit_timeout(self, task: Task) -> tuple[float, str]:
        t = self.spec.array.item_timeout
        return t, f"exceeded array.item_timeout ({t:g} s)"

    def unit_stop(self, task: Task) -> Optional[Outcome]:
        return None

    def item_values(self, slot: Slot, task: Task) -> dict[int, list[str]]:
        """Node rank -> what each item of the task is on that node: a staged local path
        (``download``), the path or URL (``direct``), the value or the index."""
        array, st = self.spec.array, self.storage
        if array.over is None:
            return {k: [i.value for i in task.items] for k in range(self.spec.nodes)}
        if array.item_mode == "direct":
            base = st.over
            if base.kind == "local":
                values = [str(Path(base.path) / i.value) for i in task.items]
            else:
                values = [f"{base.endpoint}/{base.container}/{base.child(i.value).path}" for i in task.items]
            return {k: values for k in range(self.spec.nodes)}
        out: dict[int, list[str]] = {}
        for k, actor in slot.gang.first_actors().items():
            refs = [slot.prefetched.pop((k, i.index), None)
                    or actor.stage_item.remote(st.over.child(i.value).to_dict(), self.cache_dir)
                    for i in task.items]
            out[k] = ray.get(refs)
        return out

    def prefetch(self, slot: Slot, task: Optional[Task]) -> None:
        """Start staging the next task's items while this one runs (download mode)."""
        array = self.spec.array
        if task is None or array.over is None or array.item_mode != "download":
            return
        for k, actor in slot.gang.first_actors().items():
            for i in task.items:
                if (k, i.index) not in slot.prefetched:
                    slot.prefetched[(k, i.index)] = actor.stage_item.remote(
                        self.storage.over.child(i.value).to_dict(), self.cache_dir)

    def plan_unit(self, slot: Slot, task: Task, run: int, ports: list[int]) -> list[RankLaunch]:
        """The task's ranks: the job's, with its items, logs, checkpoints and output dir."""
        assert self.dispatcher is not None
        values = self.item_values(slot, task)
        command = self.spec.command
        if ITEM_PLACEHOLDER in command:
            command = command.replace(ITEM_PLACEHOLDER, " ".join(shlex.quote(v) for v in values[0]))
        spec = self.spec.model_copy(update={"command": command})
        ident = next(iter(self.storage.outputs)).upper()

        def node_files(node_rank: int, job_temp: str) -> dict[str, str]:
            return {str(Path(job_temp) / f"items-{task.index}.txt"): "".join(v + "\n" for v in values[node_rank])}

        unit = UnitPlan(
            logs_rel=lambda rank: item_logs(task.index, run, rank),
            checkpoint_rel=self.unit_checkpoints(task),
            env={"RAYBATCH_ARRAY_INDEX": str(task.index), "RAYBATCH_ARRAY_TASKS": str(self.dispatcher.total),
                 "RAYBATCH_ITEM_KEY": task.key, "RAYBATCH_TASK_RUN": str(run)},
            node_files=node_files,
        )
        launches = plan_ranks(spec, self.framework, self.storage, slot.dirs, job_dir=self.info.job_dir,
                              infos=slot.infos, ports=ports, code_dirs=slot.code_dirs, staged_inputs=slot.staged,
                              gpus_per_rank=slot.gang.per_rank_resources().get("GPU", 0.0), unit=unit)
        for x in launches:
            out_dir = str(Path(x.env[f"RAYBATCH_OUTPUT_{ident}"]) / "items" / task.key)
            x.env.update({
                "RAYBATCH_ITEM": values[x.node_rank][0],
                "RAYBATCH_ITEMS_FILE": str(Path(x.job_temp) / f"items-{task.index}.txt"),
                "RAYBATCH_ITEM_OUTPUT_DIR": out_dir,
            })
            x.make_dirs.append(out_dir)
        return launches

    def unit_started(self, slot: Slot, task: Task, run: int, ranks: list) -> None:
        if self.phase is not Phase.RUNNING:
            self.phase = Phase.RUNNING
            self.log("the first task runs")
        assert self.dispatcher is not None
        self.prefetch(slot, self.dispatcher.peek())
        self.changed()

    def unit_ended(self, slot: Slot, task: Task, run: int, outcome: Outcome, seconds: float) -> None:
        d, array = self.dispatcher, self.spec.array
        assert d is not None and self.items is not None
        what = f"task {task.index} ({task.key}) run {run} on slot {slot.index}"
        if outcome.succeeded:
            self.record(Record(task.index, "done", [i.key for i in task.items], 0, run, self.job_id, self.n,
                               slot.index, slot.nodes, round(seconds, 3), message=outcome.message), outcome)
        elif outcome.kind in _STOPPED or outcome is self.stop_reason:
            d.release(task.index)
        elif reruns_free(outcome, d.infra_reruns[task.index], self.spec.retries.infrastructure):
            if not outcome.kind.keeps_place:  # a preempted or evicted task is never charged
                d.infra_reruns[task.index] += 1
            self.log(f"{what}: {outcome.kind.value}: {outcome.message}; it runs again")
            d.requeue(task.index, front=True)
        else:  # its own failure, or one infrastructure failure too many (retries.infrastructure)
            d.failures[task.index] += 1
            if d.failures[task.index] <= array.retries:
                self.log(f"{what}: {outcome.kind.value}: {outcome.message}; "
                         f"retry {d.failures[task.index]} of {array.retries}")
                d.requeue(task.index, front=False)
            else:
                self.log(f"{what}: {outcome.kind.value}: {outcome.message}; failed for good")
                recorded = self.record(Record(task.index, "failed", [i.key for i in task.items], outcome.exit_code,
                                              run, self.job_id, self.n, slot.index, slot.nodes, round(seconds, 3),
                                              message=f"{outcome.kind.value}: {outcome.message}"), outcome)
                failed, limit = d.failed_items(), array.error_threshold
                if recorded and limit >= 0 and failed > limit:
                    self.stop_with(Outcome(AttemptOutcome.USER_ERROR, outcome.exit_code or 1,
                                           f"{failed} item(s) failed, more than array.error_threshold ({limit}); "
                                           f"task {task.index} ({task.key}): {outcome.message}"))
        self.changed()

    def record(self, record: Record, outcome: Outcome) -> bool:
        """Write the task's record, then count it: a crash in between runs it again. When
        the record cannot be written, the attempt stops (the task runs again in the next)."""
        assert self.items is not None and self.dispatcher is not None
        for delay in (0.5, 1, 2, 4, 8, 0):
            try:
                self.items.write_record(record)
                break
            except StorageError as e:
                if delay:
                    self.log(f"writing items/{record.task}.json: {e} (retrying in {delay} s)")
                    time.sleep(delay)
                    continue
                self.dispatcher.release(record.task)
                self.stop_with(Outcome(AttemptOutcome.STORAGE_UNAVAILABLE if e.transient else
                                       AttemptOutcome.UPLOAD_FAILED, None,
                                       f"task {record.task} {record.state} ({outcome.message}) but its record "
                                       f"items/{record.task}.json could not be written: {e}"))
                return False
        self.dispatcher.finish(record.task, record)
        return True

    def stop_with(self, outcome: Outcome) -> None:
        with self._lock:  # slot threads and the serving loop
            super().stop_with(outcome)
        self.changed()

    # ---- the attempt ----------------------------------------------------------------
    def report(self, phase: Optional[Phase] = None, **extra) -> None:  # type: ignore[override]
        d = self.dispatcher
        slots = self.slot_reports()
        wanted = 0 if self.stop.is_set() or d is None else d.wanted(self.spec.array.max_concurrent)
        super().report(phase or self.phase, slots=slots, items=d.counts() if d else None,
                       slots_wanted=wanted if d is not None else None, **extra)

    def freeze(self) -> Optional[Outcome]:
        """The frozen listing and what is already done; the dispatcher."""
        st, array = self.storage, self.spec.array
        self.items = ItemStore(open_backend(st.items))
        manifest = self.items.read_manifest()
        skipped: set[int] = set()
        resumed = ItemStore(open_backend(st.resume_items)) if st.resume_items is not None else None
        if manifest is None and resumed is not None:
            manifest = resumed.read_manifest()
            if manifest is None:
                return Outcome(AttemptOutcome.START_FAILED, None,
                               f"array.resume_from: {array.resume_from} has no frozen item listing "
                               f"({st.resume_items.uri}/manifest.jsonl): it never started")
            self.items.write_manifest(manifest)
        elif manifest is None:
            manifest = list_items(array, open_backend(st.over) if st.over is not None else None)
            if not manifest:
                return Outcome(AttemptOutcome.START_FAILED, None,
                               f"array.over: no file matches '{array.over}'")
            self.items.write_manifest(manifest)
            self.log(f"{len(manifest)} item(s) listed and frozen in items/manifest.jsonl")
        if resumed is not None:
            skipped = {t for t, r in resumed.records().items() if r.state == "done"}
        done = {t for t, r in self.items.records().items() if r.state == "done"}
        tasks = tasks_of(manifest, array.items_per_task)
        runs = past_runs(open_backend(st.logs), "items") if self.n > 1 else {}
        self.dispatcher = Dispatcher(tasks, done, skipped, array.retries, runs)
        c = self.dispatcher.counts()
        resumed_note = f", {c.skipped} done by {array.resume_from}" if array.resume_from else ""
        self.log(f"{c.total} task(s): {c.done} done{resumed_note}, "
                 f"{c.pending} to run on up to {array.max_concurrent} slot(s)")
        return None

    def apply(self, control: Optional[Control]) -> None:
        """The scheduler's word: stop the attempt; slots granted and taken back."""
        if control is None:
            return
        stop = control.requested_stop()
        if stop is not None:
            self.stop_with(stop)
        for k, grant in sorted(control.slots.items()):
            self.apply_grant(k, grant)

    def check_control(self) -> bool:
        return self.stop.is_set()

    def serve(self) -> Outcome:
        d, array = self.dispatcher, self.spec.array
        assert d is not None
        last_report = 0.0
        while True:
            self.apply(self.files.read_control())
            if self.stop.is_set() or d.complete:
                break
            timeout = self.past_wall_clock()
            if timeout is not None:
                self.stop_with(timeout)
                break
            if self._wake.is_set() or time.monotonic() - last_report > REPORT_EVERY_S:
                self._wake.clear()
                self.report()
                last_report = time.monotonic()
            self._wake.wait(TICK_S)
        if self.stop_reason is not None:
            return self.stop_reason
        c = d.counts()
        failed = d.failed_items()
        note = f"{c.done + c.skipped} of {c.total} task(s) done" + (f", {c.skipped} by {array.resume_from}"
                                                                    if c.skipped else "")
        if failed:
            note += f"; {failed} item(s) failed (array.error_threshold {array.error_threshold})"
        return Outcome(AttemptOutcome.SUCCEEDED, 0, note)

    def shutdown(self) -> None:
        """Stop every slot (its task gets SIGTERM and the grace period) and wait for its
        nodes to be given back."""
        slots = list(self.slots.values())
        if any(s.thread.is_alive() for s in slots):
            self.report(Phase.STOPPING, reason=self.stop_reason.message if self.stop_reason else "done")
        for s in slots:
            s.drain.set()
        for s in slots:
            s.thread.join(timeout=self.spec.grace_period + 60)
            self.lost_nodes |= s.lost_nodes

    def run(self) -> int:
        self.connect("array job ")
        outcome: Optional[Outcome] = None
        try:
            outcome = self.check_storage() or self.freeze()
            if outcome is None:
                outcome = self.serve()
        except RayActorError as e:
            traceback.print_exc()
            outcome = Outcome(AttemptOutcome.NODE_LOST, None, f"a slot's node was lost: {e}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            transient = isinstance(e, StorageError) and e.transient
            outcome = Outcome(AttemptOutcome.STORAGE_UNAVAILABLE if transient else AttemptOutcome.START_FAILED,
                              None, f"driver error: {type(e).__name__}: {e}")
        finally:
            if self.stop_reason is None and outcome is not None and not outcome.succeeded:
                self.stop_with(outcome)
            try:
                self.shutdown()
            except Exception:  # noqa: BLE001 - still report
                traceback.print_exc()
        if self.stop_reason is not None and outcome is not None and outcome.succeeded:
            outcome = self.stop_reason
        assert outcome is not None
        return self.ended(outcome)


if __name__ == "__main__":
    sys.exit(main(ArrayAttempt, "raybatch.runtime.array", sys.argv[1:]))
