"""Where one job's files are, as locations (server side) and resolved accesses (nodes).

A job's directory (``<output_root>/<experiment>/<job id>``) holds, unless the job
file sends an output elsewhere::

    stdouterr/attempt-<n>/rank-<r>/{stdout,stderr}.txt      each rank's output (``rank_logs``)
    stdouterr/attempt-<n>/prepare/node-<k>/{stdout,stderr}.txt   the prepare command (``prepare_logs``)
    stdouterr/attempt-<n>/environment/node-<k>.txt          a failed environment build (``environment_log``)
    stdouterr/attempt-<n>/environment/pip-check.txt
    stdouterr/items/<task>/attempt-<k>/rank-<r>/...      an array task's output (``item_logs``)
    checkpoints/                     RAYBATCH_CHECKPOINT_DIR, kept across attempts
    outputs/<id>/                    RAYBATCH_OUTPUT_<ID>
    outputs/<id>/items/<key>/        an array item's RAYBATCH_ITEM_OUTPUT_DIR (the first output)
    items/manifest.jsonl             an array job's frozen listing: one item per line
    items/<task>.json                a finished task's record (done, or failed for good)
    stdouterr/trials/<n>/attempt-<k>/rank-<r>/...         a sweep trial's output (``trial_logs``)
    trials/trials.jsonl, ids.jsonl   a sweep's journal of ended trials (raybatch.sweep.trials)

Users see the same tree through ``raybatch files`` / ``download`` whether it is on
a local disk or in blob storage: ``stdouterr/...``, ``checkpoints/...``,
``outputs/<id>/...``."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from raybatch.spec.job import JobSpec, split_package
from raybatch.spec.location import parse
from raybatch.storage.datastores import Access, Datastores

if TYPE_CHECKING:
    from raybatch.storage.backends import Backend


def join(location: str, *parts: str) -> str:
    """A child of a location string, as a location string."""
    return parse(location).join(*parts).uri


def rank_logs(attempt: int, rank: int) -> str:
    """A rank's log directory, below ``stdouterr/``."""
    return f"attempt-{attempt}/rank-{rank}"


def prepare_logs(attempt: int, node_rank: int) -> str:
    """A node's prepare command's log directory, below ``stdouterr/``."""
    return f"attempt-{attempt}/prepare/node-{node_rank}"


def environment_log(attempt: int, node_rank: Optional[int]) -> str:
    """A failed environment build's log (a node's, or the requirements check's), below ``stdouterr/``."""
    return f"attempt-{attempt}/environment/" + (f"node-{node_rank}.txt" if node_rank is not None
                                               else "pip-check.txt")


def item_logs(task: int, attempt: int, rank: int) -> str:
    """An array task's rank log directory (attempt ``attempt`` of that task), below ``stdouterr/``."""
    return f"items/{task}/attempt-{attempt}/rank-{rank}"


def trial_logs(trial: int, attempt: int, rank: int) -> str:
    """A sweep trial's rank log directory (its run ``attempt``), below ``stdouterr/``."""
    return f"trials/{trial}/attempt-{attempt}/rank-{rank}"


def past_runs(logs: "Backend", kind: str, unit: Optional[int] = None) -> dict[int, int]:
    """The last run number with logs of each array task (``kind`` "items") or sweep trial
    ("trials"), from ``stdouterr/<kind>/<n>/attempt-<k>/`` (only unit ``unit``'s, when
    given): a later attempt of the job numbers its runs on from there, so no run's logs
    are written over."""
    out: dict[int, int] = {}
    for e in logs.list(kind if unit is None else f"{kind}/{unit}"):
        path = e.path if unit is None else f"{unit}/{e.path}"
        n, _, rest = path.partition("/")
        run = rest.split("/", 1)[0].removeprefix("attempt-")
        if n.isdigit() and run.isdigit():
            out[int(n)] = max(out.get(int(n), 0), int(run))
    return out


def job_dir_for(root: str, experiment: str, job_id: str) -> str:
    loc = parse(root)
    if loc.is_local:
        from pathlib import Path  # noqa: PLC0415

        return str((Path(loc.path) / experiment / job_id).resolve())
    return loc.join(experiment, job_id).uri


def output_location(spec: JobSpec, job_dir: str, ident: str) -> str:
    out = spec.outputs[ident]
    return parse(out.path).uri if out.path else join(job_dir, "outputs", ident)


def job_locations(spec: JobSpec, job_dir: str) -> dict[str, str]:
    """The job's file tree as users see it -> location strings."""
    tree = {"stdouterr": join(job_dir, "stdouterr"), "checkpoints": join(job_dir, "checkpoints")}
    for ident in spec.outputs:
        tree[f"outputs/{ident}"] = output_location(spec, job_dir, ident)
    if spec.array is not None:
        tree["items"] = join(job_dir, "items")
    if spec.sweep is not None:
        tree["trials"] = join(job_dir, "trials")
    return tree


def locate(spec: JobSpec, job_dir: str, path: str) -> list[tuple[str, str, str]]:
    """The roots of the job's tree that a user path touches: (tree root, location, path
    below that location). ``path`` '' is everything. ValueError when it names nothing."""
    clean = posixpath.normpath("/" + (path or "").strip()).lstrip("/")
    if clean in ("", "."):
        clean = ""
    out = []
    for root, loc in job_locations(spec, job_dir).items():
        if not clean or clean == root or root.startswith(clean + "/"):
            out.append((root, loc, ""))
        elif clean.startswith(root + "/"):
            out.append((root, loc, clean[len(root) + 1:]))
    if not out:
        roots = ", ".join(job_locations(spec, job_dir))
        raise ValueError(f"path '{path}' is not in the job's files; they are under: {roots}")
    return out


_OPTIONAL = ("items", "over", "resume_items", "trials")  # AttemptStorage's locations only some jobs have


@dataclass
class AttemptStorage:
    """What the nodes of one attempt need: every location resolved, credentials included."""

    logs: Access
    checkpoints: Access
    outputs: dict[str, Access] = field(default_factory=dict)
    inputs: dict[str, Access] = field(default_factory=dict)
    input_modes: dict[str, str] = field(default_factory=dict)
    # array jobs: the item records, the location `array.over` lists, and (resume_from) the
    # records of the job it resumes
    items: Optional[Access] = None
    over: Optional[Access] = None
    resume_items: Optional[Access] = None
    trials: Optional[Access] = None  # a sweep's trial journal

    @property
    def remote(self) -> bool:
        """Is any location outside the nodes' file systems? (An uploaded input is not: the
        driver sends it, and nothing is written back to it.)"""
        return any(a.kind not in ("local", "upload") for a in self.all())

    def all(self) -> list[Access]:
        extra = [a for a in (getattr(self, k) for k in _OPTIONAL) if a is not None]
        return [self.logs, self.checkpoints, *self.outputs.values(), *self.inputs.values(), *extra]

    def to_dict(self, secrets: bool) -> dict[str, Any]:
        conv = (lambda a: a.to_dict()) if secrets else (lambda a: a.public())
        out = {"logs": conv(self.logs), "checkpoints": conv(self.checkpoints),
               "outputs": {k: conv(a) for k, a in self.outputs.items()},
               "inputs": {k: conv(a) for k, a in self.inputs.items()},
               "input_modes": dict(self.input_modes)}
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                out[name] = conv(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttemptStorage":
        opt = {k: Access.from_dict(d[k]) for k in _OPTIONAL if d.get(k)}
        return cls(Access.from_dict(d["logs"]), Access.from_dict(d["checkpoints"]),
                   {k: Access.from_dict(a) for k, a in d.get("outputs", {}).items()},
                   {k: Access.from_dict(a) for k, a in d.get("inputs", {}).items()},
                   dict(d.get("input_modes", {})), **opt)


def upload_access(ident: str, package: Optional[str], package_zip: Optional[Callable[[str], Any]]) -> Access:
    """An input uploaded with the job (``mode: upload``): kind 'upload', ``path`` the zip
    on the server's machine (the driver reads it), ``uri`` ``upload://<sha>[/<file name>]``."""
    from raybatch.spec.location import LocationError  # noqa: PLC0415

    if not package or package_zip is None:
        raise LocationError(f"input '{ident}': mode upload, but no uploaded package is named "
                            "(submit the job with `raybatch submit` or raybatch.Client, which upload it)")
    return Access("upload", str(package_zip(split_package(package)[0])), uri=f"upload://{package}")


def resolve_attempt(spec: JobSpec, job_dir: str, datastores: Datastores,
                    resume_dir: Optional[str] = None, package_zip: Optional[Callable[[str], Any]] = None
                    ) -> AttemptStorage:
    """Resolve every location of the job (reads credential references: server side).
    ``resume_dir``: the job directory of the array job this one resumes; ``package_zip``:
    sha256 -> where the server keeps that uploaded zip (``mode: upload`` inputs)."""
    array = spec.array
    return AttemptStorage(
        logs=datastores.resolve(join(job_dir, "stdouterr")),
        checkpoints=datastores.resolve(join(job_dir, "checkpoints")),
        outputs={i: datastores.resolve(output_location(spec, job_dir, i)) for i in spec.outputs},
        inputs={i: upload_access(i, inp.package, package_zip) if inp.mode == "upload" else datastores.resolve(inp.path)
                for i, inp in spec.inputs.items()},
        input_modes={i: inp.mode for i, inp in spec.inputs.items()},
        items=datastores.resolve(join(job_dir, "items")) if array else None,
        over=datastores.resolve(array.base) if array and array.over else None,
        resume_items=datastores.resolve(join(resume_dir, "items")) if array and resume_dir else None,
        trials=datastores.resolve(join(job_dir, "trials")) if spec.sweep is not None else None,
    )


def check_locations(spec: JobSpec, output_root: Optional[str], datastores: Datastores) -> list[str]:
    """Problems with the job's locations, one per field, at submit (no credential is read)."""
    problems = []
    fields = [("output_root", output_root)] if output_root else []
    fields += [(f"inputs.{i}.path", inp.path) for i, inp in spec.inputs.items() if inp.mode != "upload"]
    fields += [(f"outputs.{i}.path", o.path) for i, o in spec.outputs.items() if o.path]
    if spec.array is not None and spec.array.over:
        fields.append(("array.over", spec.array.base))
    for name, text in fields:
        try:
            datastores.check(text)
        except ValueError as e:
            problems.append(f"{name}: {e}")
    return problems
