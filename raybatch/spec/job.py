"""The raybatch job file.

One YAML document per job. How it maps to Azure Batch AI's job (2018-05-01):

==========================  ==============================================
raybatch                    Batch AI
==========================  ==============================================
name, experiment            job name, experiment
priority                    schedulingPriority (low | normal | high)
preemptible                 (none: Batch AI did not preempt jobs)
low_priority_nodes          the cluster's vmPriority (lowpriority)
prefer_low_priority         (none: which nodes the autoscaler adds for the job)
nodes                       nodeCount (gang: all nodes or none)
processes_per_node          <toolkit>Settings.processCount / nodeCount
resources (per node)        the cluster's vmSize
framework + command         pyTorchSettings / customToolkitSettings / ...
tensorflow                  tensorFlowSettings (parameterServerCount, per-role args)
mpi                         customMpiSettings (mpirun through the rank actors)
custom.run_on: first_node   customToolkitSettings (command on the first node)
packages, image             containerSettings / the node's setup (pip list, image_uri)
prepare                     jobPreparation
code                        the script directory (shipped with the job)
environment                 environmentVariables
inputs / outputs            inputDirectories / outputDirectories
output_root                 stdOutErrPathPrefix
max_wall_clock              constraints.maxWallClockTime
deadline, runtime_estimate  (none: spot or dedicated nodes chosen per job to meet a deadline)
retries                     (none: Batch AI had no configurable retries)
array                       (none: a "job factory" script; Azure ML's parallel job)
==========================  ==============================================

Example::

    name: pytorch-digits-ddp
    experiment: recipes
    framework: pytorch
    nodes: 2
    resources: {cpus: 1}
    code: .
    command: python train.py --epochs 30
    outputs:
      model: {}
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any, Literal, NamedTuple, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_serializer, field_validator, model_validator

from raybatch.spec.array import DEFAULT_OUTPUT, ArraySpec
from raybatch.spec.sweep import PARAM_PLACEHOLDER, SweepSpec
from raybatch.spec.location import parse as parse_location
from raybatch.spec import secrets as job_secrets
from raybatch.spec.units import (DURATION_HELP, MAX_GRACE_PERIOD, MAX_WALL_CLOCK_LIMIT, SIZE_HELP, duration_text,
                                 parse_bounded_duration, parse_duration, parse_duration_or_time, parse_size)

NAME_PATTERN = r"[-\w]{1,64}"  # matched with re.fullmatch
ID_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Batch AI's schedulingPriority names, mapped onto the 0-1000 integer scale.
PRIORITY_NAMES = {"low": 250, "normal": 500, "high": 750}
DEFAULT_MAX_WALL_CLOCK = 7 * 86400.0  # Batch AI's default: 7 days
DEFAULT_GRACE_PERIOD = 30.0

# Sizes a job's commands and environment may have (UTF-8 bytes). Linux refuses to start a
# process with any single argument or environment entry over 128 KiB (MAX_ARG_STRLEN), and
# all of them together over ARG_MAX (2 MiB by default): a job over them would be queued,
# then fail on every node. The job file's own limits are in raybatch.spec.loader.
MAX_COMMAND_BYTES = 100 << 10        # command, prepare: one `sh -c` argument each
MAX_ENV_ENTRY_BYTES = 100 << 10      # one environment variable, NAME=value
MAX_COMMAND_ENV_BYTES = 1 << 20      # the command and the whole environment together
MAX_SPEC_DEPTH = 64                  # nesting of a spec's mappings and lists (JSON has no aliases)

ITEM_PLACEHOLDER = "${{item}}"  # an array job's item in its command, shell-quoted

# Framework names the runner knows: raybatch.frameworks' registry (tests/test_layers.py pins them
# together; the job file's format cannot import the adapters, which import it).
KNOWN_FRAMEWORKS = ("custom", "pytorch", "tensorflow", "mpi", "chainer", "horovod")
# Frameworks whose ranks are started by mpirun (the `mpi` block applies to them).
MPI_FRAMEWORKS = ("mpi", "chainer", "horovod")


class _Strict(BaseModel):
    # NaN passes every `gt`/`<=` check (cpus: .nan would skip the fit check) and infinity is
    # no amount of anything: a spec's numbers are finite (JobSpec._finite checks the rest)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class NodeResources(_Strict):
    """What ONE node of the gang must have free: each of the job's nodes gets this."""

    cpus: float = Field(1.0, gt=0, description="Logical CPUs per node (Ray 'CPU').")
    gpus: float = Field(0.0, ge=0, description="GPUs per node (Ray 'GPU').")
    memory: Optional[int] = Field(
        None, description=f"Memory per node ({SIZE_HELP}); Ray 'memory'."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per node, e.g. {lowpri: 1} or {accelerator_type:A100: 1}.",
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)

    @field_validator("custom")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"'{name}' is a built-in resource: use cpus/gpus/memory instead")
            if amount <= 0:
                raise ValueError(f"custom resource '{name}' must be > 0 (got {amount})")
        return v

    def as_ray_bundle(self) -> dict[str, float]:
        """The placement-group bundle for one node of the gang."""
        bundle: dict[str, float] = {"CPU": float(self.cpus)}
        if self.gpus:
            bundle["GPU"] = float(self.gpus)
        if self.memory:
            bundle["memory"] = float(self.memory)
        bundle.update({k: float(v) for k, v in self.custom.items()})
        return bundle


LOCATION_HELP = ("an absolute path on every node (local disk, NFS, an Azure Files mount), az://container/path, "
                 "abfs://container@account.dfs.core.windows.net/path, datastore://name/path or "
                 "azureml://datastores/name/paths/path")


def _location(v: Optional[str]) -> Optional[str]:
    if v is not None:
        parse_location(v)  # LocationError (a ValueError) says what is wrong
    return v


def split_package(package: str) -> tuple[str, Optional[str]]:
    """An uploaded input's ``package``, ``<sha256>[/<file name>]``: (sha256, file name or None)."""
    sha, _, name = package.partition("/")
    return sha, name or None


class InputSpec(_Strict):
    """A declared input; the process sees its local path (or URI) as RAYBATCH_INPUT_<ID>."""

    mode: Optional[Literal["direct", "download", "upload"]] = Field(
        None,
        description="'download': staged onto each node (a cache shared by later jobs) before the "
        "process starts; 'direct': the path or URI is handed to the script as is; 'upload': `path` is a "
        "file or folder on the submitting machine (relative to the job file), uploaded with the job "
        "(content-addressed, like `code`; at most 200 MiB, RAYBATCH_MAX_UPLOAD_INPUT_MB) and staged onto "
        "each node like a download (Azure ML's local inputs). Default: direct for paths, download for "
        "blob storage.",
    )
    path: str = Field(..., min_length=1, description=f"Where the input is: {LOCATION_HELP}; "
                      "with mode upload, a file or folder on the submitting machine.")
    package: Optional[str] = Field(
        None, pattern=r"^[0-9a-f]{64}(/[^/\x00]+)?$",
        description="Set by the client when it uploads a `mode: upload` input: the sha256 of the zip it "
        "uploaded, and /<file name> when the input is one file.",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("mode") == "upload":
            if "://" in v:
                raise ValueError(f"'{v}' is a URI; mode upload takes a file or folder on the submitting "
                                 "machine (the job file's directory is the base of a relative one)")
            return v
        try:
            return _location(v)  # type: ignore[return-value]
        except ValueError as e:
            if "is a relative path" in str(e):
                raise ValueError(f"{e}; or, to upload a file or folder of the submitting machine with "
                                 "the job, add `mode: upload`") from None
            raise

    @model_validator(mode="after")
    def _default_mode(self) -> "InputSpec":
        if self.mode is None:
            self.mode = "direct" if parse_location(self.path).is_local else "download"
        if self.package is not None and self.mode != "upload":
            raise ValueError(f"package: only an input with mode upload has one (this one is {self.mode})")
        if self.package is not None and split_package(self.package)[1] in (".", ".."):
            raise ValueError(f"package: {self.package!r}: the file name after the sha256 cannot be '.' or '..'")
        return self


class OutputSpec(_Strict):
    """A declared output directory; the process sees it as RAYBATCH_OUTPUT_<ID>."""

    path: Optional[str] = Field(
        None, description=f"Where the output goes ({LOCATION_HELP}); default <job dir>/outputs/<id>. "
        "Blob outputs are written to a local directory and uploaded during the run and at its end.",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        return _location(v)


class TensorFlowSettings(_Strict):
    """framework: tensorflow. Without parameter servers every rank is a worker of one
    MultiWorkerMirroredStrategy cluster (worker 0 is the chief). With them, rank 0 is the
    chief (the ParameterServerStrategy coordinator), the next ``parameter_servers`` ranks
    are parameter servers and the rest are workers; the job ends when the chief does."""

    parameter_servers: int = Field(
        0, ge=0, le=1000, description="Parameter-server ranks (Batch AI's parameterServerCount); "
        "0: multi-worker all-reduce."
    )
    worker_command: Optional[str] = Field(
        None, description="What worker ranks run instead of `command` (Batch AI's workerCommandLineArgs)."
    )
    parameter_server_command: Optional[str] = Field(
        None, description="What parameter-server ranks run instead of `command` "
        "(Batch AI's parameterServerCommandLineArgs)."
    )
    workers: Optional[int] = Field(
        None, ge=1, description="Worker ranks, the chief included (Batch AI's workerCount); default: every "
        "rank that is not a parameter server. Fewer leave the job's last ranks idle: an uneven layout, as "
        "Batch AI placed 1 parameter server + 2 workers on 2 nodes (the ps beside the chief)."
    )

    @field_validator("worker_command", "parameter_server_command")
    @classmethod
    def _command_limit(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _command_size(v)


class MpiSettings(_Strict):
    """framework: mpi / chainer / horovod: rank 0 runs ``mpirun`` over a generated hostfile
    (one host per node, processes_per_node slots); the other nodes' MPI daemons are
    started through the job's rank actors, so nodes need no ssh between them."""

    mpirun_args: str = Field(
        "", description="Extra mpirun options, e.g. '--mca btl tcp,self' (the hostfile, -np, "
        "--map-by slot and --bind-to none are set by raybatch)."
    )


class CustomSettings(_Strict):
    run_on: Literal["every_rank", "first_node"] = Field(
        "every_rank", description="'every_rank': every rank runs the command; 'first_node': rank 0 "
        "alone runs it and the other nodes stay reserved for it (Batch AI's customToolkitSettings, "
        "e.g. a script that starts its own daemons on $AZ_BATCHAI_MPI_HOST_FILE's hosts)."
    )


class Packages(_Strict):
    """Python packages installed for the job on top of the node's environment: one cached
    virtualenv per distinct list on each node, built by Ray's runtime_env."""

    pip: list[str] = Field(default_factory=list, description="Requirement strings, e.g. ['chainer==7.8.1', 'numpy<2'].")
    requirements: Optional[str] = Field(
        None, description="A requirements file (relative to the job file); its lines are read at "
        "submit and added to `pip`."
    )
    installer: Literal["pip", "uv"] = Field("pip", description="pip, or uv (faster resolves and installs).")

    @field_validator("pip")
    @classmethod
    def _pip(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            item = str(item).strip()
            if not item or item.startswith("#"):
                continue
            if any(c in item for c in "\n\r\0"):
                raise ValueError(f"'{item}': one requirement per item")
            out.append(item)
        return out


class RetryPolicy(_Strict):
    """Separate budgets for infrastructure failures and user errors (like SkyPilot)."""

    infrastructure: int = Field(3, ge=0, description="Retries after node or driver loss (a node lost "
                                "without notice included).")
    evictions: Optional[int] = Field(
        None, ge=0, description="Requeues after spot (low-priority) evictions with notice: the node was "
        "drained for preemption, the job's ranks got SIGTERM and the grace period (at most the time left), "
        "and the job went back to the queue at its place. Default: unlimited; when exhausted, the next "
        "eviction fails the job.")
    user: int = Field(0, ge=0, description="Retries after the user's process exits non-zero "
                      "(or stalls).")
    user_exit_codes: Optional[list[int]] = Field(
        None, description="Retry user errors only for these exit codes (default: any non-zero)."
    )

    @field_validator("user_exit_codes")
    @classmethod
    def _codes(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None:
            bad = [c for c in v if not 1 <= c <= 255]
            if bad:
                raise ValueError(f"exit codes must be 1-255 (got {bad})")
        return v

    def retries_user_error(self, exit_code: Optional[int]) -> bool:
        return self.user_exit_codes is None or exit_code in self.user_exit_codes

    def evictions_exhausted(self, used: int) -> bool:
        """After ``used`` evictions, does one more fail the job?"""
        return self.evictions is not None and used >= self.evictions


class Placement(_Strict):
    strategy: Literal["spread", "pack"] = Field(
        "spread",
        description="'spread': each of the job's nodes on a distinct Ray node (STRICT_SPREAD); "
        "'pack': allow several of them on one Ray node (PACK).",
    )


class MetricsSpec(_Strict):
    """Where a job's metrics come from (``raybatch logs``/``GET /jobs/{id}/metrics``, a sweep's
    objective): ``raybatch.log_metric`` / ``raybatch_metrics.log_metric``, stdout lines
    ``RAYBATCH_METRIC name=value [step=N]``, and ``mlflow.log_metric`` (autolog included)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    from_: Literal["rank0", "all"] = Field("rank0", alias="from", description="rank 0's metrics, or every rank's.")
    stdout_regex: Optional[str] = Field(
        None, description="Also read metrics from stdout lines this regex matches: each named group is a "
        "metric (its name, its value), the group 'step' the step; e.g. 'epoch (?P<step>\\d+) acc (?P<accuracy>[.0-9]+)'.")

    @field_validator("stdout_regex")
    @classmethod
    def _regex(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                groups = re.compile(v).groupindex
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
            if not set(groups) - {"step"}:
                raise ValueError("name each metric with a named group, e.g. (?P<accuracy>[0-9.]+)")
        return v


def _check_finite(data: Any, root: tuple[Any, ...]) -> None:
    """ValueError naming the place of the first NaN or infinity in ``data``, or of nesting
    past MAX_SPEC_DEPTH; iterative, so no document can exhaust the stack. It runs on every
    validation of a spec (the server's included), so the walk keeps no paths: only a
    document that fails is walked again to name the place."""
    stack: list[tuple[Any, int]] = [(data, len(root))] if type(data) in (dict, list) else []
    while stack:
        container, depth = stack.pop()
        if depth >= MAX_SPEC_DEPTH:
            return _name_problem(data, root)
        for value in (container.values() if type(container) is dict else container):
            kind = type(value)
            if kind is float and not math.isfinite(value):
                return _name_problem(data, root)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))


def _name_problem(data: Any, root: tuple[Any, ...]) -> None:
    """The slow walk, with paths, of a document ``_check_finite`` found a problem in."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, root)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{'.'.join(map(str, path))}: {value} is not allowed; give a finite number")
        if isinstance(value, (dict, list)):
            if len(path) >= MAX_SPEC_DEPTH:
                raise ValueError(f"{'.'.join(map(str, path[:8]))}...: nested deeper than {MAX_SPEC_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, (*path, k)) for k, v in items)


def _command_size(v: str) -> str:
    size = len(v.encode())
    if size > MAX_COMMAND_BYTES:
        raise ValueError(f"{size} bytes; a command can be at most {MAX_COMMAND_BYTES >> 10} KiB (Linux refuses a "
                         "single argument over 128 KiB): put the script in a file shipped with `code` and run that")
    return v


class SlotShape(NamedTuple):
    """What the scheduler needs of a job that runs many units on slots (an array, a sweep)."""

    max_concurrent: int
    known_units: Optional[int]  # how many units there are, when known before the job runs
    unit_timeout: float         # a slot's lease

    @property
    def wanted_at_start(self) -> int:
        return min(self.max_concurrent, self.known_units or self.max_concurrent)


Priority = Union[Literal["low", "normal", "high"], int]

DEADLINE_HELP = "an ISO 8601 time with its time zone ('2030-05-01T18:00:00Z'), or a duration after submit ('6h')"


def parse_deadline(text: str) -> "float | dt.datetime":
    """A job's ``deadline``: seconds after submit (a duration), or an aware datetime (a time
    without a time zone is an error: raybatch.spec.units.parse_duration_or_time)."""
    return parse_duration_or_time(text, "deadline")


class JobSpec(_Strict):
    """A raybatch job: what to run, on how many nodes, with what, and where results go."""

    name: str = Field(..., description="Job name: letters, digits, '-', '_'; 1-64.")
    experiment: str = Field("default", description="Experiment the job belongs to.")
    workspace: str = Field("default", description="Workspace the job belongs to: its roles, quotas and datastores.")
    priority: Priority = Field("normal", description="low | normal | high, or an integer 0-1000.")
    preemptible: bool = Field(
        True, description="May a higher-priority job stop this one (SIGTERM, grace_period, requeue)?"
    )
    low_priority_nodes: Literal["allow", "require", "avoid"] = Field(
        "allow", description="Low-priority (spot) nodes, marked by the Ray label "
        "raybatch.io/low-priority=true or the resource raybatch_low_priority: allow, require or avoid.",
    )
    prefer_low_priority: bool = Field(
        False, description="With low_priority_nodes: allow, the autoscaler adds spot nodes for this job "
        "(cheaper, may be evicted) instead of dedicated ones, which it prefers by default.",
    )
    framework: str = Field("custom", description=f"One of: {', '.join(KNOWN_FRAMEWORKS)}.")
    command: str = Field(..., min_length=1, description="Shell command each rank runs (in the code dir).")
    prepare: Optional[str] = Field(
        None, description="Shell command run once on every node before any rank starts (Batch AI's "
        "jobPreparation), with the node's first rank's environment; its output goes to "
        "stdouterr/attempt-<n>/prepare/node-<k>/, and a non-zero exit fails the attempt at start.",
    )
    nodes: int = Field(1, ge=1, le=10000, description="Gang size: the job starts only when all fit.")
    processes_per_node: int = Field(1, ge=1, le=1024, description="Ranks per node.")
    resources: NodeResources = Field(default_factory=NodeResources)
    placement: Placement = Field(default_factory=Placement)
    code: Optional[str] = Field(
        None, description="Local directory shipped with the job (relative to the job file)."
    )
    environment: dict[str, str] = Field(default_factory=dict, description="Environment variables.")
    tensorflow: Optional[TensorFlowSettings] = Field(None, description="framework: tensorflow's layout.")
    mpi: Optional[MpiSettings] = Field(None, description="framework: mpi, chainer, horovod: mpirun options.")
    custom: Optional[CustomSettings] = Field(None, description="framework: custom: where the command runs.")
    packages: Optional[Packages] = Field(None, description="Python packages installed for the job (cached per node).")
    image: Optional[str] = Field(
        None, description="A container image the ranks run in (Ray's image_uri: needs podman on the nodes)."
    )
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    outputs: dict[str, OutputSpec] = Field(default_factory=dict)
    output_root: Optional[str] = Field(
        None,
        description="Where the job's directory (logs, outputs, checkpoints) is created: "
        f"{LOCATION_HELP}; default: the server's jobs root.",
    )
    sync_interval: float = Field(
        30.0, description="How often outputs and checkpoints in blob storage are uploaded while the "
        f"job runs ({DURATION_HELP}); logs are appended every second, and everything once more at the end.",
    )
    max_wall_clock: float = Field(
        DEFAULT_MAX_WALL_CLOCK,
        description=f"Maximum wall-clock time of an attempt ({DURATION_HELP}); at most 10 years.",
    )
    stall_timeout: Optional[float] = Field(
        None, description="Fail an attempt (STALLED) when no rank prints anything for this long "
        f"({DURATION_HELP}); default: no stall detection.",
    )
    grace_period: float = Field(
        None, validate_default=True,
        description=f"Time between SIGTERM and SIGKILL on cancel or preemption ({DURATION_HELP}); "
        "default 30 s (at most max_wall_clock, and at most 1 day).",
    )
    deadline: Optional[str] = Field(
        None, description="Finish by this time: an ISO 8601 time with its time zone ('2030-05-01T18:00:00Z', "
        f"'...+02:00'), or a duration after submit ({DURATION_HELP}). With runtime_estimate, the scheduler picks "
        "spot or dedicated nodes for the job at each start to meet it at the lowest cost (docs/scheduling.md).",
    )
    runtime_estimate: Optional[float] = Field(
        None, description=f"With deadline: the compute time the job needs on one gang ({DURATION_HELP}).",
    )
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    array: Optional[ArraySpec] = Field(
        None, description="Run the command once per item (file, index or value) on up to max_concurrent "
        "warm slots: a job array / batch scoring (docs/arrays.md).")
    sweep: Optional[SweepSpec] = Field(
        None, description="A hyperparameter sweep of this job: each trial runs it with parameters from "
        "search_space, on up to limits.max_concurrent_trials warm slots (docs/sweeps.md; a sweep file's "
        "trial: becomes this job).")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    secrets: dict[str, job_secrets.SecretValue] = Field(
        default_factory=dict, description="Environment variables of the ranks whose values are never shown "
        "(Batch AI's secrets): a value, {env: NAME} or {file: PATH} (read by the client at submit), or "
        "{keyvault: VAULT/SECRET} (read by the server at each start); shown as '***' (raybatch.spec.secrets).",
    )

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        """No NaN or infinity anywhere in the document (a sweep's space, an array's values,
        a custom resource), and no nesting past MAX_SPEC_DEPTH: walked once, iteratively,
        before any field is validated, so the error names the field."""
        _check_finite(data, ())
        return data

    @model_validator(mode="before")
    @classmethod
    def _array_output(cls, data: Any) -> Any:
        """An array job's items write below an output (outputs/<id>/items/<key>/): one that
        declares none gets ``results``."""
        if isinstance(data, dict) and data.get("array") is not None and not data.get("outputs"):
            data = {**data, "outputs": {DEFAULT_OUTPUT: {}}}
        return data

    @field_validator("name", "experiment", "workspace")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError("use 1-64 letters, digits, '-' or '_'")
        return v

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, v: Any) -> Any:
        allowed = "allowed: low, normal, high or an integer 0-1000"
        if isinstance(v, bool):
            raise ValueError(allowed)
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int):
            if not 0 <= v <= 1000:
                raise ValueError(f"out of range; {allowed}")
            return v
        if isinstance(v, str) and v.lower() in PRIORITY_NAMES:
            return v.lower()
        raise ValueError(f"unknown priority; {allowed}")

    @field_validator("output_root")
    @classmethod
    def _output_root(cls, v: Optional[str]) -> Optional[str]:
        return _location(v)

    @field_validator("sync_interval", mode="before")
    @classmethod
    def _sync_interval(cls, v: Any) -> float:
        value = parse_duration(v)
        if value < 1:
            raise ValueError("must be at least 1 s")
        return value

    @field_validator("stall_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Optional[float]:
        return None if v is None else parse_duration(v)

    @field_validator("max_wall_clock", mode="before")
    @classmethod
    def _max_wall_clock(cls, v: Any) -> float:
        return parse_bounded_duration(v, MAX_WALL_CLOCK_LIMIT, "10 years")

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline(cls, v: Any) -> Optional[str]:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError(f"deadline: expected a time or a duration ({DEADLINE_HELP})")
        if isinstance(v, (int, float)):
            return duration_text(parse_duration(v))
        parsed = parse_duration_or_time(v, "deadline")  # raises with the reason
        if isinstance(v, (dt.datetime, dt.date)):  # YAML reads an unquoted ISO time as a datetime
            assert isinstance(parsed, dt.datetime)
            return parsed.isoformat()
        return str(v).strip()

    @field_validator("runtime_estimate", mode="before")
    @classmethod
    def _runtime_estimate(cls, v: Any) -> Optional[float]:
        return None if v is None else parse_duration(v)

    @field_validator("grace_period", mode="before")
    @classmethod
    def _grace(cls, v: Any, info: ValidationInfo) -> float:
        if v is None:  # not given: 30 s, or all of a shorter max_wall_clock
            return min(DEFAULT_GRACE_PERIOD, info.data.get("max_wall_clock") or DEFAULT_GRACE_PERIOD)
        return parse_bounded_duration(v, MAX_GRACE_PERIOD, "1 day")

    @field_validator("framework")
    @classmethod
    def _framework(cls, v: str) -> str:
        if v == "cntk":
            raise ValueError(
                "CNTK has no wheel for modern Python (its last release, 2.7, is from 2019): "
                "run a CNTK job as framework 'mpi' with an image that has CNTK and Open MPI "
                "(image: <your CNTK image>), command: the script mpirun should start"
            )
        if v not in KNOWN_FRAMEWORKS:
            raise ValueError(f"unknown framework '{v}'; allowed: {', '.join(KNOWN_FRAMEWORKS)}")
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the command is empty; give the shell command each rank runs")
        return _command_size(v)

    @field_validator("prepare")
    @classmethod
    def _prepare(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _command_size(v)

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, v: Any) -> Any:
        if isinstance(v, list):  # Batch AI style: [{name, value}]
            try:
                v = {item["name"]: item["value"] for item in v}
            except (TypeError, KeyError):
                raise ValueError("a list of environment variables must hold {name, value} items")
        if isinstance(v, dict):
            out = {}
            for name, value in v.items():
                if not ENV_NAME_PATTERN.fullmatch(str(name)):
                    raise ValueError(
                        f"'{name}' is not a valid environment variable name "
                        "(letters, digits and '_', not starting with a digit)"
                    )
                if isinstance(value, (dict, list)):
                    raise ValueError(f"the value of '{name}' must be a string, number or boolean")
                if isinstance(value, bool):
                    value = "true" if value else "false"
                out[str(name)] = "" if value is None else str(value)
                entry = len(str(name).encode()) + 1 + len(out[str(name)].encode())
                if entry > MAX_ENV_ENTRY_BYTES:
                    raise ValueError(
                        f"'{name}' is {entry} bytes (NAME=value); at most {MAX_ENV_ENTRY_BYTES >> 10} KiB: Linux "
                        "refuses a larger environment entry; pass large data as a file (an input or `code`)")
            return out
        return v

    @field_validator("secrets", mode="before")
    @classmethod
    def _secrets(cls, v: Any) -> Any:
        return job_secrets.normalize(v)

    @field_serializer("secrets", when_used="always")
    def _show_secrets(self, v: dict[str, job_secrets.SecretValue]) -> dict[str, Any]:
        return job_secrets.shown(v)  # every dump: values as ***, never the values

    @model_validator(mode="after")
    def _secret_names(self) -> "JobSpec":
        job_secrets.check_names(self.secrets, self.environment)
        return self

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"path": p} if isinstance(p, str) else p) for k, p in v.items()}
        return v

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"path": p} if isinstance(p, str) else ({} if p is None else p)) for k, p in v.items()}
        return v

    @field_validator("inputs", "outputs")
    @classmethod
    def _ids(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not re.fullmatch(ID_PATTERN, key):
                raise ValueError(
                    f"id '{key}' is not allowed: use letters, digits and '_' (it becomes part of an "
                    "environment variable name)"
                )
        upper = [k.upper() for k in v]
        dupes = {k for k in upper if upper.count(k) > 1}
        if dupes:
            raise ValueError(f"ids differ only in case: {sorted(dupes)}")
        return v

    @field_validator("grace_period")
    @classmethod
    def _grace_within_limit(cls, v: float, info: ValidationInfo) -> float:
        limit = info.data.get("max_wall_clock")
        if limit is not None and v > limit:
            raise ValueError(f"must not exceed max_wall_clock ({limit:g} s)")
        return v

    @model_validator(mode="after")
    def _command_env_size(self) -> "JobSpec":
        if self.sweep is not None:  # its floats may come as text ('nan'): checked once parsed
            _check_finite(self.sweep.model_dump(), ("sweep",))
        total = len(self.command.encode()) + sum(len(k.encode()) + 2 + len(v.encode())
                                                 for k, v in self.environment.items())
        if total > MAX_COMMAND_ENV_BYTES:
            raise ValueError(f"command and environment: {total} bytes together; at most {MAX_COMMAND_ENV_BYTES >> 20} "
                             "MiB (Linux's limit on a process's arguments and environment is 2 MiB, and "
                             "raybatch adds its own variables); pass large data as a file")
        return self

    @model_validator(mode="after")
    def _framework_settings(self) -> "JobSpec":
        fw = self.framework
        for block, allowed in (("tensorflow", ("tensorflow",)), ("mpi", MPI_FRAMEWORKS), ("custom", ("custom",))):
            if getattr(self, block) is not None and fw not in allowed:
                raise ValueError(
                    f"the '{block}' block applies to framework {' / '.join(allowed)}, not '{fw}'"
                )
        tf = self.tensorflow
        if fw == "tensorflow" and tf is not None and tf.workers is not None:
            active = tf.parameter_servers + tf.workers
            if not self.world_size - self.processes_per_node < active <= self.world_size:
                raise ValueError(
                    f"tensorflow.workers: {tf.workers} worker(s) + {tf.parameter_servers} parameter server(s) = "
                    f"{active} ranks must fill the job's nodes, the last one at least partly (nodes x "
                    f"processes_per_node = {self.world_size})")
        if fw == "tensorflow" and tf is not None and tf.parameter_servers:
            need = tf.parameter_servers + 2
            if self.world_size < need or (tf.workers is not None and tf.workers < 2):
                raise ValueError(
                    f"tensorflow.parameter_servers: {tf.parameter_servers} parameter server(s) need at "
                    f"least {need} ranks (a chief, the parameter servers and one worker); the job has "
                    f"nodes x processes_per_node = {self.world_size}"
                )
        if self.image and self.packages and (self.packages.pip or self.packages.requirements):
            raise ValueError("image and packages cannot be combined: install the packages in the image")
        if self.array is not None and self.prepare:
            raise ValueError("prepare is not available in array jobs: run it at the start of the command, "
                             "or use packages / image")
        if self.array is not None and fw in MPI_FRAMEWORKS:
            raise ValueError(f"array jobs run framework custom, pytorch or tensorflow tasks, not '{fw}'")
        if self.sweep is not None and self.array is not None:
            raise ValueError("a job is either an array (array:) or a sweep (sweep:), not both")
        if self.sweep is not None and fw in MPI_FRAMEWORKS:
            raise ValueError(f"sweeps run framework custom, pytorch or tensorflow trials, not '{fw}'")
        if self.sweep is not None and self.prepare:
            raise ValueError("prepare is not available in sweeps: run it at the start of the command, "
                             "or use packages / image")
        names = PARAM_PLACEHOLDER.findall(self.command)
        if names and self.sweep is None:
            raise ValueError(f"command: ${{{{search_space.{names[0]}}}}} is a sweep parameter; this job has "
                             "no search_space (submit a sweep file)")
        unknown = sorted(set(names) - set(self.sweep.search_space)) if self.sweep else []
        if unknown:
            raise ValueError(f"command: ${{{{search_space.{unknown[0]}}}}} is not in search_space "
                             f"({', '.join(self.sweep.search_space)})")
        if ITEM_PLACEHOLDER in self.command and self.array is None:
            raise ValueError(f"command: {ITEM_PLACEHOLDER} is the item of an array job; this job has no `array` block")
        self._deadline_settings()
        return self

    def _deadline_settings(self) -> None:
        """deadline and runtime_estimate come together, on a job of one gang whose node class
        the scheduler may choose; a relative deadline must leave room for the estimate."""
        if self.deadline is None and self.runtime_estimate is None:
            return
        if self.runtime_estimate is None:
            raise ValueError("deadline: needs runtime_estimate too (the compute time the job needs on one gang, "
                             "e.g. '2h'): set both or neither")
        if self.deadline is None:
            raise ValueError("runtime_estimate: needs deadline too (a time with its time zone, or a duration "
                             "after submit such as '6h'): set both or neither")
        if self.array is not None or self.sweep is not None:
            raise ValueError("deadline: applies to a job of one gang, not to an array job or a sweep")
        if self.low_priority_nodes != "allow" or self.prefer_low_priority:
            what = (f"low_priority_nodes: {self.low_priority_nodes}" if self.low_priority_nodes != "allow"
                    else "prefer_low_priority: true")
            raise ValueError(f"deadline: the scheduler chooses spot or dedicated nodes for a job with a deadline; "
                             f"remove {what}")
        after = parse_deadline(self.deadline)
        if isinstance(after, float) and after < self.runtime_estimate:
            raise ValueError(f"deadline: {self.deadline} after submit ({after:g} s) is shorter than "
                             f"runtime_estimate ({self.runtime_estimate:g} s)")

    def deadline_at(self, submitted_at: float) -> Optional[float]:
        """The absolute deadline (epoch s) of this job submitted at ``submitted_at``; None
        without one. ValueError, naming the field and the numbers, when it is already past or
        leaves less than runtime_estimate."""
        if self.deadline is None:
            return None
        parsed = parse_deadline(self.deadline)
        at = submitted_at + parsed if isinstance(parsed, float) else parsed.timestamp()
        left = at - submitted_at
        if left <= 0:
            raise ValueError(f"deadline: {self.deadline} is already past ({-left:.0f} s ago)")
        if self.runtime_estimate is not None and left < self.runtime_estimate:
            raise ValueError(f"deadline: {self.deadline} is {left:.0f} s from now, less than runtime_estimate "
                             f"({self.runtime_estimate:g} s)")
        return at

    # ---- derived values -------------------------------------------------
    @property
    def priority_value(self) -> int:
        """The priority on the 0-1000 scale the queue sorts by (higher first)."""
        p = self.priority
        return PRIORITY_NAMES[p] if isinstance(p, str) else int(p)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def slots(self) -> Optional[SlotShape]:
        """For a job of many units on slots (an array, a sweep): its shape; else None."""
        if self.array is not None:
            a = self.array
            return SlotShape(a.max_concurrent, a.known_tasks(), a.item_timeout)
        if self.sweep is not None:
            lim = self.sweep.limits
            return SlotShape(lim.max_concurrent_trials, self.sweep.total_trials, lim.trial_timeout)
        return None
