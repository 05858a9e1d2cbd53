"""Server side of an attempt: submit its Ray Job, read its reports, stop it.

Each attempt is one Ray Job (``raybatch-<job id>-<attempt>``), visible in the Ray
dashboard under the name ``<name> · <job id> · attempt <n>`` (``metadata.job_name``) with
the raybatch job id, name, experiment and attempt in its ``raybatch_*`` metadata.
Secrets and environment values are never put in the metadata. Storage credentials
and the job's secrets (``runtime.secrets``) go to the driver in ``secrets.json`` (mode
0600, next to the attempt file), which the driver removes as soon as it has read it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from raybatch.config import ServerSettings
from raybatch.runtime.code import is_sha256, package_zip
from raybatch.runtime.secrets import SecretBox, SecretError, attempt_values
from raybatch.runtime.protocol import (
    AttemptFile, CodeRef, Control, ControlDir, Report, SlotGrant, ray_job_id, write_json_atomic,
)
from raybatch.spec.job import JobSpec
from raybatch.spec.location import LocationError
from raybatch.storage.datastores import CredentialError, Datastores
from raybatch.storage.plan import resolve_attempt


# the attempt's Ray Job entrypoint (a module run with python -m): a plain job's gang, an
# array's tasks on warm slots, a sweep's trials through Ray Tune
DRIVERS = {"job": "raybatch.runtime.driver", "array": "raybatch.runtime.array", "sweep": "raybatch.sweep.driver"}


def ray_job_name(name: str, job_id: str, attempt: int) -> str:
    """The Ray job's ``metadata.job_name``: Ray's dashboard names each attempt by it, so a
    user finds their job there by the name they gave it."""
    return f"{name} · {job_id} · attempt {attempt}"


class AttemptSetupError(RuntimeError):
    """The attempt cannot start as configured (a datastore gone, a credential that
    cannot be read): the job fails with this message instead of being retried."""


@dataclass
class RayJobState:
    status: str                 # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED | MISSING
    terminal: bool
    driver_exit_code: Optional[int] = None
    message: str = ""


class RayJobLauncher:
    def __init__(self, dashboard_url: str, state_dir: str | Path, code_root: str | Path,
                 datastores: Optional[Callable[[], Datastores]] = None,
                 settings: Optional[ServerSettings] = None, ray_address: Optional[str] = None):
        from raybatch.config import ray_client_env  # noqa: PLC0415

        ray_client_env()
        from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

        self.dashboard_url = dashboard_url
        self.state_dir = Path(state_dir)
        self.code_root = Path(code_root)
        self.client = JobSubmissionClient(dashboard_url)
        self.secret_box = SecretBox(self.state_dir)  # the jobs' secrets at rest (runtime.secrets)
        # (workspace, vault) -> why its jobs may not read that Key Vault now (the server's
        # current policy; set by the server once its scheduler has one), or None
        self.vault_problem: Optional[Callable[[str, str], Optional[str]]] = None
        self.datastores = datastores or Datastores
        self.settings = settings or ServerSettings.from_env()
        # the driver connects to this GCS, not to "auto": Ray resolves "auto" through one
        # file per machine's temp dir, which names whichever cluster started last
        self.ray_address = ray_address

    def submit(self, job: dict[str, Any], attempt: int, nodes: Optional[list[str]] = None,
               slots: Optional[dict[int, list[str]]] = None, resume_dir: Optional[str] = None) -> str:
        """Submit the attempt's Ray Job. Bundle i of its gang goes on ``nodes[i]`` (the
        scheduler's choice); anywhere Ray finds room when ``nodes`` is not given. An array
        job starts with its first ``slots`` (slot -> nodes) and, with ``resume_from``, the
        job directory of the job it resumes."""
        spec = JobSpec.model_validate_json(job["spec"])
        ctl = ControlDir.of(self.state_dir, job["id"], attempt)
        ctl.status.unlink(missing_ok=True)
        try:
            storage = resolve_attempt(spec, job["job_dir"], self.datastores(), resume_dir,
                                      lambda sha: package_zip(self.code_root, sha))
        except (CredentialError, LocationError) as e:
            raise AttemptSetupError(f"storage: {e}") from None
        try:  # opened and read (Key Vault) at each start, never written anywhere but secrets.json
            policy = self.vault_problem
            secret_env = attempt_values(
                spec, job.get("secrets"), self.secret_box,
                vault_problem=(lambda vault: policy(spec.workspace, vault)) if policy is not None else None,
            ) if spec.secrets else {}
        except SecretError as e:
            raise AttemptSetupError(str(e)) from None
        sha = job.get("code_package")
        if sha is not None and not is_sha256(sha):  # a row from before the API checked it
            raise AttemptSetupError(f"code_package {str(sha)[:80]!r}: not a sha256 (64 lowercase hex digits)")
        settings = self.settings
        write_json_atomic(ctl.attempt, AttemptFile(
            job_id=job["id"], attempt=attempt, spec=spec, job_dir=job["job_dir"], control_dir=str(ctl.path),
            nodes=list(nodes or []), storage=storage.to_dict(secrets=False), cache_dir=settings.cache_dir,
            ray_address=self.ray_address,
            code=CodeRef(sha=sha, dir=str(self.code_root / sha), zip=str(package_zip(self.code_root, sha)))
            if sha else None,
            storage_check_s=settings.storage_check_s, final_sync_timeout_s=settings.final_sync_timeout_s,
            placement_timeout_s=settings.placement_timeout_s,
        ).model_dump(mode="json"))
        if secret_env or any(a.secret for a in storage.all()):  # mkstemp + rename: 0600 from the first byte
            write_json_atomic(ctl.secrets, {"storage": storage.to_dict(secrets=True), "env": secret_env})
        else:
            ctl.secrets.unlink(missing_ok=True)
        ctl.control.unlink(missing_ok=True)
        if slots:
            ctl.write_control(Control(slots={k: SlotGrant(nodes=list(n)) for k, n in slots.items()}))
        # No runtime_env (no working_dir, no env_vars): the rank actors inherit the job's,
        # and any runtime_env costs each of them one more Python start. The driver ships
        # the code itself (raybatch.runtime.code).
        sid = ray_job_id(job["id"], attempt)
        driver = DRIVERS["sweep" if spec.sweep else "array" if spec.array else "job"]
        self.client.submit_job(
            entrypoint=f"{sys.executable} -m {driver} {ctl.attempt}",
            submission_id=sid,
            metadata={
                # what Ray's dashboard shows in its jobs list's Name column (and filters on)
                "job_name": ray_job_name(spec.name, job["id"], attempt),
                "raybatch_job_id": job["id"], "raybatch_job_name": spec.name,
                "raybatch_experiment": spec.experiment, "raybatch_attempt": str(attempt),
            },
        )
        return sid

    def discard_secrets(self, job_id: str, attempt: int) -> None:
        """The attempt is over: its credentials file must not outlive it (a driver that
        never started did not remove it)."""
        ControlDir.of(self.state_dir, job_id, attempt).secrets.unlink(missing_ok=True)

    def report(self, job_id: str, attempt: int) -> Optional[Report]:
        """The driver's latest report (``protocol.Phase``), or None before its first."""
        return ControlDir.of(self.state_dir, job_id, attempt).read_report()

    def state(self, sid: str) -> RayJobState:
        try:
            info = self.client.get_job_info(sid)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return RayJobState("MISSING", True, None, "the Ray job is unknown to the cluster")
            raise
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        return RayJobState(status, info.status.is_terminal(), info.driver_exit_code, info.message or "")

    def request_stop(self, job_id: str, attempt: int, action: str, reason: str = "",
                     deadline: Optional[float] = None) -> None:
        """Ask the attempt's driver to stop its ranks gracefully (it polls this file).
        ``action``: cancel | preempt | evict (``deadline``: when the evicted node goes)."""
        def change(c: Control) -> None:
            c.action, c.reason, c.deadline = action, reason, deadline  # type: ignore[assignment]
        ControlDir.of(self.state_dir, job_id, attempt).update_control(change)

    def grant_slot(self, job_id: str, attempt: int, slot: int, nodes: list[str]) -> None:
        """One more slot for an array job's running attempt (its driver polls the file)."""
        ControlDir.of(self.state_dir, job_id, attempt).update_control(
            lambda c: c.slots.__setitem__(slot, SlotGrant(nodes=list(nodes))))

    def revoke_slot(self, job_id: str, attempt: int, slot: int, reason: str, preempt: bool,
                    evict_by: Optional[float] = None) -> None:
        """Take a slot back: now (``preempt``: its task gets SIGTERM and its grace period;
        ``evict_by``: its node is evicted, the grace ends by then), or when its task ends
        (a lease not renewed)."""
        def change(c: Control) -> None:
            grant = c.slots.get(slot)
            if grant is not None and (grant.state == "granted" or preempt and not grant.preempt):
                c.slots[slot] = grant.model_copy(update={"state": "revoked", "reason": reason, "preempt": preempt,
                                                         "evict_by": evict_by})
        ControlDir.of(self.state_dir, job_id, attempt).update_control(change)

    def sync_slots(self, job_id: str, attempt: int, rows: list[dict[str, Any]]) -> None:
        """Make the attempt's control file say what the store says of its live slots: a
        grant it lacks is added, a revocation it lacks is made (never the other way)."""
        def change(c: Control) -> None:
            for row in rows:
                k, grant = row["slot"], c.slots.get(row["slot"])
                if row["state"] == "granted" and grant is None:
                    c.slots[k] = SlotGrant(nodes=list(row["nodes"]))
                elif row["state"] == "revoked":
                    preempt = bool(row["preempted_by"])
                    grant = grant or SlotGrant(nodes=list(row["nodes"]))
                    if grant.state == "granted" or preempt and not grant.preempt:
                        c.slots[k] = grant.model_copy(update={"state": "revoked", "reason": row["reason"] or "",
                                                              "preempt": preempt})
        ControlDir.of(self.state_dir, job_id, attempt).update_control(change)

    def stop(self, sid: str) -> None:
        """Last resort when the driver does not react: Ray SIGTERMs, then SIGKILLs it."""
        try:
            self.client.stop_job(sid)
        except RuntimeError:
            pass

