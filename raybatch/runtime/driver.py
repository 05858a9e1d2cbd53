"""The entrypoint of an attempt's Ray Job: ``python -m raybatch.runtime.driver ATTEMPT_JSON``.

The attempt, step by step (each step's module in brackets):

1. check that every storage location can be reached, before anything is reserved [setup];
2. reserve one placement group for the whole gang (STRICT_SPREAD by default), pinned to
   the scheduler's nodes, and start one rank actor per process [gang]; report PLACED;
3. build the job's environment, stage inputs and checkpoints (STAGING), ship the code [setup];
4. plan every rank's command, env and files [launch]; run ``prepare`` once per node
   (PREPARING) [setup]; start every rank's process; report RUNNING;
5. watch: the first rank to exit non-zero, a lost rank, a stop request from the server
   (``control.json``: cancel, preempt, evict), SIGTERM from outside raybatch (``ray job stop``:
   DRIVER_LOST), a stall or the wall-clock limit ends the attempt; the other ranks get
   SIGTERM -> grace -> SIGKILL (STOPPING) [watch];
6. when outputs, checkpoints or logs live in blob storage, each node's last upload
   (SYNCING); the attempt fails with the files that are not out, and their local copies
   are kept [watch];
7. free the placement group, then report DONE with the outcome and each rank's exit code.

This module keeps the attempt's state and its reports (``protocol.Report`` in
``status.json``); the server reads them."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import ray
from ray.exceptions import RayActorError, RayError

from raybatch import frameworks
from raybatch.runtime import setup, watch
from raybatch.runtime.gang import Gang, cause_of
from raybatch.runtime.launch import AttemptDirs, RankLaunch, check_private_dirs, plan_ranks
from raybatch.runtime.code import is_sha256
from raybatch.runtime.protocol import (
    AttemptFile, CodeRef, ControlDir, Outcome, Phase, RankReport, Report, SpawnError, plain_reason, ray_job_id,
    read_json,
)
from raybatch.state.states import AttemptOutcome
from raybatch.storage.plan import AttemptStorage


def check_code_ref(code: Optional[CodeRef]) -> None:
    """The code package is named by a sha256, and its paths are the store's names for it:
    anything else would make this driver zip and ship whatever directory it names."""
    if code is None:
        return
    if not is_sha256(code.sha) or Path(code.zip).name != f"{code.sha}.zip" or Path(code.dir).name != code.sha:
        raise SystemExit(f"the attempt's code package {code.sha[:80]!r} is not a sha256 with the store's "
                         "paths for it: refusing to ship it")


class Attempt:
    def __init__(self, attempt_file: str):
        try:
            self.info = AttemptFile.model_validate_json(Path(attempt_file).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot read {attempt_file}: {e}") from None
        check_code_ref(self.info.code)
        self.spec = self.info.spec
        self.framework = frameworks.get(self.spec.framework)
        self.job_id = self.info.job_id
        self.n = self.info.attempt
        self.files = ControlDir(Path(self.info.control_dir))
        self.dirs = AttemptDirs(self.job_id, self.n)
        self.stop = threading.Event()
        self.stop_reason: Optional[Outcome] = None
        self.lost_nodes: set[str] = set()
        self.started = time.monotonic()
        self.secret_env: dict[str, str] = {}  # the job's secrets (load_storage reads them)
        self.storage = self.load_storage()
        self.gang = Gang(self.spec, ray_job_id(self.job_id, self.n), self.info.nodes, self.log, self.secret_env)
        self.ranks: list[RankReport] = []
        self.launches: list[RankLaunch] = []
        self.cache_dir = self.info.cache_dir
        self.synced: Optional[bool] = None  # None: no final upload yet; True: everything is out
        self.unsynced: list[str] = []

    def load_storage(self) -> AttemptStorage:
        """The resolved locations; credentials, and the job's secrets (``secret_env``), come
        in a file only the server's user can read, removed as soon as it is read."""
        data = read_json(self.files.secrets)
        self.files.secrets.unlink(missing_ok=True)
        data = data if isinstance(data, dict) else {}
        self.secret_env = dict(data.get("env") or {})
        return AttemptStorage.from_dict(data.get("storage") or self.info.storage)

    # ---- reporting ---------------------------------------------------------
    def report(self, phase: Phase, **extra: Any) -> None:
        self.files.write_report(Report(phase=phase, at=time.time(), pid=os.getpid(), ranks=self.ranks, **extra))

    def log(self, msg: str) -> None:
        print(f"[raybatch +{time.monotonic() - self.started:.2f}s] {msg}", flush=True)

    def stop_with(self, outcome: Outcome) -> None:
        """Stop the attempt; the first reason given is how it ends."""
        if self.stop_reason is None:
            self.stop_reason = outcome
        self.stop.set()

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_with(Outcome(AttemptOutcome.DRIVER_LOST, None,
                               f"the attempt's driver got {signal.Signals(signum).name} from outside raybatch"))

    def check_control(self) -> bool:
        """Has the server asked this attempt to stop? (``control.json``, written atomically)"""
        if not self.stop.is_set():
            request = self.files.read_control()
            stop = request.requested_stop() if request is not None else None
            if stop is not None:
                self.stop_with(stop)
        return self.stop.is_set()

    def past_wall_clock(self) -> Optional[Outcome]:
        """The job's max_wall_clock, counted from this attempt's start (array and sweep
        drivers check it themselves; a plain job's watch does)."""
        if time.monotonic() > self.started + self.spec.max_wall_clock:
            return Outcome(AttemptOutcome.TIMEOUT, None, f"exceeded max_wall_clock ({self.spec.max_wall_clock:.0f} s)")
        return None

    def ended(self, outcome: Outcome, **extra: Any) -> int:
        """The last words of every driver: log and report how the attempt ended; its exit status."""
        outcome = Outcome(outcome.kind, outcome.exit_code, plain_reason(outcome.message), outcome.deadline)
        self.log(f"attempt {self.n} ended: {outcome.kind.value}: {outcome.message}")
        self.report(Phase.DONE, outcome=outcome.kind, exit_code=outcome.exit_code, message=outcome.message,
                    lost_nodes=sorted(self.lost_nodes), **extra)
        return 0 if outcome.succeeded else 1

    def stop_request(self) -> Optional[Outcome]:
        return self.stop_reason if self.check_control() else None

    # ---- steps: each returns None to go on, or how the attempt ends --------------------
    def check_storage(self) -> Optional[Outcome]:
        unsafe = check_private_dirs()  # this node's <tmp>/raybatch-<uid>/{mirror,jobs}: 0700, ours
        if unsafe:
            return Outcome(AttemptOutcome.START_FAILED, None, unsafe)
        return setup.check_storage(self.storage, self.info.storage_check_s, self.check_control, self.log)

    def reserve(self) -> Optional[Outcome]:
        problem = self.gang.reserve(self.info.placement_timeout_s, self.check_control)
        if problem is not None:
            return Outcome(AttemptOutcome.PLACEMENT_TIMEOUT, None, problem)
        self.log(f"placement group ready: {self.gang.placement()}")
        self.report(Phase.PLACED)  # the scheduler stops counting the gang as pending
        return None

    def build_environment(self) -> Optional[Outcome]:
        return setup.build_environment(self.gang, self.storage, self.n, self.cache_dir, self.check_control,
                                       self.log)

    def start_ranks(self) -> Optional[Outcome]:
        """Stage, ship the code, plan every rank, run ``prepare``, start every process."""
        spec, gang = self.spec, self.gang
        staged = setup.stage_inputs(gang, self.storage, self.dirs, self.cache_dir, self.check_control,
                                    self.report, self.log)
        if isinstance(staged, Outcome):
            return staged
        infos = gang.node_infos()
        self.log(f"{len(gang.actors)} rank actor(s) up")
        code_dirs = setup.ship_code(gang, self.info.code, self.cache_dir, self.log)
        if isinstance(code_dirs, Outcome):
            return code_dirs
        ports = ray.get([a.free_port.remote() for a in gang.actors])
        self.launches = plan_ranks(spec, self.framework, self.storage, self.dirs, job_dir=self.info.job_dir,
                                   infos=infos, ports=ports, code_dirs=code_dirs, staged_inputs=staged,
                                   gpus_per_rank=gang.per_rank_resources().get("GPU", 0.0))
        self.ranks = [launch.report(info) for launch, info in zip(self.launches, infos)]
        gang.start_syncs(self.launches, spec.sync_interval)
        if spec.prepare:
            problem = setup.run_prepare(gang, self.launches, self.storage, self.dirs, self.check_control,
                                        self.report, self.log)
            if problem is not None:
                return problem
        if self.framework.uses_mpirun:
            setup.start_mpi_agent(gang, self.launches, infos, self.log)
        for rank, pid in gang.start(self.launches).items():
            self.ranks[rank].pid = pid
        self.report(Phase.RUNNING)
        self.log(f"{len(gang.actors)} rank(s) running")
        return None

    def watch(self) -> Outcome:
        return watch.watch(self.gang, self.ranks, self.framework, self.started + self.spec.max_wall_clock,
                           self.stop_request, self.lost_nodes, self.report, self.log)

    def final_sync(self) -> Optional[str]:
        """Every node's last upload, once: what is not out (and where the copies are), or None."""
        if not self.storage.remote or not self.ranks or self.synced is not None:
            return None
        self.synced = False
        result = watch.final_sync(self.gang, self.ranks, self.dirs, self.lost_nodes,
                                  self.info.final_sync_timeout_s, self.report, self.log)
        self.unsynced = result.unsynced
        self.synced = not result.unsynced
        return result.message

    def cleanup(self) -> None:
        gang = self.gang
        if gang.actors:
            gang.terminate(0)  # reap stragglers left in the ranks' process groups
            # each node's scratch space of this job: <tmp>/raybatch-<uid>/jobs/<job id>
            temps = [str(Path(x.job_temp).parent) for x in self.launches]
            dirs = list(temps)
            if self.synced or not self.storage.remote:  # else the mirrors may be the only copy
                dirs += [str(self.dirs.mirror)] * len(temps)
            refs = [a.remove_dir.remote(d) for a, d in zip(gang.actors * 2, dirs)]
            for ref in refs:
                try:
                    ray.get(ref, timeout=30)
                except (RayError, TimeoutError):
                    pass  # a lost rank's node
        gang.release()

    # ---- main ----------------------------------------------------------------
    def steps(self) -> list[Callable[[], Optional[Outcome]]]:
        return [self.check_storage, self.reserve, self.build_environment, self.start_ranks]

    def connect(self, what: str = "", namespace: Optional[str] = None) -> None:
        """The start of every driver: a stop is caught from the first moment, the server sees
        PLACING, then Ray."""
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.report(Phase.PLACING)
        self.log(f"driver of {what}{self.job_id} attempt {self.n} started")
        ray.init(address=self.info.ray_address or "auto", namespace=namespace, log_to_driver=True,
                 logging_level="WARNING")
        # ray.init installs its own SIGTERM handler (exit at once): ours must win, so
        # that a stop still ends every rank and reports.
        signal.signal(signal.SIGTERM, self.on_signal)
        self.log("connected to Ray")

    def run(self) -> int:
        self.connect()
        outcome: Optional[Outcome] = None
        try:
            for step in self.steps():
                outcome = step()
                if outcome is not None:
                    outcome = self.stop_reason or outcome  # a stop explains a step cut short
                    break
            else:
                outcome = self.watch()
        except SpawnError as e:  # the job's own error (its command or environment), not its nodes'
            outcome = Outcome(AttemptOutcome.USER_ERROR, None, str(e))
        except RayActorError as e:
            traceback.print_exc()
            lost = watch.lost_outcome(e, "a rank", None)
            outcome = Outcome(lost.kind, None, f"{lost.message}, while starting: {type(e).__name__}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()  # the whole story goes to the driver log; the reason is one line
            cause = cause_of(e) if isinstance(e, RayError) else e
            outcome = Outcome(AttemptOutcome.START_FAILED if not self.ranks else AttemptOutcome.NODE_LOST,
                              None, f"driver error: {type(cause).__name__}: {cause} (the driver log has the traceback)")
        finally:
            try:
                if self.ranks and self.synced is None:
                    # whatever ended the attempt, processes that ran may have written outputs
                    self.gang.terminate(0)
                    not_out = self.final_sync()
                    if not_out and outcome is not None:
                        outcome = (Outcome(AttemptOutcome.UPLOAD_FAILED, None, not_out) if outcome.succeeded
                                   else Outcome(outcome.kind, outcome.exit_code, f"{outcome.message}; {not_out}"))
            except Exception:  # noqa: BLE001 - never skip the cleanup below
                traceback.print_exc()
            self.cleanup()
        assert outcome is not None
        return self.ended(outcome, unsynced=self.unsynced)


def main(kind: type[Attempt], module: str, argv: list[str]) -> int:
    """``python -m MODULE ATTEMPT_JSON``: the launcher picks the module (launcher.DRIVERS)."""
    if len(argv) != 1:
        print(f"usage: python -m {module} ATTEMPT_JSON", file=sys.stderr)
        return 2
    return kind(argv[0]).run()


if __name__ == "__main__":
    sys.exit(main(Attempt, "raybatch.runtime.driver", sys.argv[1:]))
