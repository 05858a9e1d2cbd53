"""Job files from the services raybatch stands in for: an Azure Batch AI job.json
(2018-05-01 schema) and an Azure ML command job YAML, converted to a raybatch job.

``raybatch submit`` takes them directly; ``raybatch convert FILE`` prints the
equivalent raybatch job file. A field raybatch cannot honour is an error when the
job would run differently in a way that matters (an unsupported toolkit, job
secrets, a container image), and a warning when it is only ignored (the cluster
name, the compute target). Nothing is dropped silently.

One module per source: ``batchai`` (job.json), ``azureml`` (command and sweep YAML);
``common`` holds what they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from raybatch.spec.convert.azureml import _AzureML, _AzureMLSweep
from raybatch.spec.convert.batchai import BATCHAI_TOOLKITS, _BatchAI
from raybatch.spec.convert.common import ConversionError

__all__ = ["ConversionError", "convert", "detect"]


def detect(doc: Any) -> str:
    """'batchai', 'azureml' or 'raybatch'."""
    if not isinstance(doc, dict):
        return "raybatch"
    props = doc.get("properties") if isinstance(doc.get("properties"), dict) else doc
    if any(k in props for k in BATCHAI_TOOLKITS) or "stdOutErrPathPrefix" in props or "nodeCount" in props:
        return "batchai"
    schema = str(doc.get("$schema", ""))
    # `type:` alone marks Azure ML (a raybatch job has no such field): azure-ai-ml's dump()
    # writes no $schema, and a command job's command may sit under `component:`
    if doc.get("type") in ("command", "sweep"):
        return "azureml"
    if "azureml" in schema or (
            "command" in doc and any(k in doc for k in ("distribution", "environment_variables", "limits",
                                                          "compute", "display_name", "experiment_name"))):
        return "azureml"
    return "raybatch"


def convert(doc: dict[str, Any], *, name_hint: str = "job", mount_root: Optional[str] = None,
            base_dir: Optional[Path] = None) -> tuple[dict[str, Any], list[str]]:
    """(raybatch job document, warnings) for a Batch AI or Azure ML document;
    ConversionError lists every field that cannot be honoured. ``base_dir``: the job
    file's directory (what its relative paths are relative to), when there is a file."""
    kind = detect(doc)
    if kind == "batchai":
        return _BatchAI(doc, name_hint, mount_root).run()
    if kind == "azureml" and doc.get("type") == "sweep":
        if not isinstance(doc.get("trial"), dict):
            raise ConversionError(["trial: required: a sweep job's trial is a command job (code, command, ...)"])
        return _AzureMLSweep(doc, name_hint, base_dir).run()
    if kind == "azureml":
        return _AzureML(doc, name_hint, base_dir).run()
    return doc, []
