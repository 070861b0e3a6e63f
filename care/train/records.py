"""The training example (`Record`) and the bad-row report (`BadRows`): what every reader returns and counts.

A bad row is counted by file and line and skipped; `strict` turns the first one into a DataError naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.errors import DataError


@dataclass
class Record:
    """One training example: a user query and the assistant response, tagged with its domain."""

    id: str
    query: str
    response: str
    domain: str = "general"
    system: str | None = None  # None: the domain's prompt from care.domains at formatting time
    source: str = ""  # file or reader it came from
    stage: int = 1
    origin: str = ""  # "file:line" for error reports
    messages: list[dict[str, str]] | None = None  # multi-turn rows keep their whole conversation
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class BadRows:
    """Collects bad rows; `strict` turns the first one into a DataError naming its file and line."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.rows: list[BadRow] = []

    def add(self, file: str | Path, line: int, reason: str) -> None:
        bad = BadRow(str(file), int(line), reason)
        if self.strict:
            raise DataError(f"Bad row at {bad}", path=file,
                            hint="Fix or remove the row, or run without --strict to skip bad rows")
        self.rows.append(bad)

    def summary(self, examples: int = 5) -> dict[str, Any]:
        by_file: dict[str, dict[str, Any]] = {}
        for b in self.rows:
            entry = by_file.setdefault(b.file, {"count": 0, "reasons": {}, "examples": []})
            entry["count"] += 1
            entry["reasons"][b.reason] = entry["reasons"].get(b.reason, 0) + 1
            if len(entry["examples"]) < examples:
                entry["examples"].append({"line": b.line, "reason": b.reason})
        return {"total": len(self.rows), "by_file": by_file}
