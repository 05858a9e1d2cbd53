"""Loading a job file: YAML -> ``--set`` overrides -> ``JobSpec``, with errors that
name the field, say what was wrong and what is allowed."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml
from pydantic import ValidationError

from raybatch.config import ENV_MAX_UPLOAD_INPUT_MB, max_upload_input_bytes
from raybatch.errors import SpecError, format_validation_error
from raybatch.spec.secrets import resolve_local
from raybatch.spec.job import JobSpec
from raybatch.spec.sweep import SWEEP_FIELDS


# ---- limits of a job file -------------------------------------------------------------
# A job file is read, parsed and validated on the submitting machine (and its JSON again by
# the server): a hostile or broken one must be refused in bounded time and memory, with a
# message that names the limit. Each limit is far above any real job (the recipes' largest
# file is a few KiB) and far below what would hurt (benchmarks/bench_bad_input.py: every
# refusal under 1 s and 200 MB). The fields' own limits (the command at most 100 KiB, the
# command and environment together at most 1 MiB) are in raybatch.spec.job, so that the
# server applies them to a spec that comes as JSON.
MAX_JOB_FILE_BYTES = 1 << 20      # a job file, a Batch AI job.json, an Azure ML YAML, a requirements file
MAX_YAML_ALIASES = 1000           # alias uses (*name) in one document
MAX_YAML_NODES = 250_000          # nodes of the document with every alias expanded ("billion laughs")
MAX_YAML_TEXT = 4 << 20           # characters of its scalars with every alias expanded
MAX_YAML_DEPTH = 64               # nesting of mappings and lists
MAX_PROBLEM_CHARS = 1000          # a problem line quotes at most this much of a bad value

_LIMIT_HINT = "(raybatch.spec.loader limits: {} MiB, {} aliases, {} values and {} MiB of text expanded, depth {})".format(
    MAX_JOB_FILE_BYTES >> 20, MAX_YAML_ALIASES, MAX_YAML_NODES, MAX_YAML_TEXT >> 20, MAX_YAML_DEPTH)


def read_text_file(path: Path, source: str, what: str = "job file", field: str = "") -> str:
    """A job file's text, read within ``MAX_JOB_FILE_BYTES``: the size is checked before
    anything is read (and the read stops one byte past it, for a file that grows), and
    the bytes must be UTF-8. Every failure, a missing, unreadable or non-regular file
    included, is a ``SpecError`` naming the file and what was wrong."""
    where = f"{field}: " if field else ""

    def refuse(problem: str) -> SpecError:
        return SpecError(source, [f"{where}{problem}"], what)

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise refuse(f"no such {what}: {path}") from None
    except OSError as e:
        raise refuse(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise refuse(f"{path} is a directory; give a {what} (YAML or JSON)")
    if not stat.S_ISREG(st.st_mode):
        raise refuse(f"{path} is not a regular file; give a {what} (YAML or JSON)")
    too_big = (f"{path} is larger than {MAX_JOB_FILE_BYTES >> 20} MiB, the limit for a {what} "
               "(MAX_JOB_FILE_BYTES); put large data in an input, not in the file")
    if st.st_size > MAX_JOB_FILE_BYTES:
        raise refuse(f"{too_big} (it has {st.st_size} bytes)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as e:
        raise refuse(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise refuse(too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise refuse(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); "
                     "save the file as UTF-8") from None


class _YamlLimit(ValueError):
    """A YAML document over one of the limits above."""


def _check_yaml_shape(text: str) -> None:
    """Walk the document's parse events (libyaml, no objects built) and refuse one whose
    aliases expand past ``MAX_YAML_NODES`` values or ``MAX_YAML_TEXT`` characters (each
    anchor's expanded size is counted once, an alias adds it), that uses more than ``MAX_YAML_ALIASES`` aliases or one that refers to
    a node containing it, or that nests deeper than ``MAX_YAML_DEPTH``. PyYAML would build
    a billion-laughs document as a small graph of shared lists, but everything after it
    (validation, JSON, the store) walks it as the tree it stands for."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    frames: list[list[Any]] = []  # [values, characters, anchor] so far, per open collection
    sizes: dict[str, tuple[int, int]] = {}  # anchor: its (values, characters) expanded
    aliases = 0

    def add(n: int, chars: int) -> None:
        if frames:
            top = frames[-1]
            top[0] += n
            top[1] += chars
            if top[0] > MAX_YAML_NODES:
                raise _YamlLimit(f"the document expands to more than {MAX_YAML_NODES} values "
                                 f"(aliases expanded) {_LIMIT_HINT}")
            if top[1] > MAX_YAML_TEXT:
                raise _YamlLimit(f"the document expands to more than {MAX_YAML_TEXT >> 20} MiB of text "
                                 f"(aliases expanded) {_LIMIT_HINT}")

    for ev in yaml.parse(text, Loader=loader):
        if isinstance(ev, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"more than {MAX_YAML_ALIASES} aliases (*name) {_LIMIT_HINT}")
            if ev.anchor not in sizes:
                if any(f[2] == ev.anchor for f in frames):
                    raise _YamlLimit(f"alias *{ev.anchor} refers to a value that contains it (a cycle)")
                continue  # undefined: PyYAML says so, with the line
            add(*sizes[ev.anchor])
        elif isinstance(ev, yaml.ScalarEvent):
            if ev.anchor:
                sizes[ev.anchor] = (1, len(ev.value))
            add(1, len(ev.value))
        elif isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            frames.append([1, 0, ev.anchor])
            if len(frames) > MAX_YAML_DEPTH:
                mark = ev.start_mark
                raise _YamlLimit(f"line {mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels {_LIMIT_HINT}")
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            n, chars, anchor = frames.pop()
            if anchor:
                sizes[anchor] = (n, chars)
            add(n, chars)


def safe_yaml(text: str, source: str, what: str = "job file", field: str = "") -> Any:
    """``yaml.safe_load`` within the limits above; any failure a ``SpecError`` that says
    where and what (never a traceback)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    where = f"{field}: " if field else ""
    try:
        _check_yaml_shape(text)
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader (libyaml's when there)
    except _YamlLimit as e:
        raise SpecError(source, [f"{where}{e}"], what) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(source, [f"{where}{at}not valid YAML: {getattr(err, 'problem', None) or err}"],
                        what) from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise SpecError(source, [f"{where}a value YAML cannot read: {str(e)[:200]}"], what) from None


def _clip(problem: str) -> str:
    """A problem line that quotes at most ``MAX_PROBLEM_CHARS`` of the bad value (a 50 MB
    command must not come back in full in its own error); one the whole document's check
    raised (JobSpec._finite) named by its field, not '(top level)'."""
    top = "(top level): "
    if problem.startswith(top) and " " not in problem[len(top):].split(": ", 1)[0]:
        problem = problem[len(top):]
    if len(problem) <= MAX_PROBLEM_CHARS:
        return problem
    return f"{problem[:MAX_PROBLEM_CHARS]}... ({len(problem) - MAX_PROBLEM_CHARS} more characters)"


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], source: str) -> dict[str, Any]:
    """``--set nodes=3 --set resources.cpus=2 --set environment.LR=0.1``: dotted keys,
    YAML-typed values."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(source, [f"--set {item!r}: expected key=value, e.g. --set nodes=2"])
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise SpecError(source, [f"--set {item!r}: empty key"])
        try:
            value = safe_yaml(raw, source, "--set value", f"--set {key}") if raw.strip() else ""
        except SpecError as e:
            if "not valid YAML" not in e.problems[0]:
                raise  # over a limit: refused, not taken as text
            value = raw
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise SpecError(source, [f"--set {key}: '{p}' is not a mapping"])
            node = child
        node[parts[-1]] = value
    return data


def parse_job(
    data: Any, *, base_dir: Path | None = None, source: str = "<job>", check_paths: bool = True
) -> JobSpec:
    """Validate a job document. ``code`` is resolved against ``base_dir`` and must exist."""
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): a job file must be a YAML mapping of fields"])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, [_clip(p) for p in format_validation_error(err, JobSpec)]) from None
    if spec.code is not None and check_paths:
        code = Path(spec.code).expanduser()
        if not code.is_absolute() and base_dir is not None:
            code = base_dir / code
        code = code.resolve()
        if not code.is_dir():
            raise SpecError(
                source, [f"code: directory '{spec.code}' does not exist (resolved to {code}); "
                         "give a directory relative to the job file or an absolute one"]
            )
        spec.code = str(code)
    if spec.packages is not None and check_paths:
        _inline_requirements(spec, base_dir, source)
    if check_paths:
        _resolve_uploads(spec, base_dir, source)
    if check_paths and spec.secrets:  # {env:} and {file:} name this machine: read them here (spec.secrets)
        try:
            spec.secrets = resolve_local(spec.secrets, base_dir)
        except ValueError as e:
            raise SpecError(source, [str(e)]) from None
    return spec


def upload_files(path: Path) -> list[tuple[str, Path]]:
    """What uploading a file or folder sends, in order: (name in the zip, file). A file is
    itself; a folder, every file below it (none skipped: it is data)."""
    import os  # noqa: PLC0415

    if path.is_file():
        return [(path.name, path)]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        files += [(Path(dirpath, n).relative_to(path).as_posix(), Path(dirpath, n)) for n in sorted(filenames)]
    return files


def upload_problem(path: Path, limit: int) -> Optional[str]:
    """Why a file or folder cannot be uploaded with the job (None: it can): it holds no
    file, or more than ``limit`` bytes (counting stops there)."""
    files, total = 0, 0
    for _name, p in upload_files(path):
        try:
            total += p.stat().st_size
        except OSError:
            continue
        files += 1
        if total > limit:
            return (f"holds more than {limit / 2**20:.4g} MiB, the limit for an input uploaded with the job "
                    f"({ENV_MAX_UPLOAD_INPUT_MB}); put the data in blob storage or a datastore and give "
                    "that location instead")
    return None if files else "holds no file"


def _resolve_uploads(spec: JobSpec, base_dir: Path | None, source: str) -> None:
    """``mode: upload`` inputs: each path resolved against the job file's directory; it
    must be a file or a folder holding files, within the upload limit (checked here, so a
    bad one fails before anything is sent)."""
    problems = []
    try:
        limit = max_upload_input_bytes()
    except ValueError as e:
        raise SpecError(source, [str(e)]) from None
    for ident, inp in spec.inputs.items():
        if inp.mode != "upload":
            continue
        path = Path(inp.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        path = path.resolve()
        if not path.exists():
            problems.append(f"inputs.{ident}.path: '{inp.path}' does not exist (resolved to {path}); an input "
                            "with mode upload is a file or folder on this machine, relative to the job file")
            continue
        problem = upload_problem(path, limit)
        if problem:
            problems.append(f"inputs.{ident}.path: '{inp.path}' ({path}) {problem}")
            continue
        inp.path = str(path)
    if problems:
        raise SpecError(source, problems)


# pip options a requirements line may carry that need nothing local (Ray writes the list
# into a requirements file on each node, options included)
_PASS_OPTIONS = ("--index-url", "-i", "--extra-index-url", "--no-index", "--find-links", "-f", "--pre",
                 "--only-binary", "--no-binary", "--prefer-binary", "--trusted-host")


def _read_requirements(path: Path, field: str, seen: tuple[Path, ...] = ()) -> list[str]:
    """A requirements file's requirement lines: comments, blank lines and continuations
    handled, ``-r`` includes inlined (relative to the including file); what would need a
    file on the nodes is refused."""
    import re  # noqa: PLC0415

    path = path.resolve()
    if path in seen:
        raise ValueError(f"{field}: '{path}' includes itself (through -r)")
    try:
        text = read_text_file(path, str(path), "requirements file", field)
    except SpecError as e:
        raise ValueError(e.problems[0]) from None
    out: list[str] = []
    logical, first = "", 0
    lines = text.splitlines()
    for number, raw in enumerate(lines, 1):
        if not logical:
            first = number
        if raw.endswith("\\") and number < len(lines):
            logical += raw[:-1]
            continue
        line, logical = re.sub(r"(^|\s+)#.*$", "", logical + raw).strip(), ""
        if not line:
            continue
        where = f"{field}: {path.name} line {first}"
        head = line.split(None, 1)[0].split("=", 1)[0]
        if head in ("-r", "--requirement"):
            target = line[len(head):].lstrip(" =")
            if not target:
                raise ValueError(f"{where}: -r needs a file name")
            out += _read_requirements(path.parent / Path(target).expanduser(), field, (*seen, path))
        elif head in ("-c", "--constraint"):
            raise ValueError(f"{where}: constraints files (-c) are not supported; pin the versions "
                             "in the requirements instead")
        elif head in ("-e", "--editable"):
            raise ValueError(f"{where}: editable installs (-e) need the source on every node; "
                             "ship it with `code` and install it in the command, or build a wheel")
        elif head.startswith("-") and head not in _PASS_OPTIONS:
            raise ValueError(f"{where}: pip option '{head}' is not supported here (allowed: "
                             f"{', '.join(o for o in _PASS_OPTIONS if o.startswith('--'))})")
        elif line.startswith((".", "/", "~", "file:")):
            raise ValueError(f"{where}: '{line}' is a local path, which the nodes do not have; "
                             "use a package index (or --find-links URL)")
        else:
            out.append(line)
    return out


def _inline_requirements(spec: JobSpec, base_dir: Path | None, source: str) -> None:
    """``packages.requirements`` (and ``-r FILE`` items of ``packages.pip``), read now on
    the submitting machine, relative to the job file: their lines go into ``packages.pip``
    (the file's first, in order) and ``requirements`` is cleared, so the stored spec lists
    every requirement and needs no file on the nodes."""
    pkgs = spec.packages

    def resolve(name: str) -> Path:
        p = Path(name).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p

    problems, lines = [], []
    if pkgs.requirements:
        path = resolve(pkgs.requirements)
        if not path.is_file():
            problems.append(f"packages.requirements: file '{pkgs.requirements}' does not exist (resolved "
                            f"to {path.resolve()}); give a path relative to the job file or an absolute one")
        else:
            try:
                lines += _read_requirements(path, "packages.requirements")
            except ValueError as e:
                problems.append(str(e))
    for item in pkgs.pip:
        head = item.split(None, 1)[0].split("=", 1)[0]
        if head not in ("-r", "--requirement"):
            lines.append(item)
            continue
        target = item[len(head):].lstrip(" =")
        path = resolve(target)
        if not path.is_file():
            problems.append(f"packages.pip: '{item}': file '{target}' does not exist (resolved to "
                            f"{path.resolve()})")
            continue
        try:
            lines += _read_requirements(path, "packages.pip")
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise SpecError(source, problems)
    if spec.image and lines:
        raise SpecError(source, ["(top level): image and packages cannot be combined: install the "
                                 "packages in the image"])
    pkgs.pip = lines
    pkgs.requirements = None


class ConversionWarning(UserWarning):
    """A Batch AI / Azure ML field raybatch ignores (the job still runs as intended)."""


def load_job_file(path: str | Path, overrides: Iterable[str] = (), mount_root: str | None = None) -> JobSpec:
    """Read and validate a job file (raybatch, Batch AI job.json or Azure ML command job);
    raise ``SpecError`` with every problem found. Conversion warnings are issued as
    ``ConversionWarning``."""
    import warnings  # noqa: PLC0415

    spec, notes = load_job_document(path, overrides, mount_root)
    for note in notes:
        warnings.warn(note, ConversionWarning, stacklevel=2)
    return spec


def read_document(path: str | Path, mount_root: str | None = None) -> tuple[Any, str, list[str]]:
    """The file as a raybatch job document: (document, 'raybatch' | 'sweep' | 'batchai' |
    'azureml', conversion warnings)."""
    from raybatch.spec.convert import ConversionError, convert, detect  # noqa: PLC0415

    p = Path(path)
    source = str(path)
    data = safe_yaml(read_text_file(p, source), source)  # JSON (Batch AI) is YAML too
    kind = detect(data)
    if kind == "raybatch" and is_sweep_file(data):
        return sweep_document(data, p.parent.resolve(), source, mount_root), "sweep", []
    if kind == "raybatch":
        return data, kind, []
    label = {"batchai": "Batch AI job file", "azureml": "Azure ML job file"}[kind]
    try:
        converted, notes = convert(data, name_hint=p.stem, mount_root=mount_root, base_dir=p.parent.resolve())
    except ConversionError as e:
        raise SpecError(source, e.problems, label) from None
    return converted, kind, notes


SWEEP_FILE_FIELDS = ("name", "experiment", "priority", "preemptible", "trial", *SWEEP_FIELDS)


def is_sweep_file(data: Any) -> bool:
    return isinstance(data, dict) and "trial" in data and "search_space" in data


def _rebase_requirement_item(item: str, rebased: Callable[[str], str]) -> str:
    """``-r FILE`` / ``--requirement=FILE`` with FILE rebased; any other item as it is."""
    head = item.split(None, 1)[0].split("=", 1)[0]
    if head not in ("-r", "--requirement"):
        return item
    return f"{head} {rebased(item[len(head):].lstrip(' ='))}"


def sweep_document(data: dict[str, Any], base_dir: Path, source: str, mount_root: str | None = None
                   ) -> dict[str, Any]:
    """A sweep file as the job it runs: the trial's job (a file next to it, in any format
    raybatch reads, or inline), with the sweep's name, experiment, priority and
    preemptible, and a ``sweep:`` block with the rest."""
    unknown = sorted(set(data) - set(SWEEP_FILE_FIELDS))
    if unknown:
        raise SpecError(source, [f"{k}: unknown field; allowed: {', '.join(sorted(SWEEP_FILE_FIELDS))}"
                                 for k in unknown], "sweep file")
    trial = data["trial"]
    if isinstance(trial, str):
        path = Path(trial).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise SpecError(source, [f"trial: no such job file '{trial}' (resolved to {path}); give a job file "
                                     "relative to the sweep file, or the job inline"], "sweep file")
        doc, _kind, _notes = read_document(path, mount_root)
        trial_dir = path.parent.resolve()
    elif isinstance(trial, dict):
        doc, trial_dir = dict(trial), base_dir
    else:
        raise SpecError(source, ["trial: give a job file's path or the job inline"], "sweep file")
    doc = dict(doc or {})
    def rebased(name: str) -> str:  # a path of the trial's file is relative to that file
        p = Path(name).expanduser()
        return name if p.is_absolute() else str((trial_dir / p).resolve())

    if doc.get("code"):
        doc["code"] = rebased(str(doc["code"]))
    if isinstance(doc.get("inputs"), dict):  # files uploaded with the job: next to the trial's file
        doc["inputs"] = {k: ({**v, "path": rebased(v["path"])} if isinstance(v, dict) and v.get("mode") == "upload"
                             and isinstance(v.get("path"), str) else v) for k, v in doc["inputs"].items()}
    pkgs = doc.get("packages")
    if isinstance(pkgs, dict):
        pkgs = doc["packages"] = dict(pkgs)
        if isinstance(pkgs.get("requirements"), str):
            pkgs["requirements"] = rebased(pkgs["requirements"])
        if isinstance(pkgs.get("pip"), list):
            pkgs["pip"] = [_rebase_requirement_item(x, rebased) if isinstance(x, str) else x for x in pkgs["pip"]]
    doc.pop("sweep", None)
    for k in ("name", "experiment", "priority", "preemptible"):
        if k in data:
            doc[k] = data[k]
    doc["sweep"] = {k: data[k] for k in SWEEP_FIELDS if k in data}
    return doc


def load_job_document(path: str | Path, overrides: Iterable[str] = (), mount_root: str | None = None
                      ) -> tuple[JobSpec, list[str]]:
    """Like ``load_job_file``, returning the conversion warnings instead of issuing them."""
    p = Path(path)
    source = str(path)
    data, kind, notes = read_document(path, mount_root)
    if data is None:
        data = {}
    if isinstance(data, dict):
        data = apply_overrides(data, overrides, source)
    sweep_file = kind == "sweep" or (isinstance(data, dict) and kind == "azureml" and "sweep" in data)
    try:
        return parse_job(data, base_dir=p.parent.resolve(), source=source), notes
    except SpecError as e:
        if not sweep_file:
            raise
        # a sweep file's fields are at its top level: name them as the user wrote them
        problems = [q[len("sweep."):] if q.startswith("sweep.") else q[len("sweep: "):] if q.startswith("sweep: ")
                    else q for q in e.problems]
        raise SpecError(source, problems, "sweep file") from None
