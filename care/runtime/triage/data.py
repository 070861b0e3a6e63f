"""Readers for the triage labelled set and the public sets, with the train / held-out rule in one place.

Used by scripts/train_triage.py (training) and bench/triage.py (measuring), so both split the public sets
the same way: Banking77 by its official train/test files; Bitext by crc32(text) (even: train, odd: held
out); MedQuAD by crc32(focus), so one condition's templated questions never sit on both sides.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from care.errors import DataError

CATEGORIES = (
    "chest_pain", "stroke", "difficulty_breathing", "severe_bleeding", "suicidal_thoughts", "overdose_poisoning",
    "pregnancy_emergency", "unconscious_or_seizure", "severe_allergic_reaction", "head_injury_trauma", "burns",
    "bites_stings", "glucose_emergency", "sepsis_meningitis", "young_infant", "child_danger_signs",
    "surgical_emergency",
)
# Kinds of labelled negatives that are about health (domain "medical"); the others are everyday chat.
MEDICAL_NEGATIVE_KINDS = frozenset({"general_question", "mild_symptom", "past_history", "pharmacy_warning",
                                    "negated", "resolved"})


@dataclass
class Row:
    text: str
    emergency: bool
    category: str | None
    lang: str
    kind: str


def labelled_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("care") / "data" / "triage"))


def read_labelled(path: Path) -> list[Row]:
    """train.jsonl / dev.jsonl: {"text","emergency","category"|null,"lang","kind"} per line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"Cannot read the labelled triage set: {exc.strerror}", path=path,
                        hint="Check the path") from exc
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            row = Row(str(d["text"]), bool(d["emergency"]), d.get("category"), str(d.get("lang", "en")),
                      str(d.get("kind", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"Bad row at line {i}: {exc}", path=path,
                            hint='Each line: {"text", "emergency", "category", "lang", "kind"}') from exc
        if row.emergency and row.category not in CATEGORIES:
            raise DataError(f"Line {i}: unknown category {row.category!r}", path=path,
                            hint="Use one of the 17 ids in care.runtime.triage_data.CATEGORIES")
        rows.append(row)
    return rows


def _held_out(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % 2 == 1


def banking77(shared: Path, split: str) -> list[str]:
    text = (shared / "banking77" / f"{split}.csv").read_text(encoding="utf-8")
    return [r["text"] for r in csv.DictReader(io.StringIO(text))]


def bitext(shared: Path, held_out: bool) -> list[str]:
    folder = shared / "bitext_customer_support"
    path = next(folder.glob("Bitext_*.csv"))
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    return [r["instruction"] for r in rows if _held_out(r["instruction"]) == held_out]


def medquad(shared: Path, held_out: bool) -> list[str]:
    with gzip.open(shared / "medquad" / "medquad.normalized.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return [r["query"] for r in rows if _held_out(str(r.get("focus") or r["query"])) == held_out]
