"""An Azure ML command job or sweep job YAML (CLI v2), and the same jobs as azure-ai-ml's
``dump()`` writes them, as a raybatch job.

The two spellings of a command job::

    CLI v2 (docs, hand-written)          azure-ai-ml's job.dump()
    $schema: .../commandJob.schema.json  (no $schema)
    type: command                        type: command
    code: ./src                          component: {code: /abs/src, command: ..., environment: ...,
    command: python train.py ...                     inputs: {epochs: {type: integer, default: '6'}}}
    inputs:                              inputs:
      data: {type: uri_folder,             data: {type: uri_folder, path: azureml:./data}
             path: ./data}                 epochs: 6
      epochs: 6

A local input (a relative path, or the SDK's ``azureml:<path>``) is uploaded with the job,
as Azure ML uploads it: it becomes a raybatch input with ``mode: upload``. Typed inputs
are checked against their type and rendered as Azure ML renders them; ``$[[...]]`` parts
of the command are kept only when their optional inputs have values."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Optional

from raybatch.spec.convert.common import _Converter, _ident, _name
from raybatch.spec.sweep import SWEEP_FIELDS

_TEMPLATE = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z0-9_]+)\s*\}\}")
_OPTIONAL_PART = re.compile(r"\$\[\[(.*?)\]\]", re.S)
# azureml:<name>:<version> / azureml:<name>@latest: a registered asset, not a local path
_ASSET = re.compile(r"[A-Za-z0-9_][-A-Za-z0-9_.]*(:[^/]+|@[A-Za-z0-9_]+)")

AZUREML_DISTRIBUTIONS = ("pytorch", "mpi")
DATA_TYPES = ("uri_folder", "uri_file", "mltable", "custom_model", "mlflow_model", "triton_model")
LITERAL_TYPES = ("integer", "number", "boolean", "string")
# a component's own identity: not part of the job it runs in
_COMPONENT_ONLY = ("name", "version", "is_deterministic", "type", "$schema", "inputs", "outputs")


class _AzureML(_Converter):
    def __init__(self, doc: dict[str, Any], name_hint: str, base_dir: Optional[Path] = None):
        super().__init__()
        self.doc = doc
        self.name_hint = name_hint
        self.base_dir = base_dir

    def run(self) -> tuple[dict[str, Any], list[str]]:
        d = self._with_component(self.doc)
        out: dict[str, Any] = {"name": _name(d.get("display_name") or d.get("name") or self.name_hint)}
        if d.get("experiment_name"):
            out["experiment"] = _name(d["experiment_name"])
        if d.get("type", "command") != "command":
            self.errors.append(f"type: only command and sweep jobs are converted (got {d.get('type')!r})")
        if d.get("code"):
            code = self._code(str(d["code"]))
            if code:
                out["code"] = code
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
        absent: set[str] = set()  # optional inputs without a value
        inputs, outputs = {}, {}
        for name, spec in (d.get("inputs") or {}).items():
            ident = _ident(name)
            if isinstance(spec, dict) and ("path" in spec or str(spec.get("type", "")).startswith(DATA_TYPES)):
                item = self._data_input(name, spec)
                if item is None:
                    if spec.get("optional") and "path" not in spec:
                        absent.add(name)
                    continue
                inputs[ident] = item
                values[("inputs", name)] = f"${{RAYBATCH_INPUT_{ident.upper()}}}"
            else:  # a literal: number, string, boolean
                value = self._literal(name, spec)
                if value is None:
                    absent.add(name)
                else:
                    values[("inputs", name)] = value
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
            self.errors.append("command: required" + (" (under component:, as azure-ai-ml's dump() writes it, or "
                                                      "at the top level)" if "component" in self.doc else ""))
        else:
            out["command"] = self._command(str(command), values, absent)
        for k in ("services", "identity", "queue_settings", "tags", "properties"):
            if d.get(k):
                self.warnings.append(f"{k}: ignored")
        return self.finish(out)

    # ---- the SDK's form ---------------------------------------------------------------
    def _with_component(self, doc: dict[str, Any]) -> dict[str, Any]:
        """azure-ai-ml's dump: the command, code and environment under ``component:``,
        whose inputs declare types and defaults; the job's own inputs bind values to them.
        As one command job: the job's fields over the component's, each input the job's
        value with the component's type (or the component's default)."""
        comp = doc.get("component")
        if comp is None:
            return doc
        rest = {k: v for k, v in doc.items() if k != "component"}
        if not isinstance(comp, dict):
            self.errors.append(f"component: '{comp}' refers to a component elsewhere (a registered one or a "
                               "file); raybatch converts a command job whose component is inline, as azure-ai-ml's "
                               "dump() writes it, or a job with command and code at the top level")
            return rest
        if str(comp.get("type", "command")) != "command":
            self.errors.append(f"component.type: only command components are converted (got {comp.get('type')!r})")
        merged = {k: v for k, v in comp.items() if k not in _COMPONENT_ONLY}
        merged.update({k: v for k, v in rest.items() if v is not None and k not in ("inputs", "outputs")})
        for field in ("inputs", "outputs"):
            declared = dict(comp.get(field) or {})
            for name, value in (rest.get(field) or {}).items():
                decl = declared.get(name)
                if isinstance(decl, dict) and isinstance(value, dict):
                    declared[name] = {**decl, **value}
                elif isinstance(decl, dict) and value is not None and field == "inputs":
                    declared[name] = {**decl, "value": value}  # a literal bound to a typed input
                else:
                    declared[name] = value
            if declared:
                merged[field] = declared
        return merged

    # ---- fields -----------------------------------------------------------------------
    def _code(self, code: str) -> Optional[str]:
        if code.startswith("azureml:") and not code.startswith("azureml://"):
            rest = code[len("azureml:"):]
            if _ASSET.fullmatch(rest) and not rest.startswith((".", "/", "~")):
                self.errors.append(f"code: '{code}' is a registered code asset; raybatch uploads a local folder: "
                                   "give its path (relative to the job file)")
                return None
            code = rest
        elif code.startswith("file:") and not code.startswith("file://"):
            code = code[len("file:"):]
        if "://" in code:
            self.errors.append(f"code: '{code}' is a URI; raybatch uploads a local folder with the job: give its "
                               "path (relative to the job file)")
            return None
        return code

    def _data_input(self, name: str, spec: dict[str, Any]) -> Optional[dict[str, Any]]:
        """A uri_folder / uri_file / mltable input as a raybatch input; None when it is
        refused (the error is recorded) or optional and not given."""
        if "path" not in spec or spec["path"] in (None, ""):
            if not spec.get("optional"):
                self.errors.append(f"inputs.{name}.path: required")
            return None
        path = str(spec["path"])
        mode = str(spec.get("mode") or "ro_mount")
        if mode not in ("ro_mount", "download", "eval_download", "eval_mount", "direct"):
            self.errors.append(f"inputs.{name}.mode: '{mode}' is not an input mode (ro_mount, download, direct)")
            return None
        local = self._local_path(name, path)
        if local is False:
            return None
        if local is not None:  # uploaded with the job, as Azure ML does
            self._check_local(name, local, str(spec.get("type") or ""))
            return {"path": local, "mode": "upload"}
        if path.startswith("/") or path.startswith("~"):
            self.warnings.append(
                f"inputs.{name}.path: '{path}' is read on every node as it is (a path on a shared mount), where "
                f"Azure ML would upload it from this machine; to upload it, write it relative to the job file "
                f"(or as azureml:{path})")
        if mode == "direct":
            return {"path": path, "mode": "direct"}
        return {"path": path, "mode": "download" if "://" in path else "direct"}

    def _local_path(self, name: str, path: str):
        """The local path an input names (a relative path; the SDK's ``azureml:<path>``),
        None for a location (URI, absolute path), False when refused."""
        if path.startswith("azureml:") and not path.startswith("azureml://"):
            rest = path[len("azureml:"):]
            if _ASSET.fullmatch(rest) and not rest.startswith((".", "/", "~")):
                self.errors.append(
                    f"inputs.{name}.path: '{path}' is a registered data asset; raybatch has no asset registry: "
                    "give its datastore URI (azureml://datastores/<name>/paths/<path>) or a local path")
                return False
            return rest
        if path.startswith("file:") and not path.startswith("file://"):
            return path[len("file:"):]
        if "://" in path or path.startswith(("/", "~")):
            return None
        return path

    def _check_local(self, name: str, path: str, kind: str) -> None:
        """With the job file's directory known: the file or folder is there, of the input's type."""
        if self.base_dir is None:
            return
        p = Path(path).expanduser()
        p = (p if p.is_absolute() else self.base_dir / p).resolve()
        if not p.exists():
            self.errors.append(f"inputs.{name}.path: '{path}' does not exist (resolved to {p}); a local input is "
                               "uploaded with the job: give a file or folder relative to the job file")
        elif kind == "uri_file" and not p.is_file():
            self.errors.append(f"inputs.{name}.path: '{path}' is a folder; an input of type uri_file is one file "
                               "(use type: uri_folder for a folder)")
        elif kind in ("uri_folder", "mltable") and not p.is_dir():
            self.errors.append(f"inputs.{name}.path: '{path}' is a file; an input of type {kind} is a folder "
                               "(use type: uri_file for one file)")

    def _literal(self, name: str, spec: Any) -> Optional[str]:
        """A literal input as the command sees it (shell-quoted); None when it is optional
        and has no value. A typed input's value must be of its type."""
        if not isinstance(spec, dict):
            value, kind = spec, ""
        else:
            value = spec.get("value", spec.get("default"))
            kind = str(spec.get("type") or "").lower()
            if value is None:
                if not spec.get("optional"):
                    self.errors.append(f"inputs.{name}: no value: give the job a value for it (or the component "
                                       "a default), or declare it optional: true")
                return None
        if kind and kind not in LITERAL_TYPES:
            self.errors.append(f"inputs.{name}.type: '{kind}' is not an input type raybatch converts (allowed: "
                               f"{', '.join(LITERAL_TYPES + DATA_TYPES)})")
            return None
        text = str(value).strip() if not isinstance(value, bool) else ("True" if value else "False")
        bad = None
        if kind == "integer":
            if isinstance(value, bool) or not re.fullmatch(r"[-+]?\d+", text):
                try:
                    as_float = float(text)
                    text = str(int(as_float)) if as_float.is_integer() and not isinstance(value, bool) else ""
                except ValueError:
                    text = ""
                bad = "an integer" if not text else None
        elif kind == "number":
            try:
                float(text)
            except ValueError:
                bad = "a number"
            if isinstance(value, bool):
                bad = "a number"
        elif kind == "boolean":
            lowered = text.lower()
            if lowered in ("true", "1"):
                text = "True"
            elif lowered in ("false", "0"):
                text = "False"
            else:
                bad = "a boolean (true or false)"
        if bad:
            self.errors.append(f"inputs.{name}: {value!r} is not {bad} (the input's type is {kind})")
            return None
        return shlex.quote(text)

    def _command(self, command: str, values: dict[tuple[str, str], str], absent: set[str]) -> str:
        """``${{inputs.X}}`` / ``${{outputs.Y}}`` replaced; a ``$[[...]]`` part kept (without
        its brackets) only when every input it names has a value, as Azure ML does."""
        def part(m: re.Match) -> str:
            names = {g for kind, g in _TEMPLATE.findall(m.group(1)) if kind == "inputs"}
            return "" if names & absent else m.group(1)

        command = _OPTIONAL_PART.sub(part, command)

        def sub(m: re.Match) -> str:
            key = (m.group(1), m.group(2))
            if key not in values:
                if key[0] == "inputs" and key[1] in absent:
                    self.errors.append(f"command: ${{{{inputs.{key[1]}}}}} is optional and has no value; put it "
                                       "inside $[[...]] (left out without a value) or give it a value")
                else:
                    self.errors.append(f"command: ${{{{{key[0]}.{key[1]}}}}} names no {key[0][:-1]} of the job")
                return m.group(0)
            return values[key]

        return _TEMPLATE.sub(sub, command)


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
            if isinstance(spec, dict) and ("default" in spec or spec.get("path")):  # typed: checked as such
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
        out, notes = _AzureML(trial, self.name_hint, self.base_dir).run()
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
