"""What the converters share: the error that lists every problem, and the helpers that
turn foreign names into raybatch's."""

from __future__ import annotations

import re
from typing import Any, Optional

from raybatch.spec.job import ID_PATTERN, NAME_PATTERN


class ConversionError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _join(*words: Optional[str]) -> str:
    return " ".join(w for w in words if w)


def _name(text: str) -> str:
    clean = re.sub(r"[^-\w]", "-", str(text)).strip("-")[:64] or "job"
    return clean if re.fullmatch(NAME_PATTERN, clean) else "job"


def _ident(text: str) -> str:
    clean = re.sub(r"\W", "_", str(text))
    return clean if re.fullmatch(ID_PATTERN, clean) else f"x_{clean}"[:64]


class _Converter:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def finish(self, out: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        if self.errors:
            raise ConversionError(self.errors)
        return out, self.warnings
