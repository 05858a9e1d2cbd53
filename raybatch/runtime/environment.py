"""Per-job Python environments: the Ray runtime_env the rank actors get from the job's
``packages`` or ``image``, a quick check of the requirements on the driver's node while
Ray builds the env, and a failed build in words.

How Ray (2.60) builds a ``pip`` / ``uv`` env, once per distinct package list per node:
the node's runtime-env agent creates ``<session>/runtime_resources/pip/<hash>/virtualenv``
and runs ``pip install -r <that dir>/ray_runtime_env_internal_pip_requirements.txt`` in it
(cwd ``<that dir>/exec_cwd``). When the node's Python is itself a virtualenv (raybatch's
usual setup) the agent *clones* it (a full copy), so ray, raybatch and everything else of
the node's env stay importable; otherwise it makes a ``--system-site-packages`` virtualenv.
The env is reused by later jobs with the same list (same hash) for the life of the Ray
session. A failed build is retried by the agent (RUNTIME_ENV_RETRY_TIMES, default 3), then
every actor waiting for it gets ``RuntimeEnvSetupError`` with the last lines of pip's
output. ``image`` is Ray's ``image_uri``: the worker runs in a podman container."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from raybatch.spec.job import JobSpec

# Ray's pip plugin writes the list here and runs pip from <target>/exec_cwd (ray 2.60)
RAY_REQUIREMENTS_FILE = "ray_runtime_env_internal_pip_requirements.txt"
PIP_OPTIONS = ["--disable-pip-version-check", "--no-cache-dir"]  # Ray's defaults
CHECK_TIMEOUT_S = 300.0

# pip's words for a list that cannot be installed, wherever it is tried
_DEFINITE = ("No matching distribution found", "Could not find a version that satisfies",
             "Invalid requirement", "ResolutionImpossible", "conflicting dependencies",
             "metadata-generation-failed", "Failed to build", "is not a valid")
# ... unless the index could not be reached (pip then also finds no versions)
_NETWORK = ("NewConnectionError", "Retrying (Retry(", "Could not fetch URL", "ProxyError", "SSLError",
            "ConnectTimeout", "ReadTimeout", "Temporary failure in name resolution", "Network is unreachable")


def runtime_env(spec: JobSpec) -> Optional[dict[str, Any]]:
    """The rank actors' runtime_env (the attempt's own is empty)."""
    if spec.image:
        return {"image_uri": spec.image}
    pkgs = spec.packages
    if pkgs is None or not pkgs.pip:
        return None
    if pkgs.installer == "uv":
        return {"uv": {"packages": list(pkgs.pip)}}
    options = list(PIP_OPTIONS)
    if _pins_only(pkgs.pip) and _pip_has_build_constraints():
        # The job's pins hold while pip builds sdists too (chainer 7.8.1's setup.py imports
        # pkg_resources, gone from setuptools 82: `setuptools<82` must reach its build env).
        # pip >= 26.2 ignores regular constraints there; the list Ray writes is the file.
        options += ["--build-constraint", f"../{RAY_REQUIREMENTS_FILE}"]
    return {"pip": {"packages": list(pkgs.pip), "pip_check": False, "pip_install_options": options}}


def describe(spec: JobSpec) -> str:
    if spec.image:
        return f"image: {spec.image}"
    pkgs = spec.packages
    n = len(pkgs.pip) if pkgs else 0
    return f"{pkgs.installer if pkgs else 'pip'}: {n} package{'s' if n != 1 else ''}"


def env_key(spec: JobSpec) -> str:
    """One name per distinct environment (as Ray caches them)."""
    return hashlib.sha1(json.dumps(runtime_env(spec), sort_keys=True).encode()).hexdigest()[:16]


def _pins_only(items: list[str]) -> bool:
    """Only named requirements (a constraints file allows nothing else)."""
    from packaging.requirements import InvalidRequirement, Requirement  # noqa: PLC0415

    for item in items:
        try:
            if Requirement(item).url:
                return False
        except InvalidRequirement:
            return False  # an option line (--index-url ...), a path, a ${VAR}
    return True


def _pip_has_build_constraints() -> bool:
    try:
        major, minor = (int(p) for p in metadata.version("pip").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (26, 2)


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@'\"]+@")
_SECRET_PARAM = re.compile(r"(?i)([?&](?:sig|token|access_token|api_key|key|password|secret)=)[^&\s'\"]+")
_SECRET_ENV = re.compile(r"(?i)\b([A-Z0-9_]*(?:TOKEN|PASSWORD|SECRET|ACCOUNT_KEY)[A-Z0-9_]*=)\S+")


def redact(text: str) -> str:
    """``https://user:token@host`` -> ``https://***@host``; token-like query parameters
    and NAME_TOKEN=... assignments are hidden too."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SECRET_PARAM.sub(r"\1***", text)
    return _SECRET_ENV.sub(r"\1***", text)


def failure_summary(text: str, spec: JobSpec, lines: int = 4) -> str:
    """A failed build's cause in a few lines (pip's ERROR lines, or the end)."""
    if spec.image and "'podman'" in text and ("No such file" in text or "not found" in text):
        return ("podman is not installed on this node: `image` runs the ranks in a container with "
                "Ray's image_uri, which needs podman on every node (or drop `image` and use `packages`)")
    body = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in body if ln.startswith("ERROR:") or ln.startswith("error:")]
    picked = errors[-lines:] if errors else [ln for ln in body if not ln.startswith("File ")][-lines:]
    return redact(" | ".join(picked))[:1500]


class RequirementsCheck:
    """``pip install --dry-run`` of the job's list on the driver's node, in the background:
    a list that cannot be installed (no such package, no matching version, conflicts) is
    known in seconds, while Ray's build (clone + install, retried 3 times) takes minutes
    to say so. Only pip's definite answers count; an unreachable index is no verdict."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.proc: Optional[subprocess.Popen] = None
        self.started = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="raybatch-pipcheck-"))
        self.output = self.dir / "pip.txt"
        self.verdict: Optional[str] = None  # the output of a definite failure
        self.done = False

    def start(self) -> "RequirementsCheck":
        items = [i for i in self.spec.packages.pip if "${" not in i]  # only the nodes can expand them
        (self.dir / RAY_REQUIREMENTS_FILE).write_text("".join(f"{i}\n" for i in items))
        work = self.dir / "exec_cwd"  # the layout Ray uses (the build constraint is relative)
        work.mkdir()
        pip_opts = runtime_env(self.spec)["pip"]["pip_install_options"] if self.spec.packages.installer == "pip" \
            else list(PIP_OPTIONS)
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-input",
               "-r", f"../{RAY_REQUIREMENTS_FILE}", *pip_opts]
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PIP_NO_INPUT": "1"})
        return self

    def poll(self) -> Optional[str]:
        """pip's output when it says the list cannot be installed; None otherwise (still
        running, fine, or no verdict)."""
        if self.done or self.proc is None:
            return self.verdict
        code = self.proc.poll()
        if code is None:
            if time.monotonic() - self.started > CHECK_TIMEOUT_S:
                self.stop()
            return None
        self.done = True
        text = self.output.read_text(errors="replace")
        if code != 0 and any(w in text for w in _DEFINITE) and not any(w in text for w in _NETWORK):
            self.verdict = text
        return self.verdict

    def stop(self) -> None:
        self.done = True
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()


def write_log(storage: Any, rel: str, text: str) -> str:
    """Write a (redacted) log into the job's stdouterr tree; return where it went."""
    from raybatch.storage.backends import open_backend  # noqa: PLC0415
    from raybatch.storage.plan import join as storage_join  # noqa: PLC0415

    logs = storage.logs
    text = redact(text)
    if logs.kind == "local":
        path = Path(logs.path) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "log.txt"
            src.write_text(text)
            open_backend(logs).upload(src, rel)
    return storage_join(logs.uri or logs.path, rel)


def ok_marker(cache_dir: str, spec: JobSpec) -> Path:
    """Set once an env came up on every node: its list needs no check again."""
    return Path(cache_dir) / "environments" / f"{env_key(spec)}.ok"
