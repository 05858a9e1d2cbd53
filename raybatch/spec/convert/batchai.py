"""An Azure Batch AI job.json (2018-05-01 schema) as a raybatch job.

Mount roots: Batch AI paths under ``$AZ_BATCHAI_MOUNT_ROOT`` or
``$AZ_BATCHAI_JOB_MOUNT_ROOT`` name file systems Batch AI mounted. Pass
``mount_root`` (``--mount-root``) with the directory where the same file systems
are mounted on every raybatch node."""

from __future__ import annotations

import re
import shlex
from typing import Any, Optional

from raybatch.contract import NODE_MOUNT_ROOT
from raybatch.spec.convert.common import _Converter, _ident, _join, _name

BATCHAI_TOOLKITS = ("pyTorchSettings", "tensorFlowSettings", "chainerSettings", "horovodSettings",
                    "customMpiSettings", "customToolkitSettings", "cntkSettings", "caffeSettings",
                    "caffe2Settings")
NOT_YET = "is not supported yet: its framework adapter comes with the frameworks issue (#6)"
MOUNT_VARS = ("$AZ_BATCHAI_JOB_MOUNT_ROOT", "${AZ_BATCHAI_JOB_MOUNT_ROOT}", "$AZ_BATCHAI_MOUNT_ROOT",
              "${AZ_BATCHAI_MOUNT_ROOT}")



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
