"""The scheduler's policy file (``<state dir>/policy.yaml``), read by the server.

Example::

    backfill: true        # EASY backfill (false: strict priority/FIFO order)
    preemption: true      # higher priority may preempt lower (jobs can opt out)
    fair_share: true      # among equal priority, the experiment using least of its share first
    quotas:               # per experiment (of the 'default' workspace); 'default' applies to every other one
      vision: {max_nodes: 4, max_gpus: 8, share: 2}
      default: {max_nodes: 8}
    workspaces:           # per workspace: a job of workspace W counts against W's quota and share
      nlp: {max_nodes: 2, share: 1}

Workspaces contain experiments contain jobs. A job of a workspace other than 'default' is
grouped by its workspace (its quota and fair-share weight: ``workspaces``); a job of the
'default' workspace by its experiment, as before workspaces (``quotas``).
    allow_pip_sources: false  # packages.pip: only named requirements (no paths, URLs, VCS, options)
    key_vaults:           # the Key Vaults whose secrets a workspace's jobs may name (read by the server's identity)
      nlp: [nlp-kv]       # a workspace not listed: none; 'default' not listed: any (a one-team server)
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raybatch.errors import SpecError, format_validation_error
from raybatch.spec.job import NAME_PATTERN

DEFAULT_GROUP = "default"
DEFAULT_WORKSPACE = "default"
WORKSPACE_GROUP = "workspace:"  # a group name no experiment can have (':' is not in NAME_PATTERN)


def group_of(experiment: str, workspace: str = DEFAULT_WORKSPACE) -> str:
    """The quota and fair-share group of a job: its workspace's, or (in 'default') its experiment's."""
    return experiment if workspace == DEFAULT_WORKSPACE else WORKSPACE_GROUP + workspace


def group_label(group: str) -> str:
    """A group in words: "workspace 'nlp'" or "experiment 'vision'"."""
    if group.startswith(WORKSPACE_GROUP):
        return f"workspace '{group[len(WORKSPACE_GROUP):]}'"
    return f"experiment '{group}'"


class QuotaSpec(BaseModel):
    """Per-experiment limits: concurrent nodes and GPUs in use, and a fair-share weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_nodes: Optional[int] = Field(None, ge=1, description="Nodes its jobs may hold at once.")
    max_gpus: Optional[float] = Field(None, ge=0, description="GPUs its jobs may hold at once.")
    share: float = Field(1.0, gt=0, description="Fair-share weight (2 = twice the share of 1).")


class SchedulerPolicy(BaseModel):
    """The policy file, and the one policy config the scheduler reads (``policy.plan``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backfill: bool = Field(True, description="EASY backfill; false: strict order.")
    preemption: bool = Field(True, description="Higher priority may preempt lower priority.")
    fair_share: bool = Field(True, description="Order equal priorities by share used.")
    allow_pip_sources: bool = Field(
        False, description="Let jobs' packages.pip name local paths, archives, URLs, VCS repositories and pip "
        "options (-e, --index-url, ...): pip builds such entries by running their code on the nodes. Index "
        "credentials in a job are refused either way (raybatch.runtime.environment.pip_problems).")
    quotas: dict[str, QuotaSpec] = Field(
        default_factory=dict, description="Per experiment; 'default' for every other experiment."
    )
    workspaces: dict[str, QuotaSpec] = Field(
        default_factory=dict, description="Per workspace other than 'default' (whose jobs use `quotas`)."
    )
    audit_retention_days: float = Field(
        90.0, gt=0, le=36500, description="Audit log records older than this many days are deleted (hourly, by "
        "the server). Azure's activity log keeps 90 days.")
    key_vaults: dict[str, list[str]] = Field(
        default_factory=dict, description="Workspace -> the Key Vault names its jobs' secrets may reference: the "
        "server reads them with its own identity, so a workspace must not name another's vault. A workspace not "
        "listed may name none; 'default', when not listed, any.")

    def vault_problem(self, workspace: str, vault: str) -> Optional[str]:
        """Why a job of ``workspace`` may not read secrets from Key Vault ``vault``, or None."""
        allowed = self.key_vaults.get(workspace)
        if allowed is None:
            if workspace == DEFAULT_GROUP:
                return None
            return (f"workspace '{workspace}' may name no Key Vault: a cluster admin lists its vaults in "
                    f"policy.yaml (key_vaults: {{{workspace}: [<vault>]}})")
        if vault.lower() not in {v.lower() for v in allowed}:
            return (f"Key Vault '{vault}' is not one of workspace '{workspace}''s "
                    f"({', '.join(allowed) or 'none'}; policy.yaml key_vaults)")
        return None

    @field_validator("workspaces")
    @classmethod
    def _workspace_names(cls, v: dict[str, QuotaSpec]) -> dict[str, QuotaSpec]:
        _check_names(v, "a workspace")
        if DEFAULT_WORKSPACE in v:
            raise ValueError("'default': the default workspace's jobs are grouped by experiment; set their "
                             "limits under `quotas`")
        return v

    @field_validator("quotas")
    @classmethod
    def _names(cls, v: dict[str, QuotaSpec]) -> dict[str, QuotaSpec]:
        _check_names(v, "an experiment")
        return v

    def quota(self, group: str) -> QuotaSpec:
        """A group's quota: a workspace's own (else no limits); an experiment's own, else the
        'default' entry, else no limits."""
        if group.startswith(WORKSPACE_GROUP):
            return self.workspaces.get(group[len(WORKSPACE_GROUP):]) or _NO_QUOTA
        return self.quotas.get(group) or self.quotas.get(DEFAULT_GROUP) or _NO_QUOTA

    @property
    def limited_groups(self) -> frozenset[str]:
        """Groups with a node or GPU limit of their own ('default': every other experiment)."""
        return frozenset([g for g, q in self.quotas.items() if q.max_nodes is not None or q.max_gpus is not None]
                         + [WORKSPACE_GROUP + w for w, q in self.workspaces.items()
                            if q.max_nodes is not None or q.max_gpus is not None])


def _check_names(names: Any, what: str) -> None:
    for name in names:
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"'{name}' is not {what} name (1-64 letters, digits, '-', '_')")


_NO_QUOTA = QuotaSpec()


def load_policy(path: Path) -> SchedulerPolicy:
    """Read the policy file; a missing file means the defaults."""
    if not path.is_file():
        return SchedulerPolicy()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(str(path), [f"not valid YAML: {err}"], "policy file") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), ["(top level): the policy file must be a YAML mapping"], "policy file")
    try:
        return SchedulerPolicy.model_validate(data)
    except ValidationError as err:
        raise SpecError(str(path), format_validation_error(err, SchedulerPolicy), "policy file") from None
