"""A slot of an array job: one gang of the task's shape (a pinned placement group and its
rank actors), set up once (environment, inputs, code) and then kept warm to run one
task after another, each as fresh processes in their own process groups with their own
environment. One thread per slot in the attempt's driver.

A slot ends when the scheduler takes it back (drained after its task, or preempted:
SIGTERM and the grace period to its task, which runs again elsewhere), when no task is
left for it (the tail frees its nodes), when its node is lost, or with the attempt."""

from __future__ import annotations

import shlex
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import ray
from ray.exceptions import RayActorError, RayError

from raybatch.runtime import setup, watch
from raybatch.runtime.gang import Gang, cause_of
from raybatch.runtime.items import Task
from raybatch.runtime.launch import AttemptDirs, RankLaunch, UnitPlan, plan_ranks
from raybatch.runtime.protocol import Outcome, RankReport, SlotReport, ray_job_id
from raybatch.spec.job import ITEM_PLACEHOLDER
from raybatch.state.states import AttemptOutcome
from raybatch.storage.backends import StorageError
from raybatch.storage.plan import item_logs

if TYPE_CHECKING:
    from raybatch.runtime.array import ArrayAttempt

IDLE_WAIT_S = 0.25  # a ready slot with nothing to run looks again this often
UNIT_SYNC_TIMEOUT_S = 120.0


class Slot:
    def __init__(self, owner: "ArrayAttempt", index: int, nodes: list[str]):
        self.owner = owner
        self.index = index
        self.nodes = list(nodes)
        self.spec = owner.unit_spec
        self.dirs = AttemptDirs(owner.job_id, owner.n, slot=index)
        self.gang = Gang(self.spec, f"{ray_job_id(owner.job_id, owner.n)}-s{index}", self.nodes,
                         lambda m: owner.log(f"slot {index}: {m}"))
        self.state = "starting"
        self.since = time.time()
        self.task: Optional[int] = None
        self.drain = threading.Event()       # finish the task, take no new one
        self.preempted: Optional[str] = None  # stop the task now (why)
        self.lost_nodes: set[str] = set()
        self.upload_failed = False
        self.infos: list[dict[str, Any]] = []
        self.code_dirs: dict[int, str] = {}
        self.staged: dict[int, dict[str, str]] = {}
        self.prefetched: dict[tuple[int, int], Any] = {}  # (node rank, item index) -> stage_item ref
        self.thread = threading.Thread(target=self._run, name=f"slot-{index}", daemon=True)

    def report(self) -> SlotReport:
        return SlotReport(slot=self.index, nodes=self.nodes, state=self.state, task=self.task, since=self.since)

    def _set(self, state: str) -> None:
        self.state, self.since = state, time.time()
        self.owner.changed()

    def log(self, msg: str) -> None:
        self.owner.log(f"slot {self.index}: {msg}")

    def start(self) -> None:
        self.thread.start()

    def stop_request(self) -> Optional[Outcome]:
        """Why the running task must stop now, if it must: the attempt ends, or the slot
        was preempted."""
        if self.owner.stop_reason is not None:
            return self.owner.stop_reason
        if self.preempted is not None:
            return Outcome(AttemptOutcome.PREEMPTED, None, self.preempted)
        return None

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
                task = self.owner.dispatcher.take(self.index)
                if task is None:
                    if not self.owner.dispatcher.more_for_slots(self.owner.live_slots()):
                        self.log("no task left for it: giving its nodes back")
                        break
                    time.sleep(IDLE_WAIT_S)
                    continue
                self.task = task.index
                self._set("busy")
                run = self.owner.dispatcher.runs(task.index) + 1
                started = time.time()
                try:
                    outcome = self.run_unit(task, run)
                except RayActorError as e:
                    outcome = Outcome(AttemptOutcome.NODE_LOST, None, f"a rank's node was lost: {e}")
                except RayError as e:  # staging an item, restoring its checkpoints
                    cause = cause_of(e)
                    transient = isinstance(cause, StorageError) and cause.transient
                    outcome = Outcome(AttemptOutcome.STORAGE_UNAVAILABLE if transient
                                      else AttemptOutcome.START_FAILED, None, f"{type(cause).__name__}: {cause}")
                except Exception as e:  # noqa: BLE001 - counted against the task's retries
                    traceback.print_exc()
                    outcome = Outcome(AttemptOutcome.START_FAILED, None, f"{type(e).__name__}: {e}")
                self.task = None
                self.owner.task_ended(self, task, run, outcome, time.time() - started)
                if outcome.kind is AttemptOutcome.NODE_LOST:
                    lost = True
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
        self._set("starting")
        owner.slot_placed(self)
        stopped = lambda: owner.check_control() or self.preempted is not None  # noqa: E731
        problem = setup.build_environment(self.gang, owner.storage, owner.n, owner.cache_dir, stopped, self.log)
        if problem is not None:
            return problem
        staged = setup.stage_inputs(self.gang, owner.storage, self.dirs, owner.cache_dir, stopped,
                                    lambda *a, **k: None, self.log)
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

    # ---- one task -------------------------------------------------------------------------
    def _item_values(self, task: Task) -> dict[int, list[str]]:
        """Node rank -> what each item of the task is on that node: a staged local path
        (``download``), the path or URL (``direct``), the value or the index."""
        owner, array = self.owner, self.owner.spec.array
        st = owner.storage
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
        for k, actor in self.gang.first_actors().items():
            refs = [self.prefetched.pop((k, i.index), None)
                    or actor.stage_item.remote(st.over.child(i.value).to_dict(), owner.cache_dir)
                    for i in task.items]
            out[k] = ray.get(refs)
        return out

    def _prefetch(self, task: Optional[Task]) -> None:
        """Start staging the next task's items while this one runs (download mode)."""
        array = self.owner.spec.array
        if task is None or array.over is None or array.item_mode != "download":
            return
        for k, actor in self.gang.first_actors().items():
            for i in task.items:
                if (k, i.index) not in self.prefetched:
                    self.prefetched[(k, i.index)] = actor.stage_item.remote(
                        self.owner.storage.over.child(i.value).to_dict(), self.owner.cache_dir)

    def plan(self, task: Task, run: int, values: dict[int, list[str]], ports: list[int]) -> list[RankLaunch]:
        owner = self.owner
        total = owner.dispatcher.total
        command = self.spec.command
        if ITEM_PLACEHOLDER in command:
            command = command.replace(ITEM_PLACEHOLDER, " ".join(shlex.quote(v) for v in values[0]))
        spec = self.spec.model_copy(update={"command": command})
        first_output = next(iter(owner.storage.outputs))

        def node_files(node_rank: int, job_temp: str) -> dict[str, str]:
            return {str(Path(job_temp) / f"items-{task.index}.txt"): "".join(v + "\n" for v in values[node_rank])}

        unit = UnitPlan(
            logs_rel=lambda rank: item_logs(task.index, run, rank),
            checkpoint_rel=f"items/{task.index}",
            env={"RAYBATCH_ARRAY_INDEX": str(task.index), "RAYBATCH_ARRAY_TASKS": str(total),
                 "RAYBATCH_ITEM_KEY": task.key, "RAYBATCH_TASK_RUN": str(run)},
            node_files=node_files,
        )
        launches = plan_ranks(spec, owner.framework, owner.storage, self.dirs, job_dir=owner.info.job_dir,
                              infos=self.infos, ports=ports, code_dirs=self.code_dirs, staged_inputs=self.staged,
                              gpus_per_rank=self.gang.per_rank_resources().get("GPU", 0.0), unit=unit)
        ident = first_output.upper()
        for x in launches:
            out_dir = str(Path(x.env[f"RAYBATCH_OUTPUT_{ident}"]) / "items" / task.key)
            x.env.update({
                "RAYBATCH_ITEM": values[x.node_rank][0],
                "RAYBATCH_ITEMS_FILE": str(Path(x.job_temp) / f"items-{task.index}.txt"),
                "RAYBATCH_ITEM_OUTPUT_DIR": out_dir,
            })
            x.make_dirs.append(out_dir)
        return launches

    def run_unit(self, task: Task, run: int) -> Outcome:
        """Run one task on this slot's warm actors until it ends; its outputs are out
        (or the outcome says which are not) when this returns."""
        owner, gang = self.owner, self.gang
        values = self._item_values(task)
        ports = ray.get([a.free_port.remote() for a in gang.actors])
        launches = self.plan(task, run, values, ports)
        st = owner.storage
        if st.checkpoints.kind != "local":  # the task's checkpoints from its last run
            ray.get([a.restore_dir.remote(st.checkpoints.child(f"items/{task.index}").to_dict(),
                                          launches[k * gang.P].env["RAYBATCH_CHECKPOINT_DIR"])
                     for k, a in gang.first_actors().items()])
        syncing = [x for x in launches if x.sync_dirs or x.sync_logs]
        ray.get([gang.actors[x.rank].start_sync.remote(x.sync_dirs, x.sync_logs, self.spec.sync_interval)
                 for x in syncing])
        starts = {}
        for x in launches:
            actor = gang.actors[x.rank]
            if x.argv is None:
                starts[x.rank] = actor.hold.remote(x.make_dirs, x.files)
            else:
                starts[x.rank] = actor.start.remote(x.argv, x.env, x.cwd, x.log_dir, x.make_dirs,
                                                    self.spec.grace_period, x.files)
        ranks = [RankReport(rank=x.rank, node_rank=x.node_rank, local_rank=x.local_rank, role=x.role,
                            node_id=info["node_id"], node_ip=info["node_ip"], hostname=info["hostname"])
                 for x, info in zip(launches, self.infos)]
        for rank, pid in zip(starts, ray.get(list(starts.values()))):
            ranks[rank].pid = pid
        owner.task_started(self, task)
        self._prefetch(owner.dispatcher.peek())
        timeout = owner.spec.array.item_timeout
        outcome = watch.watch(gang, ranks, owner.framework, time.monotonic() + timeout, self.stop_request,
                              self.lost_nodes, lambda *a, **k: None, self.log,
                              timeout_reason=f"exceeded array.item_timeout ({timeout:g} s)")
        if syncing:
            not_out: list[str] = []
            errors: list[str] = []
            for x in syncing:
                try:
                    result = ray.get(gang.actors[x.rank].finish_sync.remote(UNIT_SYNC_TIMEOUT_S))
                except RayError as e:
                    if ranks[x.rank].node_id in self.lost_nodes:
                        continue
                    not_out.append(f"node {x.node_rank}'s files")
                    errors.append(type(e).__name__)
                    continue
                not_out += result["unsynced"]
                if result["error"]:
                    errors.append(result["error"])
            self.upload_failed |= bool(not_out)
            if not_out and outcome.succeeded:
                outcome = Outcome(AttemptOutcome.UPLOAD_FAILED, None,
                                  f"{len(not_out)} file(s) not uploaded: {', '.join(not_out[:3])}; "
                                  f"cause: {errors[0] if errors else 'unknown'}")
        return outcome
