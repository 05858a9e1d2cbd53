"""The ``array:`` block of a job file: one job that runs its command once per item (or
per batch of items) on up to ``max_concurrent`` warm slots. Azure ML's parallel job and
Batch AI's hand-written "job factory", as one queued job.

How it maps to Azure ML's parallel job:

=====================  ===========================================
raybatch               Azure ML parallel job
=====================  ===========================================
array.over             input_data (a uri_folder, one item per file)
array.items_per_task   mini_batch_size (in files)
array.max_concurrent   instance_count x max_concurrency_per_instance
array.error_threshold  error_threshold (-1: ignore every failure)
array.item_timeout     retry_settings.timeout
array.retries          retry_settings.max_retries
=====================  ===========================================

Example::

    array:
      over: datastore://scoring/in/*.parquet   # or a path glob; or count: 200; or values: [a, b]
      items_per_task: 1
      max_concurrent: 8
      error_threshold: 0
      item_timeout: 10m
      retries: 2
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raybatch.spec.location import parse as parse_location
from raybatch.spec.units import DURATION_HELP, parse_duration

GLOB_CHARS = "*?["
DEFAULT_OUTPUT = "results"  # the output an array job gets when it declares none


def split_glob(text: str) -> tuple[str, str]:
    """``az://c/in/*.csv`` -> (``az://c/in``, ``*.csv``): the location to list, and the
    pattern (relative to it) that items must match; '' matches every file below it."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    parts = rest.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in GLOB_CHARS):
            base = "/".join(parts[:i])
            return (f"{scheme}://{base}" if sep else base), "/".join(parts[i:])
    return text.rstrip("/"), ""


def glob_match(rel: str, pattern: str) -> bool:
    """Does a relative path match a glob? ``*`` and ``?`` stay within one path segment,
    ``**`` spans any number of them (as in a shell with globstar)."""
    if not pattern:
        return True

    def match(p: list[str], r: list[str]) -> bool:
        if not p:
            return not r
        if p[0] == "**":
            return any(match(p[1:], r[i:]) for i in range(len(r) + 1))
        return bool(r) and fnmatch.fnmatchcase(r[0], p[0]) and match(p[1:], r[1:])

    return match(pattern.split("/"), rel.split("/"))


class ArraySpec(BaseModel):
    """What the items are, and how they run: each task (``items_per_task`` items) is one
    run of the job's command, with ``RAYBATCH_ARRAY_INDEX``, ``RAYBATCH_ITEM``,
    ``RAYBATCH_ITEMS_FILE`` and ``RAYBATCH_ITEM_OUTPUT_DIR`` set and ``${{item}}`` in the
    command replaced by the item (shell-quoted)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    over: Optional[str] = Field(
        None, description="Files, one item each: a path glob on every node (/data/in/*.csv) or a blob "
        "glob (az://container/in/*.parquet, datastore://name/in/**/*.json); a location without a "
        "glob means every file below it. The listing is frozen when the job starts.")
    count: Optional[int] = Field(None, ge=1, le=1_000_000, description="Items 0 .. count-1 (the item is its index).")
    values: Optional[list[Union[str, int, float, bool]]] = Field(
        None, min_length=1, max_length=1_000_000, description="One item per value (the item is the value).")
    mode: Optional[Literal["download", "direct"]] = Field(
        None, description="For `over`: 'download' stages each item onto the node (through the node's cache, "
        "the next one while the current runs) and RAYBATCH_ITEM is the local path; 'direct' hands the "
        "path or blob URL over as is. Default: direct for paths, download for blob storage.")
    items_per_task: int = Field(1, ge=1, le=100_000, description="Items per run of the command "
                                "(Azure ML's mini_batch_size); RAYBATCH_ITEMS_FILE lists them.")
    max_concurrent: int = Field(4, ge=1, le=1000, description="Slots: tasks running at once, each on "
                                "its own gang of the job's shape (nodes x resources).")
    error_threshold: int = Field(0, ge=-1, description="Failed items tolerated before the job fails; "
                                 "-1: any number (the job succeeds and `raybatch items --failed` lists them).")
    item_timeout: float = Field(3600.0, description=f"Longest run of one task ({DURATION_HELP}); a "
                                "slot is leased this long at a time.")
    retries: int = Field(2, ge=0, le=100, description="Reruns of a task whose command exits non-zero or "
                         "times out (a preempted slot never counts; a lost node or unreachable storage counts only "
                         "after retries.infrastructure free reruns).")
    resume_from: Optional[str] = Field(
        None, description="A finished or cancelled array job's id: its frozen listing is used and the "
        "items it finished are skipped (`raybatch submit --resume-from ID`).")

    @field_validator("over")
    @classmethod
    def _over(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            base, _pattern = split_glob(v.strip())
            if not base or base.endswith("://"):
                raise ValueError(f"'{v}': give the directory or container before the glob")
            parse_location(base)  # LocationError says what is wrong
        return v

    @field_validator("values", mode="before")
    @classmethod
    def _values(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, (dict, list)) or item is None:
                    raise ValueError(f"item {i}: each value must be a string or number")
        return v

    @field_validator("item_timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _one_source(self) -> "ArraySpec":
        given = [k for k in ("over", "count", "values") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of over (files), count (indices) or values (a list); "
                             + (f"got {' and '.join(given)}" if given else "got none"))
        if self.mode is not None and self.over is None:
            raise ValueError("mode applies to `over` (files) only")
        return self

    @property
    def base(self) -> Optional[str]:
        """The location `over` lists (without the glob)."""
        return split_glob(self.over)[0] if self.over else None

    @property
    def pattern(self) -> str:
        return split_glob(self.over)[1] if self.over else ""

    @property
    def item_mode(self) -> str:
        """How an `over` item reaches the process: download or direct."""
        if self.mode:
            return self.mode
        return "direct" if self.base and parse_location(self.base).is_local else "download"

    def known_tasks(self) -> Optional[int]:
        """How many tasks, when known before the listing (count, values)."""
        n = self.count if self.count is not None else (len(self.values) if self.values is not None else None)
        return None if n is None else -(-n // self.items_per_task)
