"""Job files from the services raybatch stands in for: an Azure Batch AI job.json
(2018-05-01 schema) and an Azure ML command job YAML, converted to a raybatch job.

``raybatch submit`` takes them directly; ``raybatch convert FILE`` prints the
equivalent raybatch job file. A field raybatch cannot honour is an error when the
job would run differently in a way that matters (an unsupported toolkit, job
secrets, a container image), and a warning when it is only ignored (the cluster
name, the compute target). Nothing is dropped silently.

Mount roots: Batch AI paths under ``$AZ_BATCHAI_MOUNT_ROOT`` or
``$AZ_BATCHAI_JOB_MOUNT_ROOT`` name file systems Batch AI mounted. Pass
``mount_root`` (``--mount-root``) with the directory where the same file systems
are mounted on every raybatch node."""

from __future__ import annotations

import re
import shlex
from typing import Any, Optional

from raybatch.contract import NODE_MOUNT_ROOT
from raybatch.spec.job import ID_PATTERN, NAME_PATTERN
from raybatch.spec.sweep import SWEEP_FIELDS

BATCHAI_TOOLKITS = ("pyTorchSettings", "tensorFlowSettings", "chainerSettings", "horovodSettings",
                    "customMpiSettings", "customToolkitSettings", "cntkSettings", "caffeSettings",
                    "caffe2Settings")
NOT_YET = "is not supported yet: its framework adapter comes with the frameworks issue (#6)"
AZUREML_DISTRIBUTIONS = ("pytorch", "mpi")
MOUNT_VARS = ("$AZ_BATCHAI_JOB_MOUNT_ROOT", "${AZ_BATCHAI_JOB_MOUNT_ROOT}", "$AZ_BATCHAI_MOUNT_ROOT",
              "${AZ_BATCHAI_MOUNT_ROOT}")


class ConversionError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def detect(doc: Any) -> str:
    """'batchai', 'azureml' or 'raybatch'."""
    if not isinstance(doc, dict):
        return "raybatch"
    props = doc.get("properties") if isinstance(doc.get("properties"), dict) else doc
    if any(k in props for k in BATCHAI_TOOLKITS) or "stdOutErrPathPrefix" in props or "nodeCount" in props:
        return "batchai"
    schema = str(doc.get("$schema", ""))
    if doc.get("type") == "sweep" and isinstance(doc.get("trial"), dict):  # also the SDK's dump: no $schema
        return "azureml"
    if "azureml" in schema or (doc.get("type") == "command" and "command" in doc) or (
            "command" in doc and any(k in doc for k in ("distribution", "environment_variables", "limits",
                                                          "compute", "display_name", "experiment_name"))):
        return "azureml"
    return "raybatch"


def convert(doc: dict[str, Any], *, name_hint: str = "job", mount_root: Optional[str] = None
            ) -> tuple[dict[str, Any], list[str]]:
    """(raybatch job document, warnings) for a Batch AI or Azure ML document;
    ConversionError lists every field that cannot be honoured."""
    kind = detect(doc)
    if kind == "batchai":
        return _BatchAI(doc, name_hint, mount_root).run()
    if kind == "azureml" and doc.get("type") == "sweep":
        if not isinstance(doc.get("trial"), dict):
            raise ConversionError(["trial: required: a sweep job's trial is a command job (code, command, ...)"])
        return _AzureMLSweep(doc, name_hint).run()
    if kind == "azureml":
        return _AzureML(doc, name_hint).run()
    return doc, []


def _join(*words: Optional[str]) -> str:
    return " ".join(w for w in words if w)


def _name(text: str) -> str:
    clean = re.sub(r"[^-\w]", "-", str(text)).strip("-")[:64] or "job"
    return clean if re.fullmatch(NAME_PATTERN, clean) else "job"


def _ident(text: str) -> str:
    clean = re.sub(r"\W", "_", str(text))
    return clean if re.fullmatch(ID_PATTERN, clean) else f"x_{clean}"[:64]


class _Converter:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def finish(self, out: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        if self.errors:
            raise ConversionError(self.errors)
        return out, self.warnings


class _BatchAI(_Converter):
    def __init__(self, doc: dict[str, Any], name_hint: str, mount_root: Optional[str]):
        super().__init__()
        self.doc = doc
        self.p = doc["properties"] if isinstance(doc.get("properties"), dict) else doc
        self.prefix = "properties." if self.p is not doc else ""
        self.name_hint = name_hint
        self.mount_root = mount_root.rstrip("/") if mount_root else None

    def path(self, field: str, value: str) -> Optional[str]:
        """A Batch AI path with its mount-root variable replaced, or None (error recorded)."""
        for var in MOUNT_VARS:
            if var in value:
                if self.mount_root is None:
                    self.errors.append(
                        f"{self.prefix}{field}: '{value}' is under a Batch AI mount ({var.strip('${}')}); "
                        "give --mount-root DIR, where the same file systems are mounted on every node "
                        f"({NODE_MOUNT_ROOT} on a `raybatch cluster` with a mounts file)")
                    return None
                value = value.replace(var, self.mount_root)
        if not value.startswith(("/", "~")) and "://" not in value:
            self.errors.append(f"{self.prefix}{field}: '{value}' is not an absolute path")
            return None
        return value

    def run(self) -> tuple[dict[str, Any], list[str]]:
        p, pre = self.p, self.prefix
        out: dict[str, Any] = {"name": _name(self.doc.get("name") or p.get("name") or self.name_hint)}
        if "experiment" in p or "experimentName" in self.doc:
            out["experiment"] = _name(p.get("experiment") or self.doc.get("experimentName"))
        nodes = p.get("nodeCount", 1)
        if not isinstance(nodes, int) or nodes < 1:
            self.errors.append(f"{pre}nodeCount: must be an integer >= 1 (got {nodes!r})")
            nodes = 1
        out["nodes"] = nodes
        if "cluster" in p:
            self.warnings.append(f"{pre}cluster: ignored; raybatch schedules the job on its Ray cluster")
        if "schedulingPriority" in p:
            out["priority"] = str(p["schedulingPriority"]).lower()
        wall = (p.get("constraints") or {}).get("maxWallClockTime")
        if wall:
            out["max_wall_clock"] = wall
        toolkits = [k for k in BATCHAI_TOOLKITS if p.get(k)]
        if len(toolkits) != 1:
            self.errors.append(f"{pre}: exactly one toolkit setting is required (got {toolkits or 'none'}); "
                               f"one of {', '.join(BATCHAI_TOOLKITS)}")
        else:
            self.toolkit(toolkits[0], p[toolkits[0]], out, nodes)
        env = {}
        for i, item in enumerate(p.get("environmentVariables") or []):
            if not isinstance(item, dict) or "name" not in item:
                self.errors.append(f"{pre}environmentVariables[{i}]: expected {{name, value}}")
                continue
            env[item["name"]] = "" if item.get("value") is None else str(item["value"])
        if p.get("secrets"):
            self.errors.append(f"{pre}secrets: job secrets are not supported yet (they would be stored and "
                               "shown like environment variables); keep them out of the job file and read "
                               "them from a file or a datastore credential")
        env.update(out.pop("_env", {}))
        if self.mount_root:  # scripts and command lines that read the variables themselves
            env.setdefault("AZ_BATCHAI_MOUNT_ROOT", self.mount_root)
            env.setdefault("AZ_BATCHAI_JOB_MOUNT_ROOT", self.mount_root)
        if env:
            out["environment"] = env
        inputs = {}
        for i, item in enumerate(p.get("inputDirectories") or []):
            ident, path = item.get("id"), item.get("path")
            if not ident or not path:
                self.errors.append(f"{pre}inputDirectories[{i}]: expected {{id, path}}")
                continue
            resolved = self.path(f"inputDirectories[{i}].path", path)
            if resolved:
                inputs[_ident(ident)] = resolved
        if inputs:
            out["inputs"] = inputs
        outputs = {}
        for i, item in enumerate(p.get("outputDirectories") or []):
            ident = item.get("id")
            if not ident:
                self.errors.append(f"{pre}outputDirectories[{i}]: expected {{id, pathPrefix}}")
                continue
            outputs[_ident(ident)] = {}
            self.warnings.append(
                f"{pre}outputDirectories[{i}] ({ident}): written to <job dir>/outputs/{_ident(ident)} "
                "(Batch AI's pathPrefix/pathSuffix layout is not reproduced; see `raybatch files`)")
        if outputs:
            out["outputs"] = outputs
        prefix = p.get("stdOutErrPathPrefix")
        if prefix:
            resolved = self.path("stdOutErrPathPrefix", prefix)
            if resolved:
                out["output_root"] = resolved
        if p.get("mountVolumes"):
            self.warnings.append(f"{pre}mountVolumes: raybatch does not mount file systems per job; mount "
                                 "them on every node (cluster setup commands) and use --mount-root")
        if p.get("containerSettings"):
            self.container(p["containerSettings"], out)
        prep = (p.get("jobPreparation") or {}).get("commandLine")
        if prep:
            out["prepare"] = prep
        for k in ("performanceCountersSettings", "inputDirectoriesMountOptions"):
            if p.get(k):
                self.warnings.append(f"{pre}{k}: ignored")
        return self.finish(out)

    def toolkit(self, kind: str, s: dict[str, Any], out: dict[str, Any], nodes: int) -> None:
        pre = f"{self.prefix}{kind}"
        if kind in ("pyTorchSettings", "chainerSettings", "horovodSettings"):
            # Batch AI ran `<interpreter> <script> <args>` on every rank (under mpirun for
            # chainer and horovod)
            python = self.python(pre, kind, s)
            if python is None:
                return
            out["framework"] = {"pyTorchSettings": "pytorch", "chainerSettings": "chainer",
                                "horovodSettings": "horovod"}[kind]
            out["command"] = _join(python, s.get("commandLineArgs"))
            self.process_count(pre, s, out, nodes)
            backend = s.get("communicationBackend") if kind == "pyTorchSettings" else None
            if backend:
                out["_env"] = {"AZ_BATCHAI_PYTORCH_BACKEND": str(backend).lower(),
                               "RAYBATCH_PYTORCH_BACKEND": str(backend).lower()}
            if kind == "chainerSettings" and not self.p.get("containerSettings"):
                # Batch AI's Chainer came with its image
                self.warnings.append(f"{pre}: the nodes' environment has no Chainer: give the job "
                                     "packages: {pip: [chainer==7.8.1, 'numpy<2', 'setuptools<82']} and "
                                     "environment: {SETUPTOOLS_USE_DISTUTILS: stdlib} (see "
                                     "recipes/chainer-digits-mpi), or an image with Chainer")
        elif kind in ("customToolkitSettings", "customMpiSettings"):
            line = s.get("commandLine")
            if not line:
                self.errors.append(f"{pre}.commandLine: required")
                return
            out["command"] = line
            if kind == "customMpiSettings":
                out["framework"] = "mpi"
                self.process_count(pre, s, out, nodes)
            else:
                out["framework"] = "custom"
                if nodes > 1:  # Batch AI ran it on the first node, the others reserved for it
                    out["custom"] = {"run_on": "first_node"}
        elif kind == "tensorFlowSettings":
            self.tensorflow(pre, s, out, nodes)
        elif kind in ("cntkSettings", "caffeSettings", "caffe2Settings"):
            self.errors.append(f"{pre}: no wheel exists for modern Python; run the job as framework mpi (or "
                               "custom) with an image that has it (image:)")
        else:
            self.errors.append(f"{pre} {NOT_YET}")


    def python(self, pre: str, kind: str, s: dict[str, Any]) -> Optional[str]:
        """``<pythonInterpreterPath> <pythonScriptFilePath>``, or None with the error noted."""
        script = s.get("pythonScriptFilePath")
        if not script:
            self.errors.append(f"{pre}.pythonScriptFilePath: required")
            return None
        script = self.path(f"{kind}.pythonScriptFilePath", script) if "AZ_BATCHAI" in script else script
        return _join(s.get("pythonInterpreterPath") or "python", shlex.quote(script or ""))

    def process_count(self, pre: str, s: dict[str, Any], out: dict[str, Any], nodes: int) -> None:
        count = s.get("processCount")
        if count is None:
            return
        if not isinstance(count, int) or isinstance(count, bool) or count < nodes or count % nodes:
            self.errors.append(f"{pre}.processCount: must be a multiple of nodeCount ({nodes}) so that "
                               f"every node runs as many processes; got {count!r}")
        else:
            out["processes_per_node"] = count // nodes

    def tensorflow(self, pre: str, s: dict[str, Any], out: dict[str, Any], nodes: int) -> None:
        """tensorFlowSettings -> framework tensorflow. Batch AI's master was worker 0: it
        becomes rank 0 (the chief with parameter servers, worker 0 without), so the job has
        workerCount + parameterServerCount ranks; masterCommandLineArgs is rank 0's command.
        workerCount defaults to nodeCount and parameterServerCount, for a distributed job,
        to 1 (Batch AI's defaults); parameterServerCount 0 is the all-reduce layout."""
        python = self.python(pre, "tensorFlowSettings", s)
        if python is None:
            return

        def line(args_field: str) -> str:
            return _join(python, s.get(args_field))

        workers = s.get("workerCount", nodes)
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            self.errors.append(f"{pre}.workerCount: must be an integer >= 1 (got {workers!r})")
            return
        ps = s.get("parameterServerCount")
        if ps is None:
            ps = 1 if nodes > 1 or workers > 1 else 0
            if ps:
                self.warnings.append(f"{pre}.parameterServerCount: not given: 1 parameter server (Batch AI's "
                                     "default for distributed training); give 0 for all-reduce workers "
                                     "(MultiWorkerMirroredStrategy)")
        elif not isinstance(ps, int) or isinstance(ps, bool) or ps < 0:
            self.errors.append(f"{pre}.parameterServerCount: must be an integer >= 0 (got {ps!r})")
            return
        if ps and workers < 2:
            self.errors.append(f"{pre}.workerCount: with parameterServerCount {ps}, at least 2 workers are needed "
                               f"(got {workers}): Batch AI's master (worker 0) becomes the chief, which "
                               "coordinates, and ParameterServerStrategy needs a worker besides it")
            return
        total = workers + ps
        if total % nodes:
            self.errors.append(f"{pre}.workerCount: workerCount ({workers}) + parameterServerCount ({ps}) = {total} "
                               f"processes cannot be laid out evenly on nodeCount ({nodes}) nodes; make the sum a "
                               f"multiple of {nodes}")
            return
        out["framework"] = "tensorflow"
        out["command"] = line("masterCommandLineArgs")
        out["processes_per_node"] = total // nodes
        tf: dict[str, Any] = {"parameter_servers": ps}
        if workers > 1:
            tf["worker_command"] = line("workerCommandLineArgs")
        if ps:
            tf["parameter_server_command"] = line("parameterServerCommandLineArgs")
        out["tensorflow"] = tf

    def container(self, c: Any, out: dict[str, Any]) -> None:
        """containerSettings.imageSourceRegistry.image -> image (Ray's image_uri)."""
        pre = f"{self.prefix}containerSettings"
        reg = c.get("imageSourceRegistry") if isinstance(c, dict) else None
        image = reg.get("image") if isinstance(reg, dict) else None
        if not image:
            self.errors.append(f"{pre}.imageSourceRegistry.image: required")
            return
        server = str(reg.get("serverUrl") or "").strip().rstrip("/")
        server = re.sub(r"^https?://", "", server)
        out["image"] = f"{server}/{image}" if server and not image.startswith(server) else image
        if reg.get("credentials"):
            self.errors.append(f"{pre}.imageSourceRegistry.credentials: registry credentials are not taken "
                               "from job files (they would be stored with the job); log the nodes in to the "
                               "registry (podman login) and remove the credentials")
        if c.get("shmSize"):
            self.warnings.append(f"{pre}.shmSize: ignored; Ray sets the container's shared memory")


_TEMPLATE = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z0-9_]+)\s*\}\}")


class _AzureML(_Converter):
    def __init__(self, doc: dict[str, Any], name_hint: str):
        super().__init__()
        self.doc = doc
        self.name_hint = name_hint

    def run(self) -> tuple[dict[str, Any], list[str]]:
        d = self.doc
        out: dict[str, Any] = {"name": _name(d.get("display_name") or d.get("name") or self.name_hint)}
        if d.get("experiment_name"):
            out["experiment"] = _name(d["experiment_name"])
        if d.get("type", "command") != "command":
            self.errors.append(f"type: only command and sweep jobs are converted (got {d.get('type')!r})")
        if d.get("code"):
            out["code"] = d["code"]
        env = {str(k): "" if v is None else str(v) for k, v in (d.get("environment_variables") or {}).items()}
        if env:
            out["environment"] = env
        environment = d.get("environment")
        if isinstance(environment, dict) and environment.get("image") and not environment.get("conda_file"):
            out["image"] = environment["image"]
        elif environment:
            self.warnings.append(
                "environment: Azure ML environments (registered names, conda files) are not converted; the "
                "job runs in the nodes' Python environment: give it `packages: {pip: [...]}` or `image:`")
        if d.get("compute"):
            self.warnings.append("compute: ignored; raybatch schedules the job on its Ray cluster")
        res = d.get("resources") or {}
        out["nodes"] = int(res.get("instance_count", 1))
        if res.get("instance_type"):
            self.warnings.append("resources.instance_type: ignored; set resources (cpus/gpus/memory) per node")
        timeout = (d.get("limits") or {}).get("timeout")
        if timeout:
            out["max_wall_clock"] = timeout
        dist = d.get("distribution") or {}
        kind = str(dist.get("type", "")).lower()
        if kind == "pytorch":
            out["framework"] = "pytorch"
            if dist.get("process_count_per_instance"):
                out["processes_per_node"] = int(dist["process_count_per_instance"])
        elif kind == "mpi":
            out["framework"] = "mpi"
            if dist.get("process_count_per_instance"):
                out["processes_per_node"] = int(dist["process_count_per_instance"])
        elif kind:
            self.errors.append(f"distribution.type: '{kind}' is not supported; allowed: {', '.join(AZUREML_DISTRIBUTIONS)}")
        values: dict[tuple[str, str], str] = {}
        inputs, outputs = {}, {}
        for name, spec in (d.get("inputs") or {}).items():
            ident = _ident(name)
            if isinstance(spec, dict) and ("path" in spec or spec.get("type", "").startswith(("uri_", "mltable"))):
                if "path" not in spec:
                    self.errors.append(f"inputs.{name}.path: required")
                    continue
                mode = str(spec.get("mode", "ro_mount"))
                item: dict[str, Any] = {"path": spec["path"]}
                if mode in ("ro_mount", "download", "eval_download", "eval_mount"):
                    item["mode"] = "download" if "://" in spec["path"] else "direct"
                elif mode == "direct":
                    item["mode"] = "direct"
                else:
                    self.errors.append(f"inputs.{name}.mode: '{mode}' is not an input mode "
                                       "(ro_mount, download, direct)")
                inputs[ident] = item
                values[("inputs", name)] = f"${{RAYBATCH_INPUT_{ident.upper()}}}"
            else:  # a literal: number, string, boolean
                value = spec.get("value", spec.get("default")) if isinstance(spec, dict) else spec
                values[("inputs", name)] = shlex.quote(str(value))
        for name, spec in (d.get("outputs") or {}).items():
            ident = _ident(name)
            spec = spec or {}
            item = {"path": spec["path"]} if isinstance(spec, dict) and spec.get("path") else {}
            if isinstance(spec, dict) and spec.get("mode") not in (None, "rw_mount", "upload"):
                self.errors.append(f"outputs.{name}.mode: '{spec.get('mode')}' is not an output mode "
                                   "(rw_mount, upload)")
            outputs[ident] = item
            values[("outputs", name)] = f"${{RAYBATCH_OUTPUT_{ident.upper()}}}"
        if inputs:
            out["inputs"] = inputs
        if outputs:
            out["outputs"] = outputs
        command = d.get("command")
        if not command:
            self.errors.append("command: required")
        else:
            def sub(m: re.Match) -> str:
                key = (m.group(1), m.group(2))
                if key not in values:
                    self.errors.append(f"command: ${{{{{key[0]}.{key[1]}}}}} names no {key[0][:-1]} of the job")
                    return m.group(0)
                return values[key]
            out["command"] = _TEMPLATE.sub(sub, str(command))
        for k in ("services", "identity", "queue_settings", "tags", "properties"):
            if d.get(k):
                self.warnings.append(f"{k}: ignored")
        return self.finish(out)


_SWEEP_INPUT = re.compile(r"\$\{\{\s*inputs\.([A-Za-z0-9_]+)\s*\}\}")


class _AzureMLSweep(_AzureML):
    """An Azure ML sweep job (``type: sweep``), as the CLI's YAML or as ``azure-ai-ml``'s
    ``dump()`` writes it: the trial is a command job; ``${{search_space.X}}`` stays a sweep
    parameter, and so does ``${{inputs.X}}`` when X is in the search space (the SDK binds
    the trial's inputs to it); other inputs come from the sweep's ``inputs`` or the trial's
    input defaults."""

    def run(self) -> tuple[dict[str, Any], list[str]]:
        d = self.doc
        trial = dict(d["trial"])
        space = d.get("search_space") or {}
        for k in ("type", "is_deterministic", "version", "name", "$schema"):
            trial.pop(k, None)
        command = str(trial.get("command") or "")
        # the SDK's form: ${{inputs.X}} of a search-space parameter is the parameter
        command = _SWEEP_INPUT.sub(lambda m: f"${{{{search_space.{m.group(1)}}}}}" if m.group(1) in space
                                   else m.group(0), command)
        trial["command"] = command
        inputs = dict(d.get("inputs") or {})
        for name, spec in (trial.get("inputs") or {}).items():  # the component's defaults
            if name in space or name in inputs:
                continue
            if isinstance(spec, dict) and "default" in spec:
                inputs[name] = spec["default"]
            elif isinstance(spec, dict) and spec.get("path"):
                inputs[name] = spec
            elif not isinstance(spec, dict):
                inputs[name] = spec
        trial["inputs"] = inputs
        if d.get("outputs"):
            trial["outputs"] = d["outputs"]
        for k in ("experiment_name", "compute", "tags", "identity", "queue_settings"):
            if d.get(k) and not trial.get(k):
                trial[k] = d[k]
        if d.get("display_name") or d.get("name"):
            trial["display_name"] = d.get("display_name") or d.get("name")
        if trial.get("limits"):
            self.warnings.append("trial.limits: ignored; a sweep's trials are limited by limits.trial_timeout")
            trial.pop("limits")
        out, notes = _AzureML(trial, self.name_hint).run()
        self.warnings += notes
        limits = dict(d.get("limits") or {})
        if "timeout_minutes" in limits:  # the SDK's older spelling
            limits["timeout"] = float(limits.pop("timeout_minutes")) * 60
        if "trial_timeout_minutes" in limits:
            limits["trial_timeout"] = float(limits.pop("trial_timeout_minutes")) * 60
        out["sweep"] = {k: (limits if k == "limits" else d[k]) for k in SWEEP_FIELDS if k in d}
        if isinstance(out["sweep"].get("objective"), dict):
            goal = out["sweep"]["objective"].get("goal")
            out["sweep"]["objective"] = {**out["sweep"]["objective"], "goal": str(goal).lower() if goal else goal}
        return self.finish(out)
