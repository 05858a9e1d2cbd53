"""The Python SDK: ``raybatch.Client``. Plain HTTP (httpx) to the raybatch server,
so it works from a laptop, a notebook, or inside a Ray driver or task.

    from raybatch import Client
    c = Client()                                   # embedded local default, started on demand
    job = c.submit("recipes/hello-custom/job.yaml")
    done = c.wait(job.id)
    print(done.state, c.logs(job.id))

Which server: ``address=`` > ``RAYBATCH_ADDRESS`` > the local default under
``RAYBATCH_HOME``. Which token: ``token=`` > ``RAYBATCH_TOKEN`` > the local
default's token file, and that file only for that state dir's own server (the URL in
``<RAYBATCH_HOME>/server.json`` or ``local.json``): another server, an SSH tunnel to a
cluster's head included, never gets it; without a token, a server's 401 says how to set
one. An ``https://`` server is verified with the system's CAs, or with ``ca_cert=`` /
``RAYBATCH_CA_CERT`` (a cluster's self-signed certificate: ``raybatch env`` prints it).
A token sent over plain HTTP to an address that is not loopback draws one warning line
on stderr (once per process and address). Job ids are checked before they go into a URL.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union
import urllib.parse
from urllib.parse import urlsplit

import httpx

from raybatch import config
from raybatch.models import (
    FileEntry, ItemInfo, JobDetail, JobSummary, LogChunk, MetricEvent, QueueEntry, SchedulerInfo, SubmitRequest,
    TrialInfo,
)
from raybatch.runtime.code import package_code, package_input
from raybatch.runtime.environment import credential_problem
from raybatch.scheduler.cost import CostReport, Prices, load_prices
from raybatch.scheduler.cost import price as price_report
from raybatch.spec.job import JobSpec
from raybatch.spec.secrets import values as secret_values
from raybatch.spec.loader import apply_overrides, load_job_file, parse_job, upload_problem
from raybatch.state.states import JobState
from raybatch.sweep import split_trial_id


class RaybatchError(RuntimeError):
    """An error the server reported (or no server could be reached)."""

    def __init__(self, message: str, status_code: Optional[int] = None):
        super().__init__(message)
        self.status_code = status_code


ENV_CA_CERT = "RAYBATCH_CA_CERT"
# what the server makes (rb-1a2b3c4d), a sweep's trial (rb-1a2b3c4d.t3): nothing that can
# change a URL's path (/, ..), its query (?) or fragment (#)
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LOOPBACK_HOSTS = {"localhost", "localhost.", "ip6-localhost"}
_warned_plain_http: set[str] = set()


def check_job_id(job_id: Any) -> str:
    """``job_id`` if it is one; a RaybatchError before any request otherwise (an id with
    ``/`` or ``..`` would name another route of the server)."""
    if isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) and ".." not in job_id:
        return job_id
    shown = repr(job_id) if len(repr(job_id)) <= 80 else repr(job_id)[:77] + "..."
    raise RaybatchError(f"{shown} is not a job id (like rb-1a2b3c4d or a trial rb-1a2b3c4d.t3: letters, "
                        "digits, '-', '_', '.'; no '/' or '..')")


def is_loopback(host: Optional[str]) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    if not host:
        return False
    if host.lower() in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, Optional[int]]:
    """(scheme, host, port) with every loopback name as one host: what "the same server" means."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    return parts.scheme, ("loopback" if is_loopback(host) else host), port


def _local_record(address: str, home: Optional[Path] = None) -> Optional[dict]:
    """The record of ``<RAYBATCH_HOME>``'s own server if ``address`` is it: ``server.json``
    (``python -m raybatch.server`` writes its URL and certificate there) or the local
    default's ``local.json``; None for every other address."""
    import json  # noqa: PLC0415

    home = Path(home) if home else config.home()
    for name in ("server.json", "local.json"):
        try:
            record = json.loads((home / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("url") and _origin(record["url"]) == _origin(address):
            return record
    return None


def local_token_for(address: str, home: Optional[Path] = None) -> Optional[str]:
    """``<RAYBATCH_HOME>/token``, if ``address`` is the server of that state dir (the URL in
    its ``server.json`` or ``local.json``). None for every other address: this machine's
    token must not reach another server (an SSH tunnel's 127.0.0.1 port to a cluster's
    head included)."""
    home = Path(home) if home else config.home()
    if _local_record(address, home) is None:
        return None
    try:
        return (home / "token").read_text().strip() or None
    except OSError:
        return None


def _verify(address: str, ca_cert: Optional[str]) -> Union[bool, ssl.SSLContext]:
    """httpx's ``verify``: the given CA file, else the system's CAs."""
    if not ca_cert:
        return True
    path = Path(ca_cert).expanduser()
    if not path.is_file():
        raise RaybatchError(f"--ca-cert/{ENV_CA_CERT}: {path}: no such file (the server's CA certificate, PEM)")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as e:
        raise RaybatchError(f"--ca-cert/{ENV_CA_CERT}: {path}: not a PEM certificate ({e})") from None


def _warn_plain_http(address: str) -> None:
    """Once per process and server: a token about to cross a network unencrypted."""
    scheme, host, port = _origin(address)
    if scheme != "http" or host == "loopback" or address in _warned_plain_http:
        return
    _warned_plain_http.add(address)
    print(f"raybatch: warning: the token goes to {address} over plain HTTP (unencrypted); use https "
          "(the server's --tls-cert/--tls-key) or an SSH tunnel", file=sys.stderr, flush=True)


class Client:
    def __init__(self, address: Optional[str] = None, token: Optional[str] = None, *,
                 auto_start: bool = True, timeout: float = 30.0, ca_cert: Optional[str] = None):
        address = address or os.environ.get(config.ENV_ADDRESS)
        token = token or os.environ.get(config.ENV_TOKEN)
        if address and urlsplit(address).scheme not in ("http", "https"):
            raise RaybatchError(f"--address {address!r}: a server URL starts with http:// or https://")
        if not address:
            from raybatch.local.embedded import LocalCluster  # noqa: PLC0415

            local = LocalCluster()
            info = local.running()
            if info is None:
                if not auto_start:
                    raise RaybatchError(
                        "no raybatch server: run `raybatch up`, or set RAYBATCH_ADDRESS / --address"
                    )
                info = local.up()
            address = info["url"]
            token = token or local.token()
        if not token:
            token = local_token_for(address)
        self.address = address.rstrip("/")
        self.has_token = bool(token)
        # the state dir's own https server: its self-signed certificate, as it recorded it
        ca_cert = ca_cert or os.environ.get(ENV_CA_CERT) or (_local_record(self.address) or {}).get("ca_cert")
        self.ca_cert = ca_cert or None
        verify = _verify(self.address, ca_cert)
        if token:
            _warn_plain_http(self.address)
        self._http = httpx.Client(
            base_url=self.address + config.API_PREFIX, timeout=timeout, verify=verify,
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )

    def _refusal(self, status_code: int, detail: str) -> "RaybatchError":
        """The server's error; a 401 without a token says how to give one."""
        if status_code == 401 and not self.has_token:
            detail = (f"the raybatch server at {self.address} needs a token: set {config.ENV_TOKEN} (or "
                      "--token, Client(token=...)); this machine's own token file (RAYBATCH_HOME/token) is "
                      "sent only to the server of that state dir")
        return RaybatchError(detail, status_code)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            hint = (f" (verify it with its CA certificate: {ENV_CA_CERT} or --ca-cert)"
                    if "CERTIFICATE_VERIFY_FAILED" in str(e) else "")
            raise RaybatchError(f"cannot reach the raybatch server at {self.address}: {e}{hint}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
                )
            raise self._refusal(r.status_code, str(detail))
        return r.json()

    # ---- jobs ----------------------------------------------------------------
    def submit(self, job: Union[JobSpec, str, Path, dict], overrides: Iterable[str] = (),
               mount_root: Optional[str] = None) -> JobSummary:
        """Submit a job file path (raybatch YAML, Batch AI job.json or Azure ML command job;
        ``mount_root`` replaces Batch AI's $AZ_BATCHAI_MOUNT_ROOT), a parsed ``JobSpec`` or a
        dict; ``overrides`` are ``key=value`` strings like the CLI's ``--set``."""
        body = self._request_body(job, overrides, mount_root).wire()
        return JobSummary.model_validate(self._request("POST", "/jobs", json=body))

    def submit_many(self, jobs: Iterable[Union[JobSpec, str, Path, dict]], overrides: Iterable[str] = (),
                    chunk: int = 500) -> list[JobSummary]:
        """Submit many jobs (an array, a sweep) in few requests: each request is queued
        whole or not at all, in order. Returns the jobs in the order given."""
        overrides = list(overrides)
        bodies = [self._request_body(j, overrides) for j in jobs]
        out: list[JobSummary] = []
        for i in range(0, len(bodies), chunk):
            payload = {"jobs": [b.wire() for b in bodies[i:i + chunk]]}
            out += [JobSummary.model_validate(j) for j in self._request("POST", "/jobs/batch", json=payload)]
        return out

    def _request_body(self, job: Union[JobSpec, str, Path, dict], overrides: Iterable[str],
                      mount_root: Optional[str] = None) -> SubmitRequest:
        if isinstance(job, (str, Path)):
            spec = load_job_file(job, overrides, mount_root)
        else:
            data = job.model_dump(mode="json") if isinstance(job, JobSpec) else dict(job)
            spec = parse_job(apply_overrides(data, overrides, "<job>"), base_dir=Path.cwd(),
                             source="<job>")
            if isinstance(job, JobSpec):  # a dump shows each value as ***: take it from the object
                spec.secrets = {k: v if secret_values({k: v}) else job.secrets.get(k, v)
                                for k, v in spec.secrets.items()}
        # the values travel beside the spec (write-only), which names them only (spec.secrets)
        secrets = secret_values(spec.secrets)
        # index credentials never leave this machine (the server would refuse them anyway)
        creds = [p for item in (spec.packages.pip if spec.packages else []) if (p := credential_problem(item))]
        if creds:
            raise RaybatchError("; ".join(f"packages.pip: {p}" for p in creds))
        sha = None
        if spec.code:
            sha, data = package_code(spec.code)
            self._upload("code", sha, data)
        self._upload_inputs(spec)
        return SubmitRequest(spec=spec, code_package=sha, secrets=secrets)

    def _upload(self, kind: str, sha: str, data: bytes) -> None:
        """PUT /code/{sha} or /inputs/{sha}, unless the server has that content already."""
        try:
            self._request("GET", f"/{kind}/{sha}")
        except RaybatchError as e:
            if e.status_code != 404:
                raise
            self._request("PUT", f"/{kind}/{sha}", content=data, headers={"Content-Type": "application/zip"})

    def _upload_inputs(self, spec: JobSpec) -> None:
        """Each ``mode: upload`` input (a file or folder here, Azure ML's local input) as a
        zip the server keeps by its sha256 (the same content is sent once); the spec then
        names it in ``package``."""
        for ident, inp in spec.inputs.items():
            if inp.mode != "upload":
                continue
            try:
                problem = upload_problem(Path(inp.path), config.max_upload_input_bytes())
                if problem:
                    raise ValueError(problem)
                sha, data, file_name = package_input(inp.path)
            except (ValueError, OSError) as e:
                raise RaybatchError(f"inputs.{ident}.path: '{inp.path}' {e}") from None
            try:
                self._upload("inputs", sha, data)
            except RaybatchError as e:
                raise RaybatchError(f"inputs.{ident}: uploading '{inp.path}': {e}", e.status_code) from None
            inp.package = f"{sha}/{file_name}" if file_name else sha

    def list(self, state: Optional[Iterable[str]] = None, experiment: Optional[str] = None,
             limit: int = 200, workspace: Optional[str] = None) -> list[JobSummary]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = [s.upper() for s in state]
        if experiment:
            params["experiment"] = experiment
        if workspace:
            params["workspace"] = workspace
        return [JobSummary.model_validate(j) for j in self._request("GET", "/jobs", params=params)]

    def get(self, job_id: str) -> JobDetail:
        return JobDetail.model_validate(self._request("GET", f"/jobs/{check_job_id(job_id)}"))

    def cancel(self, job_id: str) -> JobSummary:
        return JobSummary.model_validate(self._request("POST", f"/jobs/{check_job_id(job_id)}/cancel"))

    # ---- identities and the audit log (raybatch/server/routes/admin.py) ----------------
    def whoami(self) -> dict[str, Any]:
        return self._request("GET", "/whoami")

    def create_token(self, user: str, role: str, workspace: str = "default",
                     expires_in: Optional[float] = None) -> dict[str, Any]:
        """A new API token: its record, with ``token`` (shown this once)."""
        return self._request("POST", "/admin/tokens", json={"user": user, "role": role, "workspace": workspace,
                                                            "expires_in": expires_in})

    def tokens(self, workspace: Optional[str] = None) -> list[dict[str, Any]]:
        return self._request("GET", "/admin/tokens", params={"workspace": workspace} if workspace else None)

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._request("DELETE", "/admin/tokens/" + urllib.parse.quote(token_id, safe=""))

    def audit(self, workspace: Optional[str] = None, limit: int = 200) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if workspace:
            params["workspace"] = workspace
        return self._request("GET", "/audit", params=params)

    def cluster(self) -> list[dict[str, Any]]:
        return self._request("GET", "/cluster")

    def login_link(self, next: str, kind: str = "web") -> tuple[str, float]:
        """A one-time link that logs a browser in (the web view, or ``kind="ray-dashboard"``
        the Ray dashboard) and lands on ``next``: (its URL, seconds it works for). The
        token is never in it."""
        code = self._request("POST", "/login-codes", json={"kind": kind, "next": next})
        return self.address + code["url"], code["expires_in"]

    def ray_info(self) -> dict[str, Any]:
        """The cluster's Ray: its address, dashboard URL, auth mode and the server's Ray token
        file (never the token)."""
        return self._request("GET", "/ray")

    def queue(self, limit: int = 200, estimate: bool = True) -> list[QueueEntry]:
        """Waiting jobs in the order the scheduler considers them, with why each waits."""
        rows = self._request("GET", "/queue", params={"limit": limit, "estimate": estimate})
        return [QueueEntry.model_validate(r) for r in rows]

    def scheduler(self) -> SchedulerInfo:
        return SchedulerInfo.model_validate(self._request("GET", "/scheduler"))

    def nodes(self, ended: bool = False) -> list[dict[str, Any]]:
        """The cluster's nodes as the server records them: type, spot, state since when,
        reason, jobs on it (``ended``: also the nodes that are gone)."""
        return self._request("GET", "/nodes", params={"ended": ended})

    def requeue_nodes(self, node_ids: list[str]) -> list[str]:
        """Preempt the jobs on these nodes back to the queue (they keep their place); their ids."""
        return self._request("POST", "/nodes/requeue", json={"node_ids": list(node_ids)})

    def node_status(self) -> dict[str, Any]:
        """steady/resizing, worker nodes per state, autoscaling demand, launch failures."""
        return self._request("GET", "/nodes/status")

    def cost(self, by: str = "type", since: Optional[float] = None,
             prices: Union[None, str, Path, Prices] = None) -> CostReport:
        """Node-hours, idle hours and hours lost to evictions over [since, now], grouped by node
        ``type``, ``experiment`` or ``job``; with ``prices`` (a ``prices.yaml`` path or
        ``Prices``), money too. Definitions: raybatch.scheduler.cost."""
        params: dict[str, Any] = {"by": by}
        if since is not None:
            params["since"] = since
        rep = CostReport.model_validate(self._request("GET", "/cost", params=params))
        if prices is None:
            return rep
        if isinstance(prices, Prices):
            return price_report(rep, prices, "<prices>")
        return price_report(rep, load_prices(prices), Path(prices).expanduser())

    def items(self, job_id: str, state: Optional[Iterable[str]] = None) -> list[ItemInfo]:
        """An array job's tasks (``state``: only pending, running, done, failed, skipped)."""
        params: dict[str, Any] = {"state": list(state)} if state else {}
        rows = self._request("GET", f"/jobs/{check_job_id(job_id)}/items", params=params)
        return [ItemInfo.model_validate(r) for r in rows]

    def trials(self, job_id: str, state: Optional[Iterable[str]] = None) -> list[TrialInfo]:
        """A sweep's trials, best first (``state``: only pending, running, done, failed,
        early_terminated, cancelled)."""
        params: dict[str, Any] = {"state": list(state)} if state else {}
        rows = self._request("GET", f"/jobs/{check_job_id(job_id)}/trials", params=params)
        return [TrialInfo.model_validate(r) for r in rows]

    def trial(self, job_id: str, n: int) -> TrialInfo:
        return TrialInfo.model_validate(self._request("GET", f"/jobs/{check_job_id(job_id)}/trials/{int(n)}"))

    def metrics(self, job_id: str, *, trial: Optional[int] = None, rank: int = 0, attempt: Optional[int] = None,
                name: Optional[str] = None) -> list[MetricEvent]:
        """Metric events a job (or a sweep's trial) reported: log_metric, RAYBATCH_METRIC lines, MLflow."""
        params: dict[str, Any] = {"rank": rank}
        for k, v in (("trial", trial), ("attempt", attempt), ("name", name)):
            if v is not None:
                params[k] = v
        rows = self._request("GET", f"/jobs/{check_job_id(job_id)}/metrics", params=params)
        return [MetricEvent.model_validate(r) for r in rows]

    def log_chunk(self, job_id: str, *, rank: int = 0, stream: str = "stdout",
                  attempt: Optional[int] = None, offset: int = 0, item: Optional[int] = None,
                  trial: Optional[int] = None) -> LogChunk:
        params: dict[str, Any] = {"rank": rank, "stream": stream, "offset": offset}
        if attempt:
            params["attempt"] = attempt
        if item is not None:
            params["item"] = item
        if trial is not None:
            params["trial"] = trial
        return LogChunk.model_validate(self._request("GET", f"/jobs/{check_job_id(job_id)}/logs", params=params))

    def logs(self, job_id: str, *, rank: int = 0, stream: str = "stdout",
             attempt: Optional[int] = None, item: Optional[int] = None, trial: Optional[int] = None) -> str:
        """The whole log file as it is now (``item``: an array job's task, ``trial``: a
        sweep's trial; their latest run). A trial id ``<id>.t<n>`` works as ``job_id``."""
        return "".join(self.follow_logs(job_id, rank=rank, stream=stream, attempt=attempt, follow=False,
                                        item=item, trial=trial))

    def follow_logs(self, job_id: str, *, rank: int = 0, stream: str = "stdout",
                    attempt: Optional[int] = None, follow: bool = True,
                    poll: float = 0.5, item: Optional[int] = None, trial: Optional[int] = None) -> Iterator[str]:
        """Yield the log as it grows. With ``follow`` and no ``attempt``, keep going
        through retries (a ``--- attempt N ---`` line marks each new one) until the
        job is final."""
        job_id, in_id = split_trial_id(job_id)
        trial = trial if trial is not None else in_id
        offset = 0
        n = attempt
        while True:
            chunk = self.log_chunk(job_id, rank=rank, stream=stream, attempt=n, offset=offset, item=item,
                                   trial=trial)
            n = chunk.attempt
            if chunk.data:
                yield chunk.data
                offset = chunk.next_offset
                continue
            if not follow:
                return
            if chunk.eof:
                if attempt is not None or (chunk.job_final and chunk.latest_attempt <= n):
                    return
                if chunk.latest_attempt > n:
                    n, offset = n + 1, 0
                    yield f"--- attempt {n} ---\n"
                    continue
            time.sleep(poll)

    # ---- files -----------------------------------------------------------------
    def files(self, job_id: str, path: str = "") -> list[FileEntry]:
        """The job's files under ``path`` (stdouterr/..., checkpoints/..., outputs/<id>/...),
        wherever they are stored."""
        rows = self._request("GET", f"/jobs/{check_job_id(job_id)}/files", params={"path": path})
        return [FileEntry.model_validate(r) for r in rows]

    def download(self, job_id: str, dest: Union[str, Path], path: str = "",
                 progress: Optional[Callable[[FileEntry, int], None]] = None) -> list[Path]:
        """Fetch the job's files under ``path`` into ``dest``, keeping their tree paths
        relative to ``path``'s directory; ``progress(entry, bytes)`` as bytes arrive.
        Each file is written to a temporary name first: a failed download leaves no
        partial file behind."""
        from raybatch.storage.backends import unsafe_rel  # noqa: PLC0415

        dest = Path(dest)
        entries = [e for e in self.files(job_id, path) if e.type != "link"]  # links: listed, never served
        if not entries:
            raise RaybatchError(f"job {job_id} has no files under '{path or '/'}'", 404)
        for e in entries:  # names come from the server: none may land outside dest
            why = unsafe_rel(e.path)
            if why:
                raise RaybatchError(f"job {job_id} lists a file named {e.path!r}: not downloaded, it would "
                                    f"be written outside {dest} ({why})")
        base = path.strip("/")
        single = len(entries) == 1 and entries[0].path == base
        written = []
        for e in entries:
            if single:
                rel = Path(e.path).name
            else:
                parent = base if base and e.path.startswith(base + "/") else ""
                rel = e.path[len(parent) + 1:] if parent else e.path
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            try:
                with self._http.stream("GET", f"/jobs/{job_id}/files/content", params={"path": e.path},
                                       timeout=httpx.Timeout(30, read=300)) as r:
                    if r.status_code >= 400:
                        r.read()
                        try:
                            detail = r.json().get("detail", r.text)
                        except ValueError:
                            detail = r.text
                        raise self._refusal(r.status_code, str(detail))
                    with open(tmp, "wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            f.write(chunk)
                            if progress:
                                progress(e, len(chunk))
                if tmp.stat().st_size != e.size:
                    raise RaybatchError(f"{e.path}: got {tmp.stat().st_size} bytes, expected {e.size}")
                os.replace(tmp, target)
            except httpx.HTTPError as err:
                raise RaybatchError(f"downloading {e.path}: {err}") from None
            finally:
                tmp.unlink(missing_ok=True)
            written.append(target)
        return written

    def datastores(self) -> dict[str, Any]:
        """The server's datastores: names, locations, credential kinds (never a secret)."""
        return self._request("GET", "/datastores")

    def wait(self, job_id: str, timeout: Optional[float] = None, poll: float = 0.5,
             on_change: Optional[Callable[[JobDetail], None]] = None) -> JobDetail:
        """Block until the job is SUCCEEDED, FAILED or CANCELLED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            job = self.get(job_id)
            key = (job.state, job.attempt)
            if on_change and key != last:
                on_change(job)
            last = key
            if JobState(job.state).is_final:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout} s")
            time.sleep(poll)


def exit_code_for(job: JobSummary) -> int:
    """The process exit code that stands for a finished job (like `az batchai job wait`)."""
    if job.state == JobState.SUCCEEDED:
        return 0
    if job.state == JobState.CANCELLED:
        return 130
    return job.exit_code if job.exit_code not in (None, 0) else 1
