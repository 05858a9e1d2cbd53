"""A slot of an array job: one gang of the task's shape (a pinned placement group and its
rank actors), set up once (environment, inputs, code) and then kept warm to run one
task after another, each as fresh processes in their own process groups with their own
environment. One thread per slot in the attempt's driver.

A slot ends when the scheduler takes it back (drained after its task, or preempted:
SIGTERM and the grace period to its task, which runs again elsewhere), when no task is
left for it (the tail frees its nodes), when its node is lost, or with the attempt.

The slot is the same for every kind of unit; its owner (``UnitSource``: an array job's
driver, a sweep's slot pool) says which unit runs next and what its ranks run."""

from __future__ import annotations

import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Optional, Protocol

import ray
from ray.exceptions import RayActorError, RayError

from raybatch.runtime import setup, watch
from raybatch.runtime.gang import Gang, cause_of
from raybatch.runtime.launch import AttemptDirs, RankLaunch
from raybatch.runtime.protocol import Outcome, RankReport, SlotGrant, SlotReport, SpawnError, ray_job_id
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import StorageError

if TYPE_CHECKING:
    from raybatch.frameworks.base import Framework
    from raybatch.runtime.protocol import AttemptFile
    from raybatch.spec.job import JobSpec
    from raybatch.storage.plan import AttemptStorage


class Unit(Protocol):
    index: int   # the task's or trial's number
    key: str     # a name for logs


class UnitSource(Protocol):
    """What a slot needs from its owner."""

    job_id: str
    n: int
    info: "AttemptFile"
    unit_spec: "JobSpec"
    framework: "Framework"
    storage: "AttemptStorage"
    secret_env: dict[str, str]  # the job's secrets (runtime.secrets): each unit's processes get them
    cache_dir: str
    stop: threading.Event
    stop_reason: Optional[Outcome]

    def log(self, msg: str) -> None: ...
    def changed(self) -> None: ...
    def check_control(self) -> bool: ...
    def slot_placed(self, slot: "Slot") -> None: ...
    def slot_failed(self, slot: "Slot", outcome: Outcome) -> None: ...
    def next_unit(self, slot: "Slot", wait: float) -> Optional[Unit]:
        """The next unit for this slot, waiting up to ``wait`` seconds for one."""
        ...
    def wants_more(self) -> bool: ...
    def runs(self, unit: Unit) -> int: ...
    def plan_unit(self, slot: "Slot", unit: Unit, run: int, ports: list[int]) -> list[RankLaunch]: ...
    def unit_checkpoints(self, unit: Unit) -> str: ...
    def unit_timeout(self, unit: Unit) -> tuple[float, str]: ...
    def unit_started(self, slot: "Slot", unit: Unit, run: int, ranks: list[RankReport]) -> None: ...
    def unit_stop(self, unit: Unit) -> Optional[Outcome]: ...
    def unit_ended(self, slot: "Slot", unit: Unit, run: int, outcome: Outcome, seconds: float) -> None: ...

IDLE_WAIT_S = 0.25  # a ready slot with nothing to run asks again (for more to come) this often
UNIT_SYNC_TIMEOUT_S = 120.0
# a unit's run these ended runs again without counting as its failure: after preemption or
# an eviction with notice always, after the others up to retries.infrastructure times
RERUN_FREE = (AttemptOutcome.PREEMPTED, AttemptOutcome.EVICTED, AttemptOutcome.NODE_LOST,
              AttemptOutcome.PLACEMENT_TIMEOUT, AttemptOutcome.STORAGE_UNAVAILABLE)


def reruns_free(outcome: Outcome, infra_reruns: int, budget: int) -> bool:
    """Does a unit whose run ended so run again, free? (``infra_reruns``: its free reruns so
    far that were not preemptions or evictions; ``budget``: the job's retries.infrastructure)"""
    return outcome.kind.keeps_place or (outcome.kind in RERUN_FREE and infra_reruns < budget)


class SlotOwner:
    """The slots of one attempt, as an array job's driver and a sweep's pool both hold
    them: the scheduler's word on each (``control.json``) and what they report. The owner
    is a ``UnitSource`` with ``stop_with``."""

    slots: dict[int, "Slot"]
    gone: dict[int, SlotReport]  # taken back before they started

    def apply_grant(self, k: int, grant: SlotGrant) -> None:
        """Start slot k on its nodes, or take it back: before it started (nothing to give
        back), when its unit ends (drain), or now (preempt: its unit gets SIGTERM)."""
        owner: Any = self
        slot = self.slots.get(k)
        if grant.state == "granted":
            if slot is None and k not in self.gone and not owner.stop.is_set():
                slot = self.slots[k] = Slot(owner, k, grant.nodes)
                owner.log(f"slot {k} granted on {', '.join(n[:12] for n in grant.nodes)}")
                slot.start()
        elif slot is None:
            if k not in self.gone:
                self.gone[k] = SlotReport(slot=k, nodes=grant.nodes, state="released", since=time.time())
                owner.changed()
        elif grant.preempt and slot.preempted is None:
            owner.log(f"slot {k}: {grant.reason}")
            slot.evict_by = grant.evict_by
            slot.preempted = grant.reason or ("evicted" if grant.evict_by is not None else "preempted")
        elif not grant.preempt and not slot.drain.is_set():
            owner.log(f"slot {k} drains: {grant.reason}")
            slot.drain.set()

    def slot_failed(self, slot: "Slot", outcome: Outcome) -> None:
        """A slot could not be set up. Its nodes' trouble (placement) only loses the slot;
        the job's own (its environment, inputs or code) fails the attempt."""
        owner: Any = self
        if owner.stop.is_set() or slot.preempted is not None or slot.drain.is_set():
            return
        if outcome.kind is AttemptOutcome.START_FAILED:
            owner.stop_with(outcome)

    def slot_reports(self) -> list[SlotReport]:
        return [s.report() for s in list(self.slots.values())] + list(self.gone.values())


class Slot:
    def __init__(self, owner: UnitSource, index: int, nodes: list[str]):
        self.owner = owner
        self.index = index
        self.nodes = list(nodes)
        self.spec = owner.unit_spec
        self.dirs = AttemptDirs(owner.job_id, owner.n, slot=index)
        self.gang = Gang(self.spec, f"{ray_job_id(owner.job_id, owner.n)}-s{index}", self.nodes,
                         lambda m: owner.log(f"slot {index}: {m}"), owner.secret_env)
        self.state = "reserving"
        self.since = time.time()
        self.placed_at: Optional[float] = None
        self.task: Optional[int] = None
        self.drain = threading.Event()       # finish the task, take no new one
        self.preempted: Optional[str] = None  # stop the task now (why)
        self.evict_by: Optional[float] = None  # ... because its node is evicted: grace ends by then
        self.lost_nodes: set[str] = set()
        self.upload_failed = False
        self.infos: list[dict[str, Any]] = []
        self.code_dirs: dict[int, str] = {}
        self.staged: dict[int, dict[str, str]] = {}
        self.prefetched: dict[tuple[int, int], Any] = {}  # (node rank, item index) -> stage_item ref
        self.thread = threading.Thread(target=self._run, name=f"slot-{index}", daemon=True)

    def report(self) -> SlotReport:
        return SlotReport(slot=self.index, nodes=self.nodes, state=self.state, task=self.task, since=self.since,
                          placed_at=self.placed_at)

    def _set(self, state: str) -> None:
        self.state, self.since = state, time.time()
        self.owner.changed()

    def log(self, msg: str) -> None:
        self.owner.log(f"slot {self.index}: {msg}")

    def start(self) -> None:
        self.thread.start()

    def stop_request(self, unit: Optional[Unit] = None) -> Optional[Outcome]:
        """Why the running unit must stop now, if it must: the attempt ends, the slot was
        preempted, or its owner stops that unit (a sweep's early termination)."""
        if self.owner.stop_reason is not None:
            return self.owner.stop_reason
        if self.preempted is not None:
            if self.evict_by is not None:
                return Outcome(AttemptOutcome.EVICTED, None, self.preempted, deadline=self.evict_by)
            return Outcome(AttemptOutcome.PREEMPTED, None, self.preempted)
        return self.owner.unit_stop(unit) if unit is not None else None

    # ---- life ---------------------------------------------------------------------------
    def _run(self) -> None:
        lost = False
        try:
            problem = self._set_up()
            if problem is not None:
                lost = problem.kind.is_infrastructure
                self.log(problem.message)
                self.owner.slot_failed(self, problem)
                return
            self._set("ready")
            while not self.drain.is_set() and self.preempted is None and self.owner.stop_reason is None:
                task = self.owner.next_unit(self, IDLE_WAIT_S)
                if task is None:
                    if not self.owner.wants_more():
                        self.log("nothing left for it to run: giving its nodes back")
                        break
                    continue
                self.task = task.index
                self._set("busy")
                run = self.owner.runs(task)
                started = time.time()
                try:
                    outcome = self.run_unit(task, run)
                except SpawnError as e:  # the unit's own error (its command or environment)
                    outcome = Outcome(AttemptOutcome.USER_ERROR, None, str(e))
                except RayActorError as e:
                    died = watch.lost_outcome(e, "a rank", None)
                    outcome = Outcome(died.kind, None, f"{died.message}: {type(e).__name__}")
                except RayError as e:  # staging an item, restoring its checkpoints
                    cause = cause_of(e)
                    transient = isinstance(cause, StorageError) and cause.transient
                    outcome = Outcome(AttemptOutcome.STORAGE_UNAVAILABLE if transient
                                      else AttemptOutcome.START_FAILED, None, f"{type(cause).__name__}: {cause}")
                except Exception as e:  # noqa: BLE001 - counted against the task's retries
                    traceback.print_exc()
                    outcome = Outcome(AttemptOutcome.START_FAILED, None, f"{type(e).__name__}: {e}")
                self.task = None
                try:
                    self.owner.unit_ended(self, task, run, outcome, time.time() - started)
                except Exception as e:  # noqa: BLE001 - the owner's bug: the slot still gives its nodes back
                    traceback.print_exc()
                    self.log(f"ending {task.key}: {type(e).__name__}: {e}")
                    break
                if outcome.kind in (AttemptOutcome.NODE_LOST, AttemptOutcome.EVICTED):
                    lost = outcome.kind is AttemptOutcome.NODE_LOST or bool(self.lost_nodes)
                    break
                self._set("ready" if not self.drain.is_set() else "draining")
        except RayActorError as e:
            self.log(f"lost: {e}")
            lost = True
        except Exception as e:  # noqa: BLE001 - a broken slot must not take the driver down
            traceback.print_exc()
            self.log(f"failed: {type(e).__name__}: {e}")
            lost = True
        finally:
            self.release(lost)

    def _set_up(self) -> Optional[Outcome]:
        owner = self.owner
        problem = self.gang.reserve(owner.info.placement_timeout_s, lambda: owner.stop.is_set() or
                                    self.preempted is not None or self.drain.is_set())
        if problem is not None:
            return Outcome(AttemptOutcome.PLACEMENT_TIMEOUT, None, problem)
        self.placed_at = time.time()
        self._set("starting")
        owner.slot_placed(self)
        stopped = lambda: owner.check_control() or self.preempted is not None  # noqa: E731
        problem = setup.build_environment(self.gang, owner.storage, owner.n, owner.cache_dir, stopped, self.log)
        if problem is not None:
            return problem
        staged = setup.stage_inputs(self.gang, owner.storage, self.dirs, owner.cache_dir, stopped,
                                    lambda *a, **k: None, self.log, checkpoints=False)
        if isinstance(staged, Outcome):
            return staged
        self.staged = staged
        self.infos = self.gang.node_infos()
        code = setup.ship_code(self.gang, owner.info.code, owner.cache_dir, self.log)
        if isinstance(code, Outcome):
            return code
        self.code_dirs = code
        self.log(f"ready on {', '.join(n[:12] for n in self.nodes)}")
        return None

    def release(self, lost: bool = False) -> None:
        """Give the slot's nodes back: its processes are gone, its scratch space and (once
        everything is out) its local copies removed, its placement group removed."""
        try:
            if self.gang.actors and self.infos:
                self.gang.terminate(0)
                dirs = [self.dirs.job_temp(k) for k in range(self.spec.nodes)]
                if not self.upload_failed:
                    dirs.append(str(self.dirs.mirror))
                refs = [a.remove_dir.remote(d) for a in self.gang.first_actors().values() for d in dirs]
                ray.wait(refs, num_returns=len(refs), timeout=30)
            self.gang.release()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        self.task = None
        self._set("lost" if lost else "released")

    # ---- one unit -------------------------------------------------------------------------
    def run_unit(self, task: Unit, run: int) -> Outcome:
        """Run one unit (an array task, a sweep trial) on this slot's warm actors until it
        ends; its outputs are out (or the outcome says which are not) when this returns.
        When starting it fails half-way, what did start is stopped before the slot takes
        its next unit: two units never share a slot."""
        try:
            return self._run_unit(task, run)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Stop whatever a unit that failed to start left running (processes, syncs)."""
        try:
            self.gang.terminate(0)
            refs = [a.finish_sync.remote(5.0) for a in self.gang.actors]
            ray.wait(refs, num_returns=len(refs), timeout=30)
        except Exception:  # noqa: BLE001 - a lost rank: the slot is lost anyway
            traceback.print_exc()

    def _run_unit(self, task: Unit, run: int) -> Outcome:
        owner, gang = self.owner, self.gang
        ports = ray.get([a.free_port.remote() for a in gang.actors])
        launches = owner.plan_unit(self, task, run, ports)
        st = owner.storage
        if st.checkpoints.kind != "local":  # the unit's checkpoints from its last run
            ray.get([a.restore_dir.remote(st.checkpoints.child(owner.unit_checkpoints(task)).to_dict(),
                                          launches[k * gang.P].env["RAYBATCH_CHECKPOINT_DIR"])
                     for k, a in gang.first_actors().items()])
        syncing = any(x.sync_dirs or x.sync_logs for x in launches)
        gang.start_syncs(launches, self.spec.sync_interval)
        ranks = [x.report(info) for x, info in zip(launches, self.infos)]
        for rank, pid in gang.start(launches).items():
            ranks[rank].pid = pid
        owner.unit_started(self, task, run, ranks)
        timeout, why = owner.unit_timeout(task)
        outcome = watch.watch(gang, ranks, owner.framework, time.monotonic() + timeout,
                              lambda: self.stop_request(task), self.lost_nodes, lambda *a, **k: None, self.log,
                              timeout_reason=why)
        if syncing:  # the unit's last upload (quietly: one per unit)
            result = watch.final_sync(gang, ranks, self.dirs, self.lost_nodes, UNIT_SYNC_TIMEOUT_S,
                                      lambda *a, **k: None, lambda m: None)
            self.upload_failed |= bool(result.unsynced)
            if result.message and outcome.succeeded:
                outcome = Outcome(AttemptOutcome.UPLOAD_FAILED, None, result.message)
        return outcome
