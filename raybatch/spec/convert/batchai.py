"""An Azure Batch AI job.json (2018-05-01 schema) as a raybatch job.

How each Batch AI field becomes a raybatch one is tabled in docs/foreign-job-files.md.

Paths. Batch AI paths under ``$AZ_BATCHAI_MOUNT_ROOT`` or ``$AZ_BATCHAI_JOB_MOUNT_ROOT``
name file systems Batch AI mounted:

- a job-level ``mountVolumes.azureBlobFileSystems`` entry is the job's own storage: an
  ``abfs://container@account`` location (credentials from the server's datastore for the
  account, else the nodes' managed identity). Inputs below it are staged onto each node
  through the input cache; a command line that names ``$AZ_BATCHAI_JOB_MOUNT_ROOT/<rel>``
  gets the whole container staged as input ``mount_<rel>`` and reads it there;
- everything else (Azure Files shares, file servers, NFS, cluster mounts) must be mounted
  on every node by ``raybatch node-setup``: pass ``mount_root`` (``--mount-root``), where
  those mounts are (``/mnt/raybatch`` by default); the job's processes get it as
  ``AZ_BATCHAI_MOUNT_ROOT`` / ``AZ_BATCHAI_JOB_MOUNT_ROOT``.

``$AZ_BATCHAI_JOB_TEMP`` and ``$AZ_BATCHAI_SHARED_JOB_TEMP`` (and any other variable) in a
script path or command line are left to the node's shell: raybatch sets them for every
rank and for the job's ``prepare`` (Batch AI's jobPreparation), so a script a preparation
command fetched into the job's temp directory runs as it did.

A relative ``pythonScriptFilePath`` names a script next to the job file: the job file's
directory is shipped as the job's code (``code: .``), with a warning saying so."""

from __future__ import annotations

import os
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
# a mount-root variable and the path after it, in a command line
_MOUNT_REF = re.compile(r"\$(\{AZ_BATCHAI_(?:JOB_)?MOUNT_ROOT\}|AZ_BATCHAI_(?:JOB_)?MOUNT_ROOT(?![A-Za-z0-9_]))"
                        r"((?:/[^\s/\"';|&<>()]*)*)")
# toolkits without a wheel for today's Python: they run in the image the job names
IMAGE_TOOLKITS = {"cntkSettings": "CNTK", "caffeSettings": "Caffe", "caffe2Settings": "Caffe2"}
_PLACEHOLDER = re.compile(r"<[^<>]*>")
# Microsoft's recipes name the storage account so; `az batchai job create` replaced it with
# --storage-account-name or this environment variable of the submitting machine
ACCOUNT_PLACEHOLDER = "<AZURE_BATCHAI_STORAGE_ACCOUNT>"
ACCOUNT_ENV = "AZURE_BATCHAI_STORAGE_ACCOUNT"


def _blob_uri(account: str, container: str, sub: str = "") -> str:
    sub = sub.strip("/")
    return f"abfs://{container}@{account}.dfs.core.windows.net" + (f"/{sub}" if sub else "")


class _BatchAI(_Converter):
    def __init__(self, doc: dict[str, Any], name_hint: str, mount_root: Optional[str]):
        super().__init__()
        self.doc = doc
        self.p = doc["properties"] if isinstance(doc.get("properties"), dict) else doc
        self.prefix = "properties." if self.p is not doc else ""
        self.name_hint = name_hint
        self.mount_root = mount_root.rstrip("/") if mount_root else None
        self.blobs: dict[str, str] = {}          # relativeMountPath -> the blob file system's location
        self.blob_inputs: dict[str, str] = {}    # input id -> location: blob file systems command lines read
        self.relative_script = False             # a script next to the job file: ship its directory

    # ---- paths ----------------------------------------------------------------------------
    def _no_root(self, field: str, value: str, var: str) -> None:
        self.errors.append(
            f"{self.prefix}{field}: '{value}' is under a Batch AI mount ({var.strip('${}')}); "
            "give --mount-root DIR, where the same file systems are mounted on every node "
            f"({NODE_MOUNT_ROOT} on a `raybatch cluster` with a mounts file: `raybatch node-setup`)")

    def _blob_of(self, rest: str) -> Optional[tuple[str, str]]:
        """(relativeMountPath, path below it) when ``rest`` (after a mount-root variable)
        is in one of the job's blob file systems."""
        parts = rest.strip("/").split("/", 1)
        if parts[0] in self.blobs:
            return parts[0], parts[1] if len(parts) > 1 else ""
        return None

    def path(self, field: str, value: str) -> Optional[str]:
        """A Batch AI path (an input, the logs' prefix) as a raybatch location: under a job
        blob file system, its blob location; under another mount, below --mount-root; or
        None (error recorded)."""
        for var in MOUNT_VARS:
            if value.startswith(var):
                rest = value[len(var):]
                if var.strip("${}") == "AZ_BATCHAI_JOB_MOUNT_ROOT":
                    blob = self._blob_of(rest)
                    if blob:
                        return self.blobs[blob[0]] + (f"/{blob[1]}" if blob[1] else "")
                if self.mount_root is None:
                    self._no_root(field, value, var)
                    return None
                value = self.mount_root + rest
                break
        if any(var in value for var in MOUNT_VARS):
            self.errors.append(f"{self.prefix}{field}: '{value}': a mount root is only understood at the start "
                               "of a path")
            return None
        if "$" in value:
            self.errors.append(f"{self.prefix}{field}: '{value}': variables other than the mount roots are not "
                               "known when the job is submitted; give a path")
            return None
        if not value.startswith(("/", "~")) and "://" not in value:
            self.errors.append(f"{self.prefix}{field}: '{value}' is not an absolute path")
            return None
        return value

    def line(self, field: str, text: Optional[str]) -> Optional[str]:
        """A command line (script path, arguments, preparation) for the node's shell:
        ``$AZ_BATCHAI_JOB_MOUNT_ROOT/<blob>/...`` reads the blob file system's staged copy
        (``$AZ_BATCHAI_INPUT_mount_<rel>``); other mount-root references need --mount-root
        (the variable is then set on the nodes). Every other variable is the node's."""
        if not text:
            return text

        def sub(m: re.Match) -> str:
            var, rest = m.group(1).strip("{}"), m.group(2)
            blob = self._blob_of(rest) if var == "AZ_BATCHAI_JOB_MOUNT_ROOT" and rest else None
            if blob:
                ident = _ident(f"mount_{blob[0]}")
                self.blob_inputs[ident] = self.blobs[blob[0]]
                return f"${{AZ_BATCHAI_INPUT_{ident}}}" + (f"/{blob[1]}" if blob[1] else "")
            if self.mount_root is None and not missing:
                missing.append(var)
            return m.group(0)

        missing: list[str] = []
        out = _MOUNT_REF.sub(sub, text)
        if missing:
            self._no_root(field, text, missing[0])
        return out

    # ---- the job --------------------------------------------------------------------------
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
        if p.get("mountVolumes"):  # first: paths and command lines below resolve into them
            self.mount_volumes(p["mountVolumes"])
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
        secrets = self.secrets(p.get("secrets"))
        if secrets:
            out["secrets"] = secrets
        env.update(out.pop("_env", {}))
        if self.mount_root:  # scripts and command lines that read the variables themselves
            env.setdefault("AZ_BATCHAI_MOUNT_ROOT", self.mount_root)
            env.setdefault("AZ_BATCHAI_JOB_MOUNT_ROOT", self.mount_root)
        if env:
            out["environment"] = env
        inputs: dict[str, Any] = {}
        for i, item in enumerate(p.get("inputDirectories") or []):
            ident, path = item.get("id"), item.get("path")
            if not ident or not path:
                self.errors.append(f"{pre}inputDirectories[{i}]: expected {{id, path}}")
                continue
            resolved = self.path(f"inputDirectories[{i}].path", path)
            if resolved:
                inputs[_ident(ident)] = resolved
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
        if p.get("containerSettings"):
            self.container(p["containerSettings"], out)
        prep = (p.get("jobPreparation") or {}).get("commandLine")
        if prep:
            out["prepare"] = self.line("jobPreparation.commandLine", prep)
        for ident, uri in self.blob_inputs.items():
            inputs.setdefault(ident, {"path": uri, "mode": "download"})
        if inputs:
            out["inputs"] = inputs
        if self.relative_script:
            out["code"] = "."
        for k in ("performanceCountersSettings", "inputDirectoriesMountOptions"):
            if p.get(k):
                self.warnings.append(f"{pre}{k}: ignored")
        return self.finish(out)

    def secrets(self, items: Any) -> dict[str, Any]:
        """``secrets`` (EnvironmentVariableWithSecretValue: {name, value} or {name,
        valueSecretReference: {sourceVault: {id}, secretUrl}}) as raybatch's ``secrets``: a
        value stays a value, a Key Vault reference becomes ``{keyvault: <secretUrl>}``, read
        by the server with its identity at each start (the vault's resource id is implied
        by the URL)."""
        out: dict[str, Any] = {}
        for i, item in enumerate(items or []):
            field = f"{self.prefix}secrets[{i}]"
            if not isinstance(item, dict) or not item.get("name"):
                self.errors.append(f"{field}: expected {{name, value}} or {{name, valueSecretReference}}")
                continue
            ref = item.get("valueSecretReference")
            if ref is not None and item.get("value") is not None:
                self.errors.append(f"{field} ({item['name']}): give value or valueSecretReference, not both")
            elif ref is not None:
                url = ref.get("secretUrl") if isinstance(ref, dict) else None
                if not url:
                    self.errors.append(f"{field}.valueSecretReference.secretUrl: required (the Key Vault "
                                       "secret's URL, https://<vault>.vault.azure.net/secrets/<name>)")
                    continue
                out[str(item["name"])] = {"keyvault": str(url)}
            elif item.get("value") is None:
                self.errors.append(f"{field} ({item['name']}): value or valueSecretReference is required")
            else:
                out[str(item["name"])] = str(item["value"])
        return out

    def mount_volumes(self, mv: Any) -> None:
        """Job-level mountVolumes: blob file systems become the job's storage; the other file
        systems are the nodes' own mounts (`raybatch node-setup`), found under --mount-root."""
        pre = f"{self.prefix}mountVolumes"
        if not isinstance(mv, dict):
            self.errors.append(f"{pre}: expected {{azureFileShares, azureBlobFileSystems, ...}}")
            return
        for i, b in enumerate(mv.get("azureBlobFileSystems") or []):
            field = f"{pre}.azureBlobFileSystems[{i}]"
            if not isinstance(b, dict):
                self.errors.append(f"{field}: expected {{accountName, containerName, relativeMountPath}}")
                continue
            missing = [k for k in ("accountName", "containerName", "relativeMountPath") if not b.get(k)]
            if missing:
                self.errors.append(f"{field}.{missing[0]}: required")
                continue
            account, container, rel = str(b["accountName"]), str(b["containerName"]), str(b["relativeMountPath"])
            if account == ACCOUNT_PLACEHOLDER and os.environ.get(ACCOUNT_ENV):
                account = os.environ[ACCOUNT_ENV].strip()  # as `az batchai job create` filled it in
            if _PLACEHOLDER.search(account) or _PLACEHOLDER.search(container):
                self.errors.append(f"{field}: '{account}'/'{container}' is a placeholder; put your storage "
                                   f"account's and container's names (or set {ACCOUNT_ENV}, which replaces "
                                   f"{ACCOUNT_PLACEHOLDER} as the az CLI did)")
                continue
            if not re.fullmatch(r"[a-z0-9]{3,24}", account):
                self.errors.append(f"{field}.accountName: '{account}' is not a storage account name (3-24 "
                                   "lower-case letters and digits)")
                continue
            if b.get("credentials"):
                self.errors.append(f"{field}.credentials: account keys are not taken from job files (they would "
                                   "be stored with the job); define a datastore for account "
                                   f"'{account}' on the server (datastores.yaml: account: {account}, credential: "
                                   "{account_key: {env: ...}}) and remove the credentials")
            self.blobs[rel.strip("/")] = _blob_uri(account, container)
            self.warnings.append(
                f"{field} ({account}/{container}): not mounted with blobfuse; it is the job's storage at "
                f"{_blob_uri(account, container)} (credentials: the server's datastore for account '{account}', "
                f"else the nodes' managed identity): inputs below $AZ_BATCHAI_JOB_MOUNT_ROOT/{rel} are staged "
                "onto each node through the input cache, and outputs written there are uploaded"
                + ("; mountOptions ignored" if b.get("mountOptions") else "")
                + ". A container the nodes mount themselves belongs in the cluster's mounts file "
                "(`raybatch node-setup`), not in the job's mountVolumes")
        for kind, what in (("azureFileShares", "an Azure Files share"), ("fileServers", "a file server"),
                           ("unmanagedFileSystems", "a file system")):
            for i, v in enumerate(mv.get(kind) or []):
                field = f"{pre}.{kind}[{i}]"
                rel = (v or {}).get("relativeMountPath") if isinstance(v, dict) else None
                if not rel:
                    self.errors.append(f"{field}.relativeMountPath: required")
                    continue
                # never the mount command itself: it may hold a password (-o password=...)
                source = (v.get("azureFileUrl") or (v.get("fileServer") or {}).get("id")
                          or ("its mountCommand" if v.get("mountCommand") else ""))
                if self.mount_root is None:
                    self.errors.append(
                        f"{field} ({source or rel}): raybatch does not mount {what} per job; mount it on every node "
                        f"with `raybatch node-setup` (the cluster's mounts file, relativeMountPath: {rel}) and give "
                        f"--mount-root DIR, where node-setup mounts ({NODE_MOUNT_ROOT} unless its `root:` says "
                        "otherwise)")
                    continue
                if v.get("credentials"):  # a key in the job file would travel with it (e.g. shipped as code)
                    self.errors.append(f"{field}.credentials: account keys are not taken from job files; the node "
                                       "mount has its own (the cluster's mounts file): remove the credentials")
                    continue
                self.warnings.append(
                    f"{field} ({source or rel}): not mounted per job; read at {self.mount_root}/{rel}, the node "
                    f"mount `raybatch node-setup` makes from the cluster's mounts file (relativeMountPath: {rel})")

    # ---- toolkits -------------------------------------------------------------------------
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
            out["command"] = _join(python, self.line(f"{kind}.commandLineArgs", s.get("commandLineArgs")))
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
            out["command"] = self.line(f"{kind}.commandLine", line)
            if kind == "customMpiSettings":
                out["framework"] = "mpi"
                self.process_count(pre, s, out, nodes)
            else:
                out["framework"] = "custom"
                if nodes > 1:  # Batch AI ran it on the first node, the others reserved for it
                    out["custom"] = {"run_on": "first_node"}
        elif kind == "tensorFlowSettings":
            self.tensorflow(pre, s, out, nodes)
        elif kind in IMAGE_TOOLKITS:
            self.image_toolkit(pre, kind, s, out, nodes)
        else:
            self.errors.append(f"{pre} {NOT_YET}")

    def image_toolkit(self, pre: str, kind: str, s: dict[str, Any], out: dict[str, Any], nodes: int) -> None:
        """CNTK, Caffe, Caffe2: no wheel for today's Python, so they run as Batch AI ran them,
        in the job's container image. CNTK and Caffe: mpirun starts processCount processes
        (default one per node) of BrainScript's ``cntk configFile=<config> <args>`` / Caffe's
        ``caffe train --solver=<config> <args>`` or ``<python> <script> <args>`` (framework
        mpi). Caffe2: every node runs ``<python> <script> <args>`` (framework custom, one
        rank per node); its processes meet through AZ_BATCHAI_TASK_INDEX and a file store in
        AZ_BATCHAI_SHARED_JOB_TEMP, as the Batch AI recipe did."""
        toolkit = IMAGE_TOOLKITS[kind]
        reg = (self.p.get("containerSettings") or {}).get("imageSourceRegistry") or {}
        image = reg.get("image") if isinstance(reg, dict) else None
        if not image:
            self.errors.append(f"{pre}: {toolkit} has no wheel for today's Python: give the image it runs in "
                               f"(containerSettings.imageSourceRegistry.image, with {toolkit} and Open MPI), as "
                               f"Batch AI ran it; raybatch then runs the job as framework "
                               f"{'custom' if kind == 'caffe2Settings' else 'mpi'} with image:")
            return
        config, script = s.get("configFilePath"), s.get("pythonScriptFilePath")
        if config and script:
            self.errors.append(f"{pre}: give configFilePath or pythonScriptFilePath, not both")
            return
        if config and kind != "caffe2Settings":
            binary = "cntk configFile=" if kind == "cntkSettings" else "caffe train --solver="
            config_line = self.line(f"{kind}.configFilePath", config)
            if not config.startswith(("/", "$", "~")):
                self.relative_script = True
                self.note_relative(pre + ".configFilePath", config)
            quoted = f'"{config_line}"' if "$" in config_line else shlex.quote(config_line)
            command = _join(binary + quoted, self.line(f"{kind}.commandLineArgs", s.get("commandLineArgs")))
            language = "BrainScript" if kind == "cntkSettings" else "Caffe"
        else:
            python = self.python(pre, kind, s)
            if python is None:
                return
            command = _join(python, self.line(f"{kind}.commandLineArgs", s.get("commandLineArgs")))
            language = "Python"
        lang = s.get("languageType")
        if kind == "cntkSettings" and lang and str(lang).lower() != language.lower():
            self.errors.append(f"{pre}.languageType: '{lang}' does not match the settings given "
                               f"({'configFilePath' if language == 'BrainScript' else 'pythonScriptFilePath'})")
        out["command"] = command
        if kind == "caffe2Settings":
            out["framework"] = "custom"
            how = "every node runs the script (one process per node)"
        else:
            out["framework"] = "mpi"
            self.process_count(pre, s, out, nodes)
            how = "mpirun starts the processes across the nodes"
        self.warnings.append(f"{pre}: runs in image {image} as framework {out['framework']} ({how}), as Batch "
                             f"AI ran {toolkit} {language}; the image needs Ray (of the cluster's version) "
                             "besides the toolkit, since Ray starts the ranks in it (image_uri)")

    def note_relative(self, field: str, value: str) -> None:
        self.warnings.append(
            f"{self.prefix}{field}: '{value}' is relative: the job file's directory is shipped with the job as "
            "its code (like `code: .`), and the job runs there on every node")

    def python(self, pre: str, kind: str, s: dict[str, Any]) -> Optional[str]:
        """``<pythonInterpreterPath> <pythonScriptFilePath>``, or None with the error noted."""
        script = s.get("pythonScriptFilePath")
        if not script:
            self.errors.append(f"{pre}.pythonScriptFilePath: required")
            return None
        field = f"{kind}.pythonScriptFilePath"
        for var in MOUNT_VARS:  # under a cluster mount: the path below --mount-root
            rest = script[len(var):] if script.startswith(var) else None
            if rest is not None and not (var.strip("${}") == "AZ_BATCHAI_JOB_MOUNT_ROOT" and self._blob_of(rest)):
                if self.mount_root is None:
                    self._no_root(field, script, var)
                    return None
                script = self.mount_root + rest
                break
        script = self.line(field, script) or ""
        if "$" in script:  # a job-time variable (AZ_BATCHAI_JOB_TEMP, ...): the node's shell expands it
            quoted = '"' + script.replace('"', '\\"') + '"'
        else:
            if not script.startswith(("/", "~")):
                self.relative_script = True
                self.note_relative(f"{kind}.pythonScriptFilePath", script)
            quoted = shlex.quote(script)
        return _join(s.get("pythonInterpreterPath") or "python", quoted)

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
        to 1 (Batch AI's defaults); parameterServerCount 0 is the all-reduce layout. When
        the processes do not divide evenly among the nodes, every node gets as many slots
        as the fullest one and the last slots stay idle, so a parameter server shares a
        node with a worker as on Batch AI (1 ps + 2 workers on 2 nodes: chief and ps on
        the first node, the worker on the second)."""
        python = self.python(pre, "tensorFlowSettings", s)
        if python is None:
            return

        def line(args_field: str) -> str:
            return _join(python, self.line(f"tensorFlowSettings.{args_field}", s.get(args_field)))

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
        if total < nodes:
            self.errors.append(f"{pre}.workerCount: workerCount ({workers}) + parameterServerCount ({ps}) = {total} "
                               f"processes leave some of nodeCount ({nodes}) nodes without a process")
            return
        per_node = -(-total // nodes)
        out["framework"] = "tensorflow"
        out["command"] = line("masterCommandLineArgs")
        out["processes_per_node"] = per_node
        tf: dict[str, Any] = {"parameter_servers": ps}
        if total % nodes:
            tf["workers"] = workers
            self.warnings.append(f"{pre}: {total} processes on {nodes} nodes: {per_node} slots per node, the last "
                                 f"{per_node * nodes - total} idle (a parameter server shares a node with a worker, "
                                 "as on Batch AI)")
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
