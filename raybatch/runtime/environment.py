"""Per-job Python environments: the Ray runtime_env the rank actors get from the job's
``packages`` or ``image``, what a ``packages.pip`` list may hold, a quick check of the
requirements on a node of the gang while Ray builds the env, and a failed build in words.

What a list may hold (``pip_problems``, checked when the server admits a job): named
requirements (``numpy<2``, ``requests[socks]; python_version >= '3.8'``). A local path,
an archive, a URL or VCS requirement (``./pkg``, ``/abs``, ``file:``, ``x.whl``,
``git+https://...``, ``name @ url``) and pip options (``-e``, ``--index-url``,
``--extra-index-url``, ``-f``...) make pip fetch and *build* code from wherever they
point, with the rights of the node's user; the server's policy allows them only with
``allow_pip_sources: true``. Index credentials are never accepted in a job, policy or
not (a job's list goes into Ray's runtime_env, the store and ``show``): ``user:pw@``
in a URL or a token-like query parameter is refused; put them on the nodes (pip.conf,
``PIP_INDEX_URL``/``PIP_EXTRA_INDEX_URL`` in the nodes' environment, a keyring), or
name variables the nodes set (``https://${PIP_USER}:${PIP_PASSWORD}@host/simple``).

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
_USERINFO = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://([^\s/@'\"]+)@")
_ENV_REFS = re.compile(r"(?:\$\{[A-Za-z_][A-Za-z0-9_]*\}|:)+")
_VCS = ("git+", "hg+", "svn+", "bzr+")
# What pip installs as a local file when a requirement ends in it (its extras and marker
# aside: `x.tar.gz[a]; python_version > "3"` is the file x.tar.gz): a copy of pip's
# pip._internal.utils.filetypes.ARCHIVE_EXTENSIONS (pip 26.3; it includes WHEEL_EXTENSION,
# ".whl"), copied rather than imported as pip's internals may move between versions.
_ARCHIVES = (".zip", ".whl", ".tar.bz2", ".tbz", ".tar.gz", ".tgz", ".tar", ".tar.xz", ".txz", ".tlz",
             ".tar.lz", ".tar.lzma")
_TRAILING_EXTRAS = re.compile(r"\[[^\]]*\]\s*$")
_SECRET_PARAM = re.compile(r"(?i)([?&](?:sig|token|access_token|api_key|key|password|secret)=)[^&\s'\"]+")
_SECRET_ENV = re.compile(r"(?i)\b([A-Z0-9_]*(?:TOKEN|PASSWORD|SECRET|ACCOUNT_KEY)[A-Z0-9_]*=)\S+")


def redact(text: str) -> str:
    """``https://user:token@host`` -> ``https://***@host``; token-like query parameters
    and NAME_TOKEN=... assignments are hidden too."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SECRET_PARAM.sub(r"\1***", text)
    return _SECRET_ENV.sub(r"\1***", text)


def credential_problem(item: str) -> Optional[str]:
    """Why ``item`` must not be in a job at all: it carries index credentials (shown
    redacted). Variables the nodes expand (``${NAME}``) are no credentials."""
    for m in _USERINFO.finditer(item):
        if not _ENV_REFS.fullmatch(m.group(1)):
            return (f"'{redact(item)}' carries credentials (user:password@ in a URL): a job's packages go into "
                    "Ray's runtime_env and the job's record; configure the index credentials on the nodes "
                    "(pip.conf, PIP_INDEX_URL/PIP_EXTRA_INDEX_URL, a keyring) or write ${NAME} variables the "
                    "nodes set")
    if _SECRET_PARAM.search(item):
        return (f"'{redact(item)}' carries a token in a URL's query: configure the index credentials on the "
                "nodes (pip.conf, PIP_INDEX_URL/PIP_EXTRA_INDEX_URL, a keyring)")
    return None


def source_problem(item: str) -> Optional[str]:
    """Why ``item`` is not a plain named requirement (a path, archive, URL, VCS entry or pip
    option: pip would fetch and build code from it on the node); None for ``name[extras]
    <specifier>; <marker>``."""
    from packaging.requirements import InvalidRequirement, Requirement  # noqa: PLC0415

    shown = redact(item)
    if item.startswith("-"):
        return f"'{shown}' is a pip option ({item.split()[0]})"
    try:
        req: Optional[Requirement] = Requirement(item)
    except InvalidRequirement:
        req = None
    if "://" not in item and _is_archive(item, req.name if req is not None else None):  # pip: `x.whl` is a file
        return f"'{shown}' is a local path or archive"
    if req is None:
        low = item.lower()
        if low.startswith(_VCS):
            return f"'{shown}' is a VCS requirement"
        if "://" in item or low.startswith("file:"):
            return f"'{shown}' is a URL"
        if item.startswith((".", "/", "~")) or "/" in item:
            return f"'{shown}' is a local path or archive"
        return f"'{shown}' is not a requirement (name[extras] and a version specifier, e.g. 'numpy<2')"
    if req.url:
        return f"'{shown}' names its source ({'VCS' if req.url.lower().startswith(_VCS) else 'URL'}: name @ ...)"
    return None


def _is_archive(item: str, name: Optional[str]) -> bool:
    """Does pip take ``item`` for an archive file? pip cuts the marker (``;``) and the
    extras (``[...]``) off a line that is not a URL and looks at what is left. The name
    of the parsed requirement (``name``) is checked too: ``x.whl[a]>=1`` names x.whl."""
    bare = _TRAILING_EXTRAS.sub("", item.split(";", 1)[0].strip()).strip()
    return any(n.lower().endswith(_ARCHIVES) for n in (bare, name) if n)


def pip_problems(spec: JobSpec, allow_sources: bool = False) -> list[str]:
    """What the server refuses in ``packages.pip`` (one line each, naming the entry):
    credentials always; sources and options unless ``allow_sources`` (the policy's
    ``allow_pip_sources``)."""
    items = spec.packages.pip if spec.packages else []
    out = []
    for item in items:
        problem = credential_problem(item)
        if problem is None and not allow_sources:
            problem = source_problem(item)
            if problem is not None:
                problem += (": only named requirements are allowed here, as pip builds a path, URL or VCS "
                            "entry by running its code on the node (the server's policy can allow them: "
                            "allow_pip_sources: true)")
        if problem is not None:
            out.append(f"packages.pip: {problem}")
    return out


def failure_summary(text: str, spec: JobSpec, lines: int = 4) -> str:
    """A failed build's cause in a few lines (pip's ERROR lines, or the end)."""
    if spec.image and "'podman'" in text and ("No such file" in text or "not found" in text):
        return ("podman is not installed on this node: `image` runs the ranks in a container with "
                "Ray's image_uri, which needs podman on every node (or drop `image` and use `packages`)")
    body = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in body if ln.startswith("ERROR:") or ln.startswith("error:")]
    picked = errors[-lines:] if errors else [ln for ln in body if not ln.startswith("File ")][-lines:]
    return redact(" | ".join(picked))[:1500]


def dry_run(items: list[str], pip_options: list[str], timeout_s: float = CHECK_TIMEOUT_S) -> tuple[Optional[int], str]:
    """``pip install --dry-run`` of ``items`` with this process's Python, in the layout Ray
    uses (the build constraint is relative): (pip's exit code or None if it ran past
    ``timeout_s``, its output). Runs where it is called: a node of the job's gang."""
    import shutil  # noqa: PLC0415

    work_dir = Path(tempfile.mkdtemp(prefix="raybatch-pipcheck-"))  # 0700
    try:
        (work_dir / RAY_REQUIREMENTS_FILE).write_text("".join(f"{i}\n" for i in items))
        work = work_dir / "exec_cwd"
        work.mkdir()
        output = work_dir / "pip.txt"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-input",
               "-r", f"../{RAY_REQUIREMENTS_FILE}", *pip_options]
        with open(output, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "PIP_NO_INPUT": "1"})
            try:
                code: Optional[int] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                code = None
        return code, output.read_text(errors="replace")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def pip_verdict(code: Optional[int], text: str) -> Optional[str]:
    """pip's output when it is sure the list cannot be installed; None otherwise (it
    could, or an unreachable index left it unsure: the nodes may reach it)."""
    if code not in (None, 0) and any(w in text for w in _DEFINITE) and not any(w in text for w in _NETWORK):
        return text
    return None


def check_items(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(the items to check, pip's options): ``${VAR}`` items only the nodes can expand."""
    items = [i for i in spec.packages.pip if "${" not in i]
    pip_opts = runtime_env(spec)["pip"]["pip_install_options"] if spec.packages.installer == "pip" \
        else list(PIP_OPTIONS)
    return items, pip_opts


class RequirementsCheck:
    """``pip install --dry-run`` of the job's list on a node of its gang (a zero-CPU Ray
    task in the gang's placement group, bundle ``bundle``), in the background: a list
    that cannot be installed (no such package, no matching version, conflicts) is known
    in seconds, while Ray's build (clone + install, retried 3 times) takes minutes to say
    so. It runs where the environment is built, never on the head: what pip does for a
    list (fetch, build an sdist's metadata) happens on a node that runs the job's code
    anyway. Only pip's definite answers count; an unreachable index is no verdict."""

    def __init__(self, spec: JobSpec, placement_group: Any, bundle: int = 0):
        self.spec = spec
        self.placement_group = placement_group
        self.bundle = bundle
        self.ref: Any = None
        self.verdict: Optional[str] = None  # the output of a definite failure
        self.done = False

    def start(self) -> "RequirementsCheck":
        import ray  # noqa: PLC0415
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415

        items, pip_opts = check_items(self.spec)
        task = ray.remote(num_cpus=0, max_retries=0)(dry_run).options(
            name="raybatch-pip-check",
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=self.bundle))
        self.ref = task.remote(items, pip_opts)
        return self

    def poll(self) -> Optional[str]:
        """pip's output when it says the list cannot be installed; None otherwise (still
        running, fine, or no verdict)."""
        if self.done or self.ref is None:
            return self.verdict
        import ray  # noqa: PLC0415

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        self.done = True
        try:
            code, text = ray.get(self.ref)
        except ray.exceptions.RayError:
            return None  # the check could not run: no verdict, Ray's build still says
        self.verdict = pip_verdict(code, text)
        return self.verdict

    def wait(self, timeout_s: float) -> Optional[str]:
        """``poll`` until the check has answered or ``timeout_s`` passed: when Ray's build
        has failed first, pip's own words (which name the package) are worth a few seconds."""
        import ray  # noqa: PLC0415

        if not self.done and self.ref is not None:
            ray.wait([self.ref], timeout=timeout_s)
        return self.poll()

    def stop(self) -> None:
        if not self.done and self.ref is not None:
            import ray  # noqa: PLC0415

            try:
                ray.cancel(self.ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        self.done = True


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
