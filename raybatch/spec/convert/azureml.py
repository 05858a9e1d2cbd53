"""An Azure ML command job or sweep job YAML (CLI v2) as a raybatch job."""

from __future__ import annotations

import re
import shlex
from typing import Any

from raybatch.spec.convert.common import _Converter, _ident, _name
from raybatch.spec.sweep import SWEEP_FIELDS

_TEMPLATE = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z0-9_]+)\s*\}\}")

AZUREML_DISTRIBUTIONS = ("pytorch", "mpi")

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
