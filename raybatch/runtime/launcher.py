"""Server side of an attempt: submit its Ray Job, read its reports, stop it.

Each attempt is one Ray Job (``raybatch-<job id>-<attempt>``), visible in the Ray
dashboard with the raybatch job id, name, experiment and attempt in its metadata.
Secrets and environment values are never put in the metadata. Storage credentials
go to the driver in ``secrets.json`` (mode 0600, next to the attempt file), which
the driver removes as soon as it has read it."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from raybatch.runtime import layout
from raybatch.runtime.code import package_zip
from raybatch.spec.job import JobSpec
from raybatch.spec.location import LocationError
from raybatch.storage.datastores import CredentialError, Datastores
from raybatch.storage.plan import resolve_attempt


class AttemptSetupError(RuntimeError):
    """The attempt cannot start as configured (a datastore gone, a credential that
    cannot be read): the job fails with this message instead of being retried."""


@dataclass
class RayJobState:
    status: str                 # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED | MISSING
    terminal: bool
    driver_exit_code: Optional[int] = None
    message: str = ""


def ray_job_id(job_id: str, attempt: int) -> str:
    return f"raybatch-{job_id}-{attempt}"


class RayJobLauncher:
    def __init__(self, dashboard_url: str, state_dir: str | Path, code_root: str | Path,
                 datastores: Optional[Callable[[], Datastores]] = None, cache_dir: Optional[str] = None,
                 ray_address: Optional[str] = None):
        from raybatch.config import ray_client_env  # noqa: PLC0415

        ray_client_env()
        from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

        self.dashboard_url = dashboard_url
        self.state_dir = Path(state_dir)
        self.code_root = Path(code_root)
        self.client = JobSubmissionClient(dashboard_url)
        self.datastores = datastores or Datastores
        self.cache_dir = cache_dir
        # the driver connects to this GCS, not to "auto": Ray resolves "auto" through one
        # file per machine's temp dir, which names whichever cluster started last
        self.ray_address = ray_address

    def submit(self, job: dict[str, Any], attempt: int, nodes: Optional[list[str]] = None) -> str:
        """Submit the attempt's Ray Job. Bundle i of its gang goes on ``nodes[i]`` (the
        scheduler's choice); anywhere Ray finds room when ``nodes`` is not given."""
        spec = JobSpec.model_validate_json(job["spec"])
        ctl = layout.control_dir(self.state_dir, job["id"], attempt)
        attempt_file = ctl / "attempt.json"
        status_file = ctl / "status.json"
        status_file.unlink(missing_ok=True)
        try:
            storage = resolve_attempt(spec, job["job_dir"], self.datastores())
        except (CredentialError, LocationError) as e:
            raise AttemptSetupError(f"storage: {e}") from None
        layout.write_json_atomic(attempt_file, {
            "job_id": job["id"], "attempt": attempt, "spec": spec.model_dump(mode="json"),
            "job_dir": job["job_dir"], "status_file": str(status_file),
            "nodes": list(nodes or []), "storage": storage.to_dict(secrets=False),
            "cache_dir": self.cache_dir, "ray_address": self.ray_address,
            "code": ({"sha": job["code_package"], "dir": str(self.code_root / job["code_package"]),
                      "zip": str(package_zip(self.code_root, job["code_package"]))}
                     if job.get("code_package") else None),
            # the server's settings (its environment), not the Ray cluster's
            "storage_check_s": float(os.environ.get("RAYBATCH_STORAGE_CHECK_S", "20")),
            "final_sync_timeout_s": float(os.environ.get("RAYBATCH_FINAL_SYNC_TIMEOUT_S", "300")),
        })
        secrets = ctl / "secrets.json"
        if any(a.secret for a in storage.all()):
            # mkstemp + rename: mode 0600 from the first byte
            layout.write_json_atomic(secrets, storage.to_dict(secrets=True))
        else:
            secrets.unlink(missing_ok=True)
        (ctl / "control.json").unlink(missing_ok=True)
        # No runtime_env (no working_dir, no env_vars): the rank actors inherit the job's,
        # and any runtime_env costs each of them one more Python start. The driver ships
        # the code itself (raybatch.runtime.code).
        sid = ray_job_id(job["id"], attempt)
        self.client.submit_job(
            entrypoint=f"{sys.executable} -m raybatch.runtime.driver {attempt_file}",
            submission_id=sid,
            metadata={
                "raybatch_job_id": job["id"], "raybatch_job_name": spec.name,
                "raybatch_experiment": spec.experiment, "raybatch_attempt": str(attempt),
            },
        )
        return sid

    def discard_secrets(self, job_id: str, attempt: int) -> None:
        """The attempt is over: its credentials file must not outlive it (a driver that
        never started did not remove it)."""
        (layout.control_dir(self.state_dir, job_id, attempt) / "secrets.json").unlink(missing_ok=True)

    def report(self, job_id: str, attempt: int) -> Optional[dict[str, Any]]:
        """The driver's latest report (phase placing | placed | running | stopping | done)."""
        return layout.read_json(layout.control_dir(self.state_dir, job_id, attempt) / "status.json")

    def state(self, sid: str) -> RayJobState:
        try:
            info = self.client.get_job_info(sid)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return RayJobState("MISSING", True, None, "the Ray job is unknown to the cluster")
            raise
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        return RayJobState(status, info.status.is_terminal(), info.driver_exit_code, info.message or "")

    def request_stop(self, job_id: str, attempt: int, action: str, reason: str = "") -> None:
        """Ask the attempt's driver to stop its ranks gracefully (it polls this file).
        ``action``: cancel | preempt."""
        layout.write_json_atomic(layout.control_dir(self.state_dir, job_id, attempt) / "control.json",
                                 {"action": action, "reason": reason, "at": time.time()})

    def stop(self, sid: str) -> None:
        """Last resort when the driver does not react: Ray SIGTERMs, then SIGKILLs it."""
        try:
            self.client.stop_job(sid)
        except RuntimeError:
            pass

