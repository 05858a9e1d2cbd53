"""Errors every layer may raise, in a module that imports nothing of raybatch's: a bad
job, policy or datastores file (``SpecError``, one line per field), and the helper
that turns pydantic's errors into those lines."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class SpecError(ValueError):
    """A job file that cannot be queued. ``problems`` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str], what: str = "job file"):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid {what}\n" + "\n".join(f"  - {p}" for p in problems))


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for 'allowed fields' hints)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            # a dict key (inputs.<id>), the next part is the item's field
            continue
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None and inner:
            for c in inner:
                args = getattr(c, "__args__", ())
                model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
                if model:
                    break
    return model


def format_validation_error(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per bad field: where, what was wrong, what is allowed."""
    problems = []
    for e in err.errors():
        # drop pydantic's union-member tags (e.g. "literal['low','normal','high']"), keep user keys
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p == "function-before")))
        where = ".".join(str(p) for p in loc) or "(top level)"
        kind = e["type"]
        given = e.get("input")
        if kind == "extra_forbidden":
            owner = _model_at(loc, root)
            allowed = f"; allowed: {', '.join(_field_names(owner))}" if owner else ""
            problems.append(f"{where}: unknown field{allowed}")
        elif kind == "missing":
            problems.append(f"{where}: required field is missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if isinstance(given, (dict, list)):  # a whole block: the message says what is wrong in it
                problems.append(f"{where}: {msg}")
            else:
                problems.append(f"{where}: {msg} (got {given!r})")
    # a union (priority) reports once per member: keep the first of each location
    seen, unique = set(), []
    for p in problems:
        key = p.split(":", 1)[0]
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
